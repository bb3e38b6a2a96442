"""Job files (TOML), launch commands, the world-size check and `hpcattn sweep` end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from helpers import BIN, LAUNCH_TIMEOUT, mpiexec
from hpcattn.commands import jobs, launch
from hpcattn.commands.cli import main
from hpcattn.errors import HpcattnError
from hpcattn.commands.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_job_file_loads_and_expands():
    for path in sorted((ROOT / "jobs").glob("*.toml")):
        spec = jobs.load(path)
        pts = jobs.points(spec)
        assert pts and all(p.ranks >= 1 and p.seq >= 1 for p in pts), path
    strong = jobs.points(jobs.load(ROOT / "jobs" / "strong.toml"))
    assert [(p.ranks, p.seq) for p in strong] == [(1, 262144), (2, 262144), (4, 262144), (8, 262144)]
    weak = jobs.points(jobs.load(ROOT / "jobs" / "weak.toml"))
    assert [(p.ranks, p.seq) for p in weak] == [(r, 65536 * r) for r in (1, 2, 4, 8)]


def test_points_are_the_product_of_the_lists_with_repeats(tmp_path):
    spec = jobs.load(write(tmp_path, '[input]\nseq = [10, 20]\n[run]\nmask = ["full", "causal"]\n'
                                     'variant = ["ring", "auto"]\nranks = [1, 3]\nrepeat = 2\n'))
    pts = jobs.points(spec)
    assert len(pts) == 2 * 2 * 2 * 2 * 2 and [p.index for p in pts] == list(range(32))
    assert {(p.variant, p.mask, p.seq, p.ranks) for p in pts} == {
        (v, m, s, r) for v in ("ring", "auto") for m in ("full", "causal") for s in (10, 20) for r in (1, 3)}
    assert jobs.points(spec, ranks=[5])[0].ranks == 5
    assert spec["name"] == "job" and spec["run"]["scaling"] == "strong"


def test_ranks_default_to_the_allocation(tmp_path, monkeypatch):
    spec = jobs.load(write(tmp_path, '[input]\nseq = 10\n[run]\nmask = "full"\n'))
    monkeypatch.setenv("SLURM_NTASKS", "6")
    assert [p.ranks for p in jobs.points(spec)] == [6]
    monkeypatch.delenv("SLURM_NTASKS")
    assert [p.ranks for p in jobs.points(spec)] == [1]


@pytest.mark.parametrize("text, words", [
    ('[input]\nseq = 10\nsqe = 3\n[run]\nmask = "full"\n', "unknown key input.'sqe'"),
    ('[input]\nseq = 10\n[run]\nmask = "full"\nranks = "4"\n', "run.ranks = '4' has the wrong type"),
    ('[input]\nseq = 10\n[run]\nmask = "full"\nranks = [1, true]\n', "wrong type"),
    ('[input]\nseq = 10\n[run]\nmask = "full"\nranks = []\n', "wrong type"),
    ('[input]\nseq = 10\nseq_per_rank = 5\n[run]\nmask = "full"\n', "exactly one of"),
    ('[input]\nseq = 10\n[run]\nmask = "full"\nscaling = "weak"\n', "weak scaling takes"),
    ('[input]\nseq = 10\n[run]\nvariant = "ring"\n', "run.mask is required"),
    ('[input]\nseq = 0\n[run]\nmask = "full"\n', "seq must be at least 1"),
    ('[input]\nseq = 10\n[run]\nmask = "full"\nranks = [2, 0]\n', "ranks must be at least 1"),
    ('[input]\nseq = 10\n[run]\nmask = "full"\nlauncher = "ssh"\n', "run.launcher must be one of"),
    ('bogus = 1\n[input]\nseq = 10\n[run]\nmask = "full"\n', "unknown key 'bogus'"),
    ('[input\nseq = 10\n', "job file"),
])
def test_bad_job_files_name_the_problem(tmp_path, text, words):
    with pytest.raises(HpcattnError, match=None) as e:
        jobs.load(write(tmp_path, text))
    assert words in str(e.value)


def test_missing_job_file_is_one_line_and_status_1(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.toml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_launch_commands(monkeypatch):
    monkeypatch.setenv("HPCATTN_SRUN_FLAGS", "--exclusive --cpu-bind=none")
    cmd = launch.command("srun", 4, ["run", "a.h5", "b.h5"])
    assert cmd[:6] == ["srun", "--mpi=pmix", "--ntasks=4", "--kill-on-bad-exit=1", "--exclusive",
                       "--cpu-bind=none"]
    assert cmd[6:] == [sys.executable, "-m", "hpcattn", "run", "a.h5", "b.h5"]
    cmd = launch.command("mpiexec", 3, ["info"])
    assert cmd[0] == str(BIN / "mpiexec") and cmd[1:5] == ["-n", "3", "--bind-to", "none"]
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert launch.detect() == "mpiexec"
    with pytest.raises(HpcattnError, match="unknown launcher"):
        launch.command("ssh", 2, [])


def test_check_world():
    launch.check_world(3, {})
    launch.check_world(3, {"HPCATTN_EXPECT_RANKS": "3"})
    with pytest.raises(HpcattnError, match="singletons") as e:
        launch.check_world(1, {"HPCATTN_EXPECT_RANKS": "4"})
    assert e.value.collective
    with pytest.raises(HpcattnError, match="world has 2 rank"):
        launch.check_world(2, {"HPCATTN_EXPECT_RANKS": "4"})
    with pytest.raises(HpcattnError, match="not a positive integer"):
        launch.check_world(2, {"HPCATTN_EXPECT_RANKS": "four"})


def test_singletons_fail_loudly_and_a_real_launch_passes():
    """Two separately started processes each see a world of one: both must fail, clearly."""
    env = {**os.environ, "HPCATTN_EXPECT_RANKS": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "hpcattn", "info"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=LAUNCH_TIMEOUT)
        assert p.returncode == 1 and "MPI world has 1 rank(s) but HPCATTN_EXPECT_RANKS=2" in err
    ok = mpiexec(2, "info", env={"HPCATTN_EXPECT_RANKS": "2"})
    assert ok.returncode == 0 and "ranks: 2" in ok.stdout
    bad = mpiexec(2, "info", env={"HPCATTN_EXPECT_RANKS": "3"})
    assert bad.returncode != 0 and bad.stderr.count("MPI world has 2 rank(s)") == 1


SWEEP = """name = "t"
[input]
seq = 257
heads = 2
kv_heads = 1
head_dim = 16
seed = 4
[run]
mask = "causal+window:30"
variant = "ring"
ranks = [1, 2, 3]
verify_rows = 257
launcher = "mpiexec"
timeout_s = 200
[output]
dir = "{dir}"
keep_outputs = true
"""


def test_sweep_runs_every_point_and_collects_results(tmp_path):
    job = write(tmp_path, SWEEP.format(dir=tmp_path / "out"))
    assert main(["sweep", str(job), "--plot"]) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    recs = data["records"]
    assert [r["ranks"] for r in recs] == [1, 2, 3] and all(r["verify"] == "pass" for r in recs)
    assert {r["seq"] for r in recs} == {257} and {r["variant"] for r in recs} == {"ring"}
    for r in recs:   # each record is the output file's own stats (re-read here)
        with h5py.File(tmp_path / "out" / f"p{r['point']:03d}-ring-n257-r{r['ranks']}.h5") as f:
            assert r["bytes_sent"] == int(f["stats/bytes_sent"][...].max())
            assert r["wall_s"] == float(f["stats/wall_s"][...].max())
            assert r["edges"] == int(f["stats/edges"][...].sum())
        assert r["useful_gflops"] == pytest.approx(4 * r["edges"] * 2 * 16 / r["wall_s"] / 1e9)
        assert r["o_err"] < 1e-4
    assert len({r["edges"] for r in recs}) == 1   # the same edges whatever the rank count
    lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("job,point,repeat,scaling,ranks")
    assert (tmp_path / "out" / "results.png").stat().st_size > 10000
    assert (tmp_path / "out" / "in-257.h5").exists()


def test_sweep_failure_names_the_point_and_keeps_earlier_records(tmp_path):
    job = write(tmp_path, SWEEP.format(dir=tmp_path / "out").replace('variant = "ring"',
                                                                     'variant = ["ring", "nonsense"]'))
    with pytest.raises(HpcattnError) as e:
        run_sweep(job, ranks=[2], log=lambda m: None)
    msg = str(e.value)
    assert "sweep point 1" in msg and "hpcattn: error" in msg and "nonsense" in msg and ".log" in msg
    recs = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert [r["variant"] for r in recs] == ["ring"]


def test_sweep_checks_every_mask_before_launching(tmp_path):
    job = write(tmp_path, SWEEP.format(dir=tmp_path / "out").replace('mask = "causal+window:30"',
                                                                     'mask = ["full", "window:-3"]'))
    with pytest.raises(HpcattnError, match="window"):
        run_sweep(job, log=lambda m: None)
    assert not (tmp_path / "out" / "results.json").exists()


def test_sweep_refuses_more_ranks_than_the_allocation(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(HpcattnError, match="asks for 3 ranks but this allocation has 2"):
        run_sweep(write(tmp_path, SWEEP.format(dir=tmp_path)), log=lambda m: None)


def test_dry_run_prints_the_launches_and_runs_nothing(tmp_path, capsys):
    job = write(tmp_path, SWEEP.format(dir=tmp_path / "dry"))
    assert main(["sweep", str(job), "--dry-run", "--launcher", "srun"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all("srun --mpi=pmix --ntasks=" in line for line in out)
    assert not (tmp_path / "dry").exists()
