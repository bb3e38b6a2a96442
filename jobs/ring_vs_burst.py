#!/usr/bin/env python3
"""Ring vs burst at increasing rank counts: time, bytes per rank, parallel efficiency.

Generates one input (with `do` when --backward), runs `hpcattn run` for every (ranks, variant)
under mpiexec, reads each output's `stats` group back and prints one table (markdown) plus
a JSON file. Efficiency is strong scaling against the same variant on the fewest ranks:
E(P) = T(P0) * P0 / (T(P) * P), T = the slowest rank's wall_s of the run; the same with the
slowest rank's CPU seconds (cpu_s) shows the algorithm's efficiency on a host with fewer free
cores than ranks. Only ratios taken in one invocation are comparable; byte counts are exact.

  python jobs/ring_vs_burst.py --seq 8192 --heads 4 --mask causal --backward --ranks 1 2 4
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py

import tables  # jobs/tables.py (jobs/ is on sys.path when this runs)

BIN = Path(sys.executable).parent
ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "OMPI_MCA_rmaps_base_oversubscribe": "true",
       # one BLAS thread per rank, so P ranks use P cores (strong scaling, no thread oversubscription)
       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--mask", default="causal")
    p.add_argument("--backward", action="store_true")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--ranks-per-node", type=int, help="burst's simulated node size (default: shared memory)")
    p.add_argument("--variants", nargs="+", default=["ring", "burst"])
    p.add_argument("--dir", default="runs/ring_vs_burst", help="work directory (input, outputs, results.json)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    return p.parse_args(argv)


def run_one(args, inp, out, ranks, variant):
    cmd = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "hpcattn", "run", str(inp), str(out),
           "--mask", args.mask, "--variant", variant]
    if args.backward:
        cmd.append("--backward")
    if args.ranks_per_node and variant == "burst":
        cmd += ["--ranks-per-node", str(args.ranks_per_node)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env={**os.environ, **ENV})
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr}")
    launch_s = time.perf_counter() - t
    with h5py.File(out, "r") as f:
        s = {k: f["stats"][k][...] for k in f["stats"]}
        levels = [int(x) for x in f.attrs.get("ring_levels", [])]
    os.remove(out)
    edges = s["edges"] + s.get("edges_backward", 0)
    bwd = int(s["bytes_sent_backward"].max()) if "bytes_sent_backward" in s else 0
    return {"ranks": ranks, "variant": variant, "wall_s": float(s["wall_s"].max()),
            "compute_s": float(s["compute_s"].max()), "comm_s": float(s["comm_s"].max()),
            "io_s": float(s["io_s"].max()), "launch_s": launch_s, "cpu_s": float(s["cpu_s"].max()),
            "bytes_sent_max": int(s["bytes_sent"].max()), "bytes_sent_total": int(s["bytes_sent"].sum()),
            "bytes_sent_forward_max": int((s["bytes_sent"] - s.get("bytes_sent_backward", 0)).max()),
            "bytes_sent_backward_max": bwd,
            "edge_balance": float(edges.max() / edges.mean()) if edges.mean() else 1.0,
            "ring_levels": levels}


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    inp = work / "in.h5"
    gen = [sys.executable, "-m", "hpcattn", "gen", str(inp), "--seq", str(args.seq), "--heads", str(args.heads),
           "--head-dim", str(args.head_dim), "--dtype", args.dtype, "--seed", "1"]
    if args.kv_heads:
        gen += ["--kv-heads", str(args.kv_heads)]
    if args.backward:
        gen.append("--backward")
    subprocess.run(gen, check=True)
    rows = [run_one(args, inp, work / f"out-{v}-{p}.h5", p, v) for p in args.ranks for v in args.variants]
    base = {v: next(r for r in rows if r["variant"] == v) for v in args.variants}
    for r in rows:
        b = base[r["variant"]]
        r["efficiency"] = b["wall_s"] * b["ranks"] / (r["wall_s"] * r["ranks"])
        r["cpu_efficiency"] = b["cpu_s"] * b["ranks"] / (r["cpu_s"] * r["ranks"])
        ring = next((x for x in rows if x["variant"] == "ring" and x["ranks"] == r["ranks"]), None)
        for phase in ("forward", "backward"):
            key = f"bytes_sent_{phase}_max"
            r[f"{phase}_vs_ring"] = r[key] / ring[key] if ring and ring[key] else None
    print(f"\nN={args.seq} H={args.heads} Hkv={args.kv_heads or args.heads} D={args.head_dim} {args.dtype} "
          f"mask={args.mask} backward={args.backward} ranks-per-node={args.ranks_per_node}")
    tables.header("ranks", "variant", "wall s", "compute s", "comm s", "fwd MiB sent/rank", "vs ring",
           "bwd MiB sent/rank", "vs ring", "efficiency", "cpu s", "cpu efficiency", "edge balance")

    def ratio(x):
        return f"{x:.3f}" if x is not None else "-"
    for r in rows:
        tables.row(r["ranks"], r["variant"], f"{r['wall_s']:.2f}", f"{r['compute_s']:.2f}", f"{r['comm_s']:.2f}",
            f"{r['bytes_sent_forward_max'] / 2**20:.2f}", ratio(r["forward_vs_ring"]),
            f"{r['bytes_sent_backward_max'] / 2**20:.2f}", ratio(r["backward_vs_ring"]),
            f"{r['efficiency']:.2f}", f"{r['cpu_s']:.2f}", f"{r['cpu_efficiency']:.2f}", f"{r['edge_balance']:.3f}")
    tables.save_json(work / "results.json", {"args": vars(args), "runs": rows})
    os.remove(inp)


if __name__ == "__main__":
    main()
