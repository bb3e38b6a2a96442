"""`hpcattn sweep JOB.toml`: run every point of a job file and collect the results in one file.

The driver is one plain process (no MPI): it writes each input once (`gen`), launches
`hpcattn run` on P ranks per point through srun or mpiexec (HPCATTN_EXPECT_RANKS=P, so a
launch that makes singletons fails), verifies the output against the float64 reference, and
appends one record per point to results.json (and results.csv) after every point, so a sweep
cut short by the batch system keeps what it measured. `hpcattn plot` reads the JSON.
"""
import csv
import json
import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np

from . import jobs, launch
from ..errors import HpcattnError
from ..io import h5io
from ..masks import parse

FIELDS = ("job", "point", "repeat", "scaling", "ranks", "nodes", "launcher", "seq", "queries",
          "batch", "heads", "kv_heads", "head_dim", "dtype", "mask", "variant", "wall_s",
          "compute_s", "comm_s", "io_s", "bytes_sent", "bytes_received", "bytes_sent_mean",
          "edges", "useful_gflops", "elapsed_s", "verify", "o_err", "trace")


def _input(spec, seq, workdir):
    """Path of the input for N = seq, generated once per sweep (on this process)."""
    inp = spec["input"]
    if "path" in inp:
        return Path(inp["path"])
    path = workdir / f"in-{seq}.h5"
    if not path.exists():
        from .gen import generate
        tmp = path.with_suffix(".h5.tmp")
        generate(str(tmp), seq, inp.get("queries"), inp.get("batch", 1), inp.get("heads", 1),
                 inp.get("kv_heads"), inp.get("head_dim", 64), inp.get("dtype", "float32"),
                 inp.get("seed", 0), False, None)
        os.replace(tmp, path)
    return path


def record(spec, point, out_path, launcher, elapsed, trace=None):
    """One result record from a finished output file's stats and attributes."""
    with h5py.File(out_path, "r") as f:
        st = {k: np.asarray(f["stats"][k]) for k in f["stats"]}
        attrs = dict(f.attrs)
        B, Nq, H, D = f["o"].shape
        dtype = h5io.stored_dtype(f["o"]).name
    with h5py.File(attrs.get("input", spec["input"].get("path", "")), "r") as f:
        N, Hkv = f["k"].shape[1:3]
    edges = int(st["edges"].sum()) if "edges" in st else 0
    wall = float(st["wall_s"].max())
    return {"job": spec["name"], "point": point.index, "repeat": point.repeat,
            "scaling": spec["run"]["scaling"], "ranks": int(attrs["ranks"]),
            "nodes": int(attrs.get("nodes", 1)), "launcher": launcher, "seq": int(N), "queries": int(Nq),
            "batch": int(B), "heads": int(H), "kv_heads": int(Hkv), "head_dim": int(D), "dtype": dtype,
            "mask": str(attrs["mask"]), "variant": str(attrs["variant"]), "wall_s": wall,
            "compute_s": float(st["compute_s"].max()), "comm_s": float(st["comm_s"].max()),
            "io_s": float(st["io_s"].max()), "bytes_sent": int(st["bytes_sent"].max()),
            "bytes_received": int(st["bytes_received"].max()),
            "bytes_sent_mean": float(st["bytes_sent"].mean()), "edges": edges,
            "useful_gflops": 4.0 * edges * B * H * D / wall / 1e9 if wall > 0 else 0.0,
            "elapsed_s": elapsed, "verify": None, "o_err": None, "trace": trace}


def save(records, results):
    """Write results.json (the records plus a header) and results.csv beside it."""
    results = Path(results)
    tmp = results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"hpcattn_results": 1, "records": records}, indent=1))
    os.replace(tmp, results)
    with open(results.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)


