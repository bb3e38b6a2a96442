"""Shared test helpers. MPI tests (marker `mpi`) run under `mpiexec -n P python -m mpi4py -m
pytest --with-mpi`; serial tests launch their own mpiexec subprocesses, each with a timeout."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

for _var, _val in (("OMPI_ALLOW_RUN_AS_ROOT", "1"), ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
                   ("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe"),
                   ("OMPI_MCA_rmaps_base_oversubscribe", "true")):
    os.environ.setdefault(_var, _val)

BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT = 240


def mpiexec(n, *args, timeout=LAUNCH_TIMEOUT, env=None):
    """Run `hpcattn ARGS` on n ranks; returns the CompletedProcess (never hangs the suite)."""
    cmd = [str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-m", "hpcattn", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def hpcattn(*args, timeout=LAUNCH_TIMEOUT):
    """Run `hpcattn ARGS` as one plain process."""
    return subprocess.run([sys.executable, "-m", "hpcattn", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def random_qkv(rng, B, nq, n, H, Hkv, D, dtype="float32"):
    q = rng.standard_normal((B, nq, H, D)).astype(dtype)
    k = rng.standard_normal((B, n, Hkv, D)).astype(dtype)
    v = rng.standard_normal((B, n, Hkv, D)).astype(dtype)
    return q, k, v


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
