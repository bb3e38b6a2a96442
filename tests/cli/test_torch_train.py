"""jobs/torch_train.py (the README's training example): a toy model trained through
hpcattn.torch on 1 and 3 ranks gives the same losses, and they fall."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BIN, LAUNCH_TIMEOUT

pytest.importorskip("torch")
JOB = Path(__file__).resolve().parents[2] / "jobs" / "torch_train.py"


def losses(P, *args):
    r = subprocess.run([str(BIN / "mpiexec"), "-n", str(P), sys.executable, str(JOB), *args],
                       capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line)["loss"] for line in r.stdout.splitlines()]


def test_sharded_training_matches_one_rank():
    args = ("--seq", "601", "--steps", "3", "--mask", "causal+window:50")
    one, three = losses(1, *args), losses(3, *args, "--variant", "ring")
    assert len(one) == 3 and one[-1] < one[0]
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, three)), (one, three)
