"""Shared test setup, applied to every folder under tests/. MPI tests (marker `mpi`) run under
`mpiexec -n P python -m mpi4py -m pytest --with-mpi`; serial tests launch their own mpiexec
subprocesses, each with a timeout (helpers.py: `mpiexec`, `hpcattn`, `world`). A failure on
one rank of an MPI run ends the whole run instead of hanging it (mpi_guard.py, whose hooks are
imported here)."""
import os

import numpy as np
import pytest

from mpi_guard import (pytest_configure, pytest_runtest_logreport,  # noqa: F401 (hooks)
                       pytest_runtest_protocol, pytest_unconfigure)

for _var, _val in (("OMPI_ALLOW_RUN_AS_ROOT", "1"), ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
                   ("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe"),
                   ("OMPI_MCA_rmaps_base_oversubscribe", "true")):
    os.environ.setdefault(_var, _val)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