def run_sweep(job_path, ranks=None, launcher=None, workdir=None, results=None, dry_run=False,
              log=print, plot=False):
    """Run a job file's points; returns the records. Raises HpcattnError on the first failure
    (after saving the records so far). `plot`: also draw results.png beside results.json."""
    spec = jobs.load(job_path)
    run, out = spec["run"], spec["output"]
    launcher = launcher or run["launcher"]
    if launcher == "auto":
        launcher = launch.detect()
    workdir = Path(workdir or out.get("dir", f"runs/{spec['name']}"))
    results = Path(results) if results else workdir / out.get("results", "results.json")
    pts = jobs.points(spec, ranks)
    for mask in {p.mask for p in pts}:   # a typo in a mask fails now, not after hours of sweep
        try:
            parse(mask)
        except HpcattnError as e:
            raise HpcattnError(f"job {job_path}: {e}") from None
    tasks = os.environ.get("SLURM_NTASKS", "")
    if tasks.isdigit() and max(p.ranks for p in pts) > int(tasks):
        raise HpcattnError(f"job {job_path} asks for {max(p.ranks for p in pts)} ranks but this "
                           f"allocation has {tasks} task(s); submit with --ntasks >= that")
    records = []
    if not dry_run:
        workdir.mkdir(parents=True, exist_ok=True)
    for pt in pts:
        tag = f"p{pt.index:03d}-{pt.variant}-n{pt.seq}-r{pt.ranks}"
        in_path = Path(spec["input"]["path"]) if "path" in spec["input"] else workdir / f"in-{pt.seq}.h5"
        out_path, trace = workdir / f"{tag}.h5", (workdir / f"{tag}.trace.json") if run.get("profile") else None
        args = ["run", in_path, out_path, "--mask", pt.mask, "--variant", pt.variant]
        if trace:
            args += ["--profile", trace]
        cmd = launch.command(launcher, pt.ranks, args)
        log(f"hpcattn sweep: point {pt.index + 1}/{len(pts)}: {' '.join(map(str, cmd))}")
        if dry_run:
            continue
        _input(spec, pt.seq, workdir)
        env = {**os.environ, launch.EXPECT: str(pt.ranks)}
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=run.get("timeout_s", 3600))
        except subprocess.TimeoutExpired:
            save(records, results)
            raise HpcattnError(f"sweep point {pt.index} ({tag}) ran past {run.get('timeout_s', 3600)} s") from None
        elapsed = time.perf_counter() - t
        (workdir / f"{tag}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            save(records, results)
            lines = proc.stderr.strip().splitlines()
            last = ([x for x in lines if x.startswith("hpcattn: error")] or lines or ["(no output)"])[-1]
            raise HpcattnError(f"sweep point {pt.index} ({tag}) failed with status {proc.returncode}: "
                               f"{last} (log: {workdir / (tag + '.log')})")
        rec = record(spec, pt, out_path, launcher, elapsed, str(trace) if trace else None)
        if run.get("verify_rows", 256):
            from .verify import verify
            rep = verify(str(in_path), str(out_path), run.get("verify_rows", 256))
            rec.update(verify="pass" if rep["passed"] else "FAIL", o_err=float(rep["o_err"]))
        records.append(rec)
        save(records, results)
        log(f"hpcattn sweep: point {pt.index + 1}: {rec['ranks']} rank(s), wall {rec['wall_s']:.3f} s, "
            f"{rec['useful_gflops']:.2f} useful GFLOP/s, verify {rec['verify'] or 'skipped'}")
        if not out.get("keep_outputs", False):
            out_path.unlink()
        if rec["verify"] == "FAIL":
            raise HpcattnError(f"sweep point {pt.index} ({tag}): output failed verify "
                               f"(o max rel err {rec['o_err']:.2e})")
    if not dry_run:
        log(f"hpcattn sweep: {len(records)} record(s) in {results} and {results.with_suffix('.csv')}")
    if plot and records:
        from .plot import plot_results
        plot_results([results], results.with_suffix(".png"))
        log(f"hpcattn sweep: figure {results.with_suffix('.png')}")
    return records


def add_parser(sub):
    s = sub.add_parser("sweep", help="run a job file (jobs/*.toml): one run or a scaling sweep")
    s.add_argument("job", metavar="JOB.toml")
    s.add_argument("--ranks", type=int, nargs="+", help="override run.ranks")
    s.add_argument("--launcher", choices=launch.LAUNCHERS, help="override run.launcher")
    s.add_argument("--dir", help="override output.dir")
    s.add_argument("--results", help="results JSON path (default: DIR/results.json)")
    s.add_argument("--dry-run", action="store_true", help="print the launch commands only")
    s.add_argument("--plot", action="store_true", help="also draw results.png (hpcattn plot)")
    return s


def cmd_sweep(args):
    run_sweep(args.job, args.ranks, args.launcher, args.dir, args.results, args.dry_run,
              log=lambda m: print(m, flush=True), plot=args.plot)
    return 0

