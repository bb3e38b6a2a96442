"""Decode benchmark: tree vs ring with few queries at the end of a long sequence.

For each N it writes one input with `hpcattn gen --queries NQ` (q_positions at the end), then
runs `mpiexec -n P hpcattn run --mask causal --variant tree|ring` and reads the per-rank stats
back from the output: latency = the slowest rank's attn_s (the attention call, no file I/O),
bytes = the largest per-rank bytes_sent / bytes_received. Prints a Markdown table and JSON.

  python jobs/decode_bench.py --dir /tmp/dec --seqs 1048576,8388608 --ranks 2,4,8 --repeat 3

BLAS runs one thread per rank (more only thrash when ranks already outnumber cores). A tiny
run of each variant first fills numba's on-disk cache, so no timed run pays a compilation.
With --repeat R each (N, P) runs its variants in turn R times; the table gives the median
(and the fastest) of the slowest rank's attn_s, and the load average seen before the runs.
--blas-core sets OPENBLAS_CORETYPE for every run (OpenBLAS picks its AVX2 Haswell kernels on
CPUs it does not know, e.g. AMD family 26; SkylakeX are its AVX-512 ones).
--kernel instead times, in this one process, the local kernel on one rank's share of each
variant (tree: all queries over N/P keys; ring: Nq/P queries over N/P keys, P times), best
of three: the compute both variants must do per rank, without MPI.
--transports mpi,host,nccl runs every variant once per transport (`run --transport`; with a GPU,
how device arrays travel): a transport the machine refuses (nccl where ranks share a GPU, mpi
without a CUDA-aware MPI) is reported as such, and the bytes of every transport must agree.
Only ratios measured in the same run mean anything on a shared, oversubscribed machine.
"""
import argparse
import json
import os
import statistics
import time
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import tables  # noqa: E402

