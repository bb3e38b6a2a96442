"""Failing ranks: one rank raises, exits or is killed mid-run (HPCATTN_FAULT, hpcattn/faults.py);
the whole job must end within the subprocess timeout, say which rank failed, and leave no file
under the output name. Every launch here has a timeout, so a hang fails the test."""
import subprocess

import h5py
import pytest

from helpers import mpiexec
from hpcattn import faults
from hpcattn.commands.cli import main
from hpcattn.dist.variants import VARIANTS

FAULT_TIMEOUT = 90  # seconds; a healthy failing job ends in a few
PHASES = ["read", "compute", "write", "finish"]


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "in.h5"
    assert main(["gen", str(path), "--seq", "301", "--heads", "2", "--head-dim", "16"]) == 0
    return path


def run_with_fault(tmp_path, inp, P, fault):
    out = tmp_path / "out.h5"
    try:
        res = mpiexec(P, "run", inp, out, "--mask", "causal", env={"HPCATTN_FAULT": fault},
                      timeout=FAULT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"job with HPCATTN_FAULT={fault} did not end within {FAULT_TIMEOUT} s")
    assert res.returncode != 0, res.stderr
    assert not out.exists()
    return res


@pytest.mark.parametrize("P, rank", [(1, 0), (3, 1), (3, 2)])
@pytest.mark.parametrize("phase", PHASES)
def test_exception_on_one_rank_ends_the_job_with_its_message(tmp_path, inp, P, rank, phase):
    res = run_with_fault(tmp_path, inp, P, f"rank={rank},phase={phase}")
    assert f"internal error on rank {rank}: RuntimeError: injected fault" in res.stderr
    assert f"phase {phase!r}" in res.stderr


@pytest.mark.parametrize("phase", ["compute", "write"])
def test_exception_at_a_later_ring_hop_ends_the_job(tmp_path, inp, phase):
    res = run_with_fault(tmp_path, inp, 4, f"rank=3,phase={phase},hit={3 if phase == 'compute' else 1}")
    assert "internal error on rank 3" in res.stderr


@pytest.mark.parametrize("phase", PHASES)
def test_rank_killed_by_a_signal_ends_the_job_through_the_launcher(tmp_path, inp, phase):
    res = run_with_fault(tmp_path, inp, 3, f"rank=1,phase={phase},kind=kill")
    assert "rank 1" in res.stderr and "signal 9" in res.stderr, res.stderr


@pytest.mark.parametrize("phase", ["compute", "finish"])
def test_rank_exiting_without_mpi_cleanup_ends_the_job(tmp_path, inp, phase):
    res = run_with_fault(tmp_path, inp, 3, f"rank=2,phase={phase},kind=exit")
    assert res.returncode != 0


def test_a_fault_on_a_rank_that_does_not_exist_changes_nothing(tmp_path, inp):
    res = mpiexec(2, "run", inp, tmp_path / "out.h5", "--mask", "causal",
                  env={"HPCATTN_FAULT": "rank=7,phase=compute"}, timeout=FAULT_TIMEOUT)
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "out.h5") as f:
        assert f.attrs["complete"] == 1


@pytest.mark.parametrize("text", ["rank=1", "phase=compute", "rank=x,phase=read", "rank=1,phase=read,kind=segv",
                                  "rank=1,phase=read,when=now"])
def test_malformed_fault_spec_is_refused(text):
    with pytest.raises(ValueError, match="HPCATTN_FAULT"):
        faults._parse(text)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_reaches_the_compute_fault_point(tmp_path, inp, variant):
    """Each registered variant calls faults.point("compute", rank) in its main loop, so the
    tests above hold for it too; one fault at compute on rank 1 of 3 ends its job."""
    out = tmp_path / "out.h5"
    res = mpiexec(3, "run", inp, out, "--mask", "causal", "--variant", variant,
                  env={"HPCATTN_FAULT": "rank=1,phase=compute"}, timeout=FAULT_TIMEOUT)
    assert res.returncode != 0 and "internal error on rank 1: RuntimeError: injected fault" in res.stderr
    assert not out.exists()
