"""compute-sanitizer's memcheck and racecheck over the tensor-core kernels (sanitized_kernels.py):
no out-of-bounds or misaligned access, no shared-memory race. Skips (saying why) without a GPU or
without compute-sanitizer on PATH."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_helpers import cupy_or_skip

cupy_or_skip()
SCRIPT = Path(__file__).with_name("sanitized_kernels.py")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_tensor_core_kernels_are_sanitizer_clean(tool):
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer is not on PATH")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2])]
                                                       + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    run = subprocess.run([exe, "--tool", tool, "--error-exitcode", "3", sys.executable, str(SCRIPT)],
                         capture_output=True, text=True, timeout=900, env=env)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "done" in out, out[-4000:]
    summary = [line for line in out.splitlines() if "SUMMARY" in line]
    assert summary and all(re.search(r"\b0 errors", line) for line in summary), summary
    if tool == "racecheck":
        assert all(re.search(r"\b0 hazards", line) for line in summary), summary