BIN = Path(sys.executable).parent
MPIEXEC = os.environ.get("MPIEXEC") or (str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec")
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "OMPI_MCA_rmaps_base_oversubscribe": "true",
       "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one core per rank


class Failed(SystemExit):
    """A launched command failed; the message ends with its standard error."""


def hpcattn(P, *args):
    cmd = ([MPIEXEC, "-n", str(P)] if P else []) + [sys.executable, "-m", "hpcattn", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1800)
    if res.returncode:
        raise Failed(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return res.stdout


def refusal(err):
    """The line of a failed run's output that says why (hpcattn's own error, else the last)."""
    lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
    return next((ln for ln in lines if "hpcattn: error" in ln), lines[-1] if lines else "?")[:300]


def measure(P, inp, out, mask, variant, extra=()):
    """One run; the slowest rank's attention time and the largest per-rank traffic."""
    load = os.getloadavg()[0]
    hpcattn(P, "run", inp, out, "--mask", mask, "--variant", variant, *extra)
    with h5py.File(out, "r") as f:
        s = {k: f["stats"][k][...] for k in f["stats"]}
        row = {"variant": str(f.attrs["variant"]), "transport": str(f.attrs["transport"]),
               "backend": str(f.attrs["backend"]), "ranks": P, "attn_s": float(s["attn_s"].max()),
               "compute_s": float(s["compute_s"].max()), "comm_s": float(s["comm_s"].max()),
               "bytes_sent": int(s["bytes_sent"].max()), "bytes_received": int(s["bytes_received"].max()),
               "load_before": load}
    os.remove(out)
    return row


def label_of(variant, extra):
    """A run's name in the table: the variant, its simulated node size, its transport."""
    opts = dict(zip(extra[::2], extra[1::2]))
    return " ".join([variant, *([f"rpn={opts['--ranks-per-node']}"] if "--ranks-per-node" in opts else []),
                     *([opts["--transport"]] if "--transport" in opts else [])])


def kernel_times(N, P, a):
    """Seconds of the local kernel for one rank's tree share and its ring shares (P hops)."""
    from hpcattn.cpu import local
    from hpcattn.masks import parse
    rng = np.random.default_rng(1)
    G, n = a.heads // a.kv_heads, N // P
    k, v = (rng.standard_normal((1, a.kv_heads, n, a.head_dim)).astype(a.dtype) for _ in range(2))
    q = rng.standard_normal((1, a.kv_heads, G, a.queries, a.head_dim)).astype(a.dtype)
    qpos, mask, scale = np.arange(N - a.queries, N), parse("causal"), a.head_dim ** -0.5
    nq = -(-a.queries // P)  # the largest ring shard of the queries

    def best(fn):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)
    tree = best(lambda: local.attend(q, qpos, k, v, 0, mask, scale))
    hop = best(lambda: local.attend(q[:, :, :, :nq], qpos[:nq], k, v, 0, mask, scale))
    return tree, P * hop


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--seqs", default="1048576,8388608")
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--ranks-per-node", type=int, help="also run tree with simulated nodes")
    p.add_argument("--repeat", type=int, default=1, help="runs of each variant per (N, P)")
    p.add_argument("--blas-core", help="OPENBLAS_CORETYPE for every launched run (default: OpenBLAS's choice; "
                   "for --kernel set it in the environment)")
    p.add_argument("--kernel", action="store_true", help="time the per-rank kernel work only (no MPI)")
    p.add_argument("--transports", help="comma-separated run --transport values, each run for every "
                   "variant (default: none passed, i.e. auto)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.blas_core:
        ENV["OPENBLAS_CORETYPE"] = a.blas_core
    if a.kernel:  # this process: set BLAS threads before the kernel's first product
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
        os.environ["HPCATTN_THREADS"] = "1"
        tables.header("N", "P", "tree kernel s / rank", "ring kernel s / rank (P hops)", "ring / tree")
        for N in map(int, a.seqs.split(",")):
            for P in map(int, a.ranks.split(",")):
                tree, ring = kernel_times(N, P, a)
                tables.row(f"{N:,}", P, f"{tree:.3f}", f"{ring:.3f}", f"{ring / tree:.2f}")
        return
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    warm = d / "warm.h5"
    hpcattn(0, "gen", warm, "--seq", 4096, "--queries", 4, "--heads", 2, "--kv-heads", 1, "--head-dim",
            a.head_dim, "--dtype", a.dtype, "--seed", 1)
    for variant in ("tree", "ring"):
        measure(2, warm, d / "out.h5", "causal", variant)
    rows, refused = [], {}
    for N in map(int, a.seqs.split(",")):
        inp = d / f"decode_{N}.h5"
        if not inp.exists():
            hpcattn(0, "gen", inp, "--seq", N, "--queries", a.queries, "--heads", a.heads, "--kv-heads",
                    a.kv_heads, "--head-dim", a.head_dim, "--dtype", a.dtype, "--seed", 1)
        for P in map(int, a.ranks.split(",")):
            runs = [("tree", ()), ("ring", ())]
            if a.ranks_per_node and 1 < a.ranks_per_node < P:
                runs.insert(1, ("tree", ("--ranks-per-node", a.ranks_per_node)))
            if a.transports:
                runs = [(v, (*extra, "--transport", t)) for t in a.transports.split(",") for v, extra in runs]
            got = {}
            for rep in range(a.repeat):
                for variant, extra in runs:
                    label = label_of(variant, extra)
                    if (label, P) in refused:
                        continue
                    try:
                        r = measure(P, inp, d / "out.h5", "causal", variant, extra)
                    except Failed as e:
                        if "--transport" not in extra:
                            raise
                        refused[label, P] = refusal(e)
                        print(f"{label} at P={P}: refused: {refused[label, P]}", file=sys.stderr, flush=True)
                        continue
                    r["requested"] = dict(zip(extra[::2], extra[1::2])).get("--transport", "auto")
                    print(json.dumps({**r, "N": N, "label": label}), file=sys.stderr, flush=True)
                    got.setdefault(label, []).append(r)
            for label, rs in got.items():
                times = [r["attn_s"] for r in rs]
                row = {**rs[0], "N": N, "label": label, "attn_s": statistics.median(times),
                       "attn_s_min": min(times), "attn_s_all": times,
                       "compute_s": statistics.median(r["compute_s"] for r in rs),
                       "comm_s": statistics.median(r["comm_s"] for r in rs),
                       "load_before": max(r["load_before"] for r in rs)}
                assert all((r["bytes_sent"], r["bytes_received"]) == (row["bytes_sent"], row["bytes_received"])
                           for r in rs)  # bytes are exact: equal in every repeat
                rows.append(row)
            here = [r for r in rows if r["N"] == N and r["ranks"] == P]
            for r in here:
                ring = next((x for x in here if x["variant"] == "ring" and x["requested"] == r["requested"]), None)
                r["ring_over_this"] = ring["attn_s"] / r["attn_s"] if ring else float("nan")
                r["ring_over_this_min"] = ring["attn_s_min"] / r["attn_s_min"] if ring else float("nan")
            for v in ("tree", "ring"):  # bytes are the algorithm's: the same by every transport
                sizes = {(r["bytes_sent"], r["bytes_received"]) for r in here if r["label"].split()[0] == v
                         and "rpn=" not in r["label"]}
                assert len(sizes) <= 1, (N, P, v, sizes)
    tables.header("N", "P", "variant", "latency s (median)", "fastest", "ring / this (median)", "(fastest)",
           "compute s", "comm s", "max bytes sent/rank", "max bytes recv/rank", "load before")
    for r in rows:
        tables.row(f"{r['N']:,}", r["ranks"], r["label"], f"{r['attn_s']:.3f}", f"{r['attn_s_min']:.3f}",
            f"{r['ring_over_this']:.1f}x", f"{r['ring_over_this_min']:.1f}x", f"{r['compute_s']:.2f}",
            f"{r['comm_s']:.2f}", f"{r['bytes_sent']:,}", f"{r['bytes_received']:,}", f"{r['load_before']:.1f}")
    for (label, P), why in refused.items():
        print(f"{label} at P={P}: refused: {why}")
    tables.save_json(a.json, rows + [{"label": k, "ranks": P, "refused": v} for (k, P), v in refused.items()])


if __name__ == "__main__":
    main()
