"""The batch scripts on a real SLURM: slurm/*.sbatch submitted with `sbatch --wait` to the
cluster that slurm/local-cluster.sh starts; exit states, outputs (re-read, verified), logs and a
sweep's collected results are checked.

Run by `make test-slurm` (slurm/ci-test.sh), which starts the cluster and sets
HPCATTN_SLURM_TESTS=require; elsewhere these tests skip and say why.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from helpers import hpcattn

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]
SMALL = {"HPCATTN_SEQ": "700", "HPCATTN_GEN_ARGS": "--heads 2 --kv-heads 1 --head-dim 16 --seed 3",
         "HPCATTN_MASK": "causal+window:60+global:3", "HPCATTN_VERIFY_ROWS": "700",
         "HPCATTN_PYTHON": sys.executable, "HPCATTN_HOME": str(ROOT)}


def _cluster_nodes():
    """Idle nodes of the cluster that SLURM_CONF names, or a reason why there is none."""
    if os.environ.get("HPCATTN_SLURM_TESTS") not in ("1", "require"):
        return "SLURM integration tests run under `make test-slurm` (HPCATTN_SLURM_TESTS unset)"
    if not shutil.which("sbatch"):
        return "sbatch is not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                             timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    nodes = [line.split()[0] for line in out.stdout.splitlines() if line.endswith("idle")]
    return nodes or f"no idle SLURM node (sinfo: {out.stdout.strip() or out.stderr.strip()})"


@pytest.fixture(scope="module")
def nodes():
    got = _cluster_nodes()
    if isinstance(got, str):
        if os.environ.get("HPCATTN_SLURM_TESTS") == "require":
            pytest.fail(f"SLURM required but unavailable: {got}")
        pytest.skip(got)
    return got


def submit(workdir, script, *sbatch_args, env=None, timeout=600):
    """sbatch --wait a script from slurm/ in workdir; returns (sbatch status, job state,
    exit code 'a:b', the job's log)."""
    cmd = ["sbatch", "--wait", "--parsable", f"--output={workdir}/slurm-%j.out", *sbatch_args,
           str(ROOT / "slurm" / script)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **SMALL, **(env or {})})
    job = proc.stdout.strip().split(";")[0]
    assert job.isdigit(), f"sbatch said: {proc.stdout} {proc.stderr}"
    show = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                          timeout=30).stdout
    state = re.search(r"JobState=(\S+)", show).group(1)
    code = re.search(r" ExitCode=(\S+)", show).group(1)
    log = (Path(workdir) / f"slurm-{job}.out").read_text()
    return proc.returncode, state, code, log, job


# Seen once in four CI runs, on the simulated two-node cluster only (two slurmd on one host): a
# task on node2 exited with status 14 during MPI start-up under srun --mpi=pmix, before any
# hpcattn code ran. Two-node jobs that end that way are submitted once more; any other failure,
# and a second start-up failure, fail the test.
STARTUP_FAILURE = re.compile(r"(exit code|status) 14\b")


def submit_two_nodes(workdir, script, *sbatch_args, env=None):
    rc, state, code, log, job = submit(workdir, script, *sbatch_args, env=env)
    if (rc, state, code) != (0, "COMPLETED", "0:0") and STARTUP_FAILURE.search(log):
        print(f"{script}: MPI start-up failure on the simulated cluster, submitted again:\n{log}")
        rc, state, code, log, job = submit(workdir, script, *sbatch_args, env=env)
    return rc, state, code, log, job


def assert_verified(workdir, job, ranks):
    out = Path(workdir) / "runs" / job / "out.h5"
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] == 1 and f.attrs["ranks"] == ranks
        assert len(f["stats/wall_s"]) == ranks
    rep = hpcattn("verify", Path(workdir) / "runs" / job / "in.h5", out)
    assert rep.returncode == 0 and "PASS" in rep.stdout


def test_single_run_with_srun_pmix(nodes, tmp_path):
    rc, state, code, log, job = submit(tmp_path, "run.sbatch", "--nodes=1", "--ntasks=2")
    assert (rc, state, code) == (0, "COMPLETED", "0:0"), log
    assert "srun --mpi=pmix --ntasks=2" in log and re.search(r"ranks: 2\n", log)
    assert "hpcattn run: 2 rank(s)" in log and "PASS" in log
    assert_verified(tmp_path, job, 2)


def test_single_run_with_mpiexec(nodes, tmp_path):
    rc, state, code, log, job = submit(tmp_path, "run.sbatch", "--nodes=1", "--ntasks=2",
                                       env={"HPCATTN_LAUNCHER": "mpiexec"})
    assert (rc, state, code) == (0, "COMPLETED", "0:0"), log
    assert "mpiexec -n 2 --bind-to none" in log and "hpcattn run: 2 rank(s)" in log
    assert_verified(tmp_path, job, 2)


