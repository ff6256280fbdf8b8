#!/usr/bin/env bash
# The README's two commands:
#   bash run.sh         set up .venv, then run the whole recipe (pipeline.py: 01 -> 07 into runs/toy,
#                       then runs/toy/report.md); flags go to pipeline.py (--run-dir, --preset, --rerun)
#   bash run.sh test    set up .venv, then run the test suite
# Extra arguments after "test" go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VENV=.venv

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    if [ "${FRESH_TORCH:-0}" != 1 ] && "$PYTHON" -c "import torch" 2>/dev/null; then
      # Keep the torch this python already has (a CUDA or ROCm build, say): the venv sees it.
      echo "setup: reusing torch $("$PYTHON" -c 'import torch; print(torch.__version__)') from $PYTHON"
      "$PYTHON" -m venv --system-site-packages "$VENV"
    else
      "$PYTHON" -m venv "$VENV"
    fi
  fi
  local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # On Linux, PyPI's default torch wheel brings several GB of CUDA libraries.
    # Ask pip what it would install before it downloads anything, and stop on a
    # machine with no NVIDIA GPU rather than pull them.
    "${pip[@]}" --dry-run --ignore-installed --report "$VENV/torch-plan.json" \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
    if grep -q '"name": "nvidia-' "$VENV/torch-plan.json" && ! command -v nvidia-smi >/dev/null; then
      echo "setup: pip would install torch $TORCH_VERSION with CUDA libraries (several GB), but this" >&2
      echo "machine shows no NVIDIA GPU. Point TORCH_INDEX_URL at PyTorch's CPU wheel index" >&2
      echo "(see PyTorch's install page), or set FRESH_TORCH=0 and run with a python that has torch." >&2
      exit 1
    fi
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
  fi
  "${pip[@]}" -r requirements.txt
}

setup
PY="$VENV/bin/python"
if [ "${1:-}" = test ]; then
  shift
  "$PY" -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
  # pytest exits 5 when it collects nothing: that is a failure here too.
  exec "$PY" -m pytest -q "$@"
fi

# The pipeline: 01 -> 07 into one run folder, then report.md. A stage whose outputs exist is
# skipped (pass --rerun to redo stages); other flags: python pipeline.py --help.
exec "$PY" pipeline.py "$@"
