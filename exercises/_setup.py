"""Make the numbered chapters importable from an exercise file: their names start with a digit,
so they are loaded with importlib.import_module("02_model"), from the repository root."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