def test_multinode_run(nodes, tmp_path):
    n = min(2, len(nodes))
    rc, state, code, log, job = submit_two_nodes(tmp_path, "multinode.sbatch", f"--nodes={n}",
                                       "--ntasks-per-node=2")
    assert (rc, state, code) == (0, "COMPLETED", "0:0"), log
    assert f"on {n} node(s)" in log and f"hpcattn run: {2 * n} rank(s)" in log
    assert all(node in log for node in nodes[:n])
    assert_verified(tmp_path, job, 2 * n)


def test_singleton_launch_fails_loudly(nodes, tmp_path):
    """srun --mpi=none starts two 1-rank worlds: HPCATTN_EXPECT_RANKS must stop the job."""
    rc, state, code, log, job = submit(tmp_path, "run.sbatch", "--nodes=1", "--ntasks=2",
                                       env={"HPCATTN_SRUN_MPI": "none"})
    assert rc != 0 and state == "FAILED" and code != "0:0"
    assert "MPI world has 1 rank(s) but HPCATTN_EXPECT_RANKS=2" in log
    assert not (tmp_path / "runs" / job / "out.h5").exists()


def _records(path):
    data = json.loads(Path(path).read_text())
    return data["records"]


def _png_size(path):
    import matplotlib.image
    img = matplotlib.image.imread(path)
    return img.shape[1], img.shape[0]


def test_strong_sweep_collects_results(nodes, tmp_path):
    n = min(2, len(nodes))
    rc, state, code, log, _ = submit_two_nodes(tmp_path, "strong.sbatch", f"--nodes={n}", f"--ntasks={2 * n}",
                                               "--ntasks-per-node=2",
                                               env={"HPCATTN_JOB": "jobs/smoke.toml",
                                                    "HPCATTN_SWEEP_ARGS": f"--dir {tmp_path}/sweep"})
    assert (rc, state, code) == (0, "COMPLETED", "0:0"), log
    recs = _records(tmp_path / "sweep" / "results.json")
    assert [r["ranks"] for r in recs] == [1, 2, 3]
    assert all(r["verify"] == "pass" and r["launcher"] == "srun" and r["seq"] == 1000 for r in recs)
    assert recs[0]["bytes_sent"] == 0 and all(r["bytes_sent"] > 0 for r in recs[1:])
    assert (tmp_path / "sweep" / "results.csv").read_text().count("\n") == 4
    assert _png_size(tmp_path / "sweep" / "results.png") == (1600, 1000)


def test_weak_sweep_grows_the_sequence(nodes, tmp_path):
    job = tmp_path / "weak.toml"
    job.write_text('name = "w"\n[input]\nseq_per_rank = 300\nheads = 1\nhead_dim = 16\n'
                   '[run]\nmask = "window:20"\nranks = [1, 2]\nverify_rows = 0\n'
                   f'[output]\ndir = "{tmp_path}/weak"\n')
    rc, state, code, log, _ = submit(tmp_path, "weak.sbatch", "--nodes=1", "--ntasks=2",
                                     env={"HPCATTN_JOB": str(job)})
    assert (rc, state, code) == (0, "COMPLETED", "0:0"), log
    recs = _records(tmp_path / "weak" / "results.json")
    assert [(r["ranks"], r["seq"], r["scaling"]) for r in recs] == [(1, 300, "weak"), (2, 600, "weak")]


def test_profiled_run_writes_one_timeline_of_all_ranks(nodes, tmp_path):
    rc, state, code, log, job = submit(tmp_path, "nsys.sbatch", "--nodes=1", "--ntasks=2",
                                       env={"HPCATTN_VARIANT": "ring"})  # hop phases are ring's
    assert (rc, state, code) == (0, "COMPLETED", "0:0"), log
    prof = tmp_path / "runs" / job / "profile"
    if shutil.which("nsys"):
        assert sorted(p.name for p in prof.glob("report.*.nsys-rep")) == ["report.0.nsys-rep",
                                                                          "report.1.nsys-rep"]
    else:
        assert "WARNING: nsys (Nsight Systems) is not on PATH" in log
    events = json.loads((prof / "trace.json").read_text())["traceEvents"]
    names = {(e["pid"], e["name"]) for e in events if e["ph"] == "X"}
    for rank in (0, 1):
        assert {(rank, "read"), (rank, "local"), (rank, "merge"), (rank, "hop 1 send/recv"),
                (rank, "write")} <= names
