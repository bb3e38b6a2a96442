"""A failure on one rank of an MPI test run ends the run with the failure shown, never a hang
(tests/mpi_guard.py). Serial tests: each writes a tiny test file, runs it under
`mpiexec -n 3 python -m mpi4py -m pytest --with-mpi -p mpi_guard` with a 3 s grace period, and
checks the exit status, the messages and the time taken. Without the guard the first case
hangs: the other ranks wait in a collective that rank 1 never joins."""
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import BIN

TESTS = Path(__file__).resolve().parent.parent
PREAMBLE = "import pytest\nfrom mpi4py import MPI\n\n"
CASES = {
    "one_rank_fails": '''
@pytest.mark.mpi
def test_fails_on_rank_1():
    comm = MPI.COMM_WORLD.Dup()
    assert comm.rank != 1, "planted failure on rank 1"
    comm.Barrier()


@pytest.mark.mpi
def test_after():
    MPI.COMM_WORLD.Barrier()
''',
    "every_rank_stuck": '''
@pytest.mark.mpi
@pytest.mark.timeout(1)
def test_stuck_everywhere():
    if MPI.COMM_WORLD.rank == 0:
        MPI.COMM_WORLD.recv(source=1, tag=99)
    MPI.COMM_WORLD.Barrier()
''',
    "every_rank_fails": '''
@pytest.mark.mpi
def test_fails_everywhere():
    MPI.COMM_WORLD.Barrier()
    assert False, "planted failure on every rank"


@pytest.mark.mpi
def test_after():
    MPI.COMM_WORLD.Barrier()
''',
}


def launch(tmp_path, case, grace=3):
    path = tmp_path / f"test_{case}.py"
    path.write_text(PREAMBLE + CASES[case])
    env = {**os.environ, "PYTHONPATH": str(TESTS), "HPCATTN_TEST_GRACE_S": str(grace)}
    cmd = [str(BIN / "mpiexec"), "-n", "3", sys.executable, "-m", "mpi4py", "-m", "pytest", "--with-mpi",
           "-p", "mpi_guard", "-p", "no:cacheprovider", "-q", "--color=no", "--rootdir", str(tmp_path), str(path)]
    t = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path)
    return res, res.stdout + res.stderr, time.monotonic() - t


def test_a_failure_on_one_rank_aborts_the_run_with_the_failure_shown(tmp_path):
    res, out, took = launch(tmp_path, "one_rank_fails")
    assert res.returncode != 0 and took < 60, (res.returncode, took, out)
    assert "[mpi_guard rank 1 of 3] FAILED" in out and "planted failure on rank 1" in out, out
    assert "did not finish it within 3 s: aborting the MPI job" in out and "MPI_ABORT" in out, out


def test_a_test_stuck_on_every_rank_aborts_after_its_timeout(tmp_path):
    res, out, took = launch(tmp_path, "every_rank_stuck")
    assert res.returncode != 0 and took < 60, (res.returncode, took, out)
    assert "test_stuck_everywhere still running after 4 s (timeout 1 s + 3 s)" in out, out
    assert "most recent call first" in out, out  # the stacks of the stuck rank


def test_a_failure_on_every_rank_does_not_abort(tmp_path):
    """Every rank finishes the failed test: the run goes on (the next test passes) and ends
    with a non-zero status, rank 0 naming the ranks where it failed (mpi4py's runner then
    calls MPI_Abort for the non-zero exit, as in any failed run). (A grace period long
    enough for every rank to report the failure on a loaded machine.)"""
    res, out, took = launch(tmp_path, "every_rank_fails", grace=60)
    assert res.returncode != 0 and "aborting the MPI job" not in out, out
    assert "test_fails_everywhere failed on rank(s) 0, 1, 2" in out, out
    # the run went on to the next test (mpi4py's MPI_Abort for the failed exit may cut the
    # other ranks' summaries short, so one summary is what is certain)
    assert "1 failed, 1 passed" in out, out
