"""`hpcattn run` against its floor: the same work done by hand, in the same script.

The floor is a plain h5py read of q, k and v (and do, --backward), the attention call on
those arrays in memory (hpcattn.attention, and attention_backward, on one rank: the local
kernels alone; on a GPU with the copies to and from the device) and a plain h5py write of o
and lse (and dq, dk, dv), one after the other, in one fresh process (imports excluded, as the
run's own wall_s excludes them); with --ranks P the run is `MPIEXEC -n P hpcattn run` and its
slowest rank counts, against the same one-process floor. The script writes one input with `hpcattn gen`, then
runs in alternating rounds: the floor, `hpcattn run` of this checkout and, with --old DIR,
`hpcattn run` of another checkout (PYTHONPATH=DIR, e.g. main before a change), each in its own
process on a warm page cache. It prints a Markdown table of medians (and JSON): wall_s of
each run, its ratio to the floor of the same round, and the run's own phases.

  python jobs/run_floor.py --dir /tmp/floor --seq 1048576 --heads 4 --mask window:16 --rounds 3
  python jobs/run_floor.py --dir /tmp/floor --seq 524288 --heads 8 --mask window:256 --old /work/main
  MPIEXEC="mpiexec --oversubscribe" python jobs/run_floor.py --dir /tmp/f --seq 4194304 --heads 8 --ranks 4 --backward

Only ratios measured in the same run mean anything on a shared machine.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import tables  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
PHASES = ("startup_s", "read_s", "check_s", "upload_s", "compute_s", "download_s", "write_s", "wait_s")

FLOOR = r"""
import sys, time, json, h5py, numpy as np
from mpi4py import MPI
import hpcattn
from hpcattn.gpu import device
inp, out, mask, backward = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
xp = device.xp(device.chosen_backend())
if xp is not np:
    device.setup(MPI.COMM_SELF)
host = lambda x: x.get() if xp is not np else x
t0 = time.perf_counter()
with h5py.File(inp, "r") as f:
    arrays = [f[n][...] for n in ("q", "k", "v", "do")[:4 if backward else 3]]
t1 = time.perf_counter()
q, k, v, *do = (xp.asarray(x) for x in arrays)
o, lse = hpcattn.attention(q, k, v, mask, MPI.COMM_SELF)
res = {"o": host(o), "lse": host(lse)}
if backward:
    grads = hpcattn.attention_backward(q, k, v, o, lse, do[0], mask, MPI.COMM_SELF)
    res.update(zip(("dq", "dk", "dv"), map(host, grads)))
t2 = time.perf_counter()
with h5py.File(out, "w") as f:
    for name, x in res.items():
        f[name] = x
t3 = time.perf_counter()
print(json.dumps({"read_s": t1 - t0, "compute_s": t2 - t1, "write_s": t3 - t2, "wall_s": t3 - t0}))
"""


def python(code_dir, *args, cwd, launch=()):
    """Run python ARGS with code_dir's hpcattn (from cwd, the data folder: `-m` and `-c` put the
    working folder first on sys.path), under the `launch` prefix (mpiexec -n P) when given."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code_dir), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([*launch, sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=3600)
    if res.returncode:
        raise SystemExit(f"failed: {args}\n{res.stderr[-3000:]}")
    return res.stdout


def floor(d, a):
    got = python(HERE, "-c", FLOOR, d / "in.h5", d / "floor.h5", a.mask, int(a.backward), cwd=d)
    (d / "floor.h5").unlink()
    return json.loads(got.strip().splitlines()[-1])


def run(code_dir, d, a):
    """`hpcattn run` on a.ranks ranks (through a.mpiexec when more than one); the slowest rank's
    times and the largest RSS."""
    import h5py
    out = d / "run.h5"
    launch = [*a.mpiexec.split(), "-n", str(a.ranks)] if a.ranks > 1 else []
    python(code_dir, "-m", "hpcattn", "run", d / "in.h5", out, "--mask", a.mask,
           *(["--backward"] if a.backward else []), cwd=d, launch=launch)
    with h5py.File(out, "r") as f:
        s = f["stats"]
        row = {key: float(s[key][...].max()) for key in ("wall_s", "compute_s", "io_s") + PHASES if key in s}
        row["max_rss"] = int(s["max_rss"][...].max())
    out.unlink()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--seq", type=int, default=1 << 20)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--mask", default="window:16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backward", action="store_true", help="also the gradients (gen writes do)")
    p.add_argument("--reuse", action="store_true", help="keep DIR/in.h5 when it exists (same shape asked)")
    p.add_argument("--ranks", type=int, default=1, help="ranks of `hpcattn run` (the floor stays one process)")
    p.add_argument("--mpiexec", default=os.environ.get("MPIEXEC", "mpiexec"),
                   help="launcher for --ranks > 1 (with its options; $MPIEXEC)")
    p.add_argument("--old", type=lambda x: Path(x).resolve(), help="another checkout to run as well (e.g. main before a change)")
    a = p.parse_args()
    a.dir = a.dir.resolve()
    a.dir.mkdir(parents=True, exist_ok=True)
    if not (a.reuse and (a.dir / "in.h5").exists()):
        python(HERE, "-m", "hpcattn", "gen", a.dir / "in.h5", "--seq", a.seq, "--heads", a.heads,
               "--head-dim", a.head_dim, "--dtype", a.dtype, "--seed", 1,
               *(["--backward"] if a.backward else []), cwd=a.dir)
    kinds = [("floor", None), ("run", HERE)] + ([("old run", a.old)] if a.old else [])
    got = {name: [] for name, _ in kinds}
    for r in range(a.rounds):
        for name, code in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate the order
            row = floor(a.dir, a) if code is None else run(code, a.dir, a)
            got[name].append(row)
            print(r, name, json.dumps(row), file=sys.stderr, flush=True)
    ratios = {name: [x["wall_s"] / f["wall_s"] for x, f in zip(got[name], got["floor"])] for name in got}
    print(f"N = {a.seq:,}, H = {a.heads}, D = {a.head_dim}, {a.dtype}, mask {a.mask}"
          f"{', with the backward' if a.backward else ''}, {a.ranks} rank(s) (the floor: one process), "
          f"{a.rounds} alternating rounds, medians (ratio: of the same round's floor)\n")
    tables.header("what", "wall s", "x floor", "read s", "check s", "upload s", "compute s", "download s",
                  "write s", "start-up s", "waiting s", "max RSS GiB")
    for name, rows in got.items():
        def med(key):
            vals = [x[key] for x in rows if key in x]
            return f"{statistics.median(vals):.2f}" if vals else "-"
        rss = [x["max_rss"] for x in rows if "max_rss" in x]
        tables.row(name, med("wall_s"), f"{statistics.median(ratios[name]):.2f} "
                   f"({min(ratios[name]):.2f}-{max(ratios[name]):.2f})", med("read_s"), med("check_s"),
                   med("upload_s"), med("compute_s"), med("download_s"), med("write_s"), med("startup_s"),
                   med("wait_s"),
                   f"{statistics.median(rss) / 2**30:.2f}" if rss else "-")
    print(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rounds": got, "ratios": ratios}))


if __name__ == "__main__":
    main()
