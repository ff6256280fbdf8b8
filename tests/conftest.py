"""Make the numbered chapters importable: their names start with a digit, so
tests load them with importlib.import_module("02_model") and friends. And the
`torchrun` fixture, for the tests that run a chapter in two processes."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# A rank of a two-process gloo run can abort with this line from the C++ runtime (a thread
# object destroyed unjoined: at the process group's teardown, we think). With dist.barrier()
# before destroy_process_group (03's end_distributed) it came once in the project's CI (03's
# two-process test), and never in 100 runs of that test's commands on a 2-core machine here,
# alone or beside two busy processes. Not what the tests check: such a run is run once more.
TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.fixture
def torchrun():
    """torchrun(script, *args, timeout=, env=None, standalone=True) -> CompletedProcess: the
    script under `torch.distributed.run --nproc_per_node=2`, asserted to exit 0. A run that ends
    in the teardown abort is run once more, the same command, with a warning that carries its
    stderr: Python's fault handler, on here, prints there every thread's stack at the abort."""
    def run(script, *args, timeout, env=None, standalone=True):
        cmd = [sys.executable, "-m", "torch.distributed.run", *(["--standalone"] if standalone else []),
               "--nproc_per_node=2", str(script), *map(str, args)]
        env = {**os.environ, **(env or {}), "PYTHONFAULTHANDLER": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if out.returncode != 0 and TEARDOWN_ABORT in out.stderr:
            warnings.warn(f"a rank of {Path(script).name} aborted at teardown; run again. Its stderr:\n"
                          f"{out.stderr[-4000:]}")
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return out
    return run
