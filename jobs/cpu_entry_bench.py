"""The CPU kernel alone beside the public entry point, in one process.

Rounds alternate: `local.attend` on head-major arrays (the kernel alone), then
`hpcattn.attention` on (1, N, 1, D) arrays with MPI.COMM_SELF (what a user calls). Prints each
side's median and best round in useful GFLOP/s (4 * edges * D) and the ratio of their medians.
HPCATTN_GATHER picks the kernel, as for `hpcattn bench` (which times FlexAttention against the
kernel alone).

    python jobs/cpu_entry_bench.py --seq 65536 --mask window:256 --rounds 7
"""
import argparse
import time

import numpy as np
from mpi4py import MPI

import hpcattn
from hpcattn.commands.bench import make_inputs
from hpcattn.cpu import cgather, local
from hpcattn.masks import parse


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--mask", default="window:256")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    n, D = a.seq, a.head_dim
    q, k, v = make_inputs(n, D, "float32", 0)
    mask, scale, pos = parse(a.mask, n_keys=n), 1 / np.sqrt(D), np.arange(n)
    qu, ku, vu = (x.reshape(1, n, 1, D) for x in (q, k, v))  # the user's (B, N, H, D) layout
    edges = local.attend(q, pos, k, v, 0, mask, scale)[2]
    sides = {"kernel": lambda: local.attend(q, pos, k, v, 0, mask, scale),
             "attention": lambda: hpcattn.attention(qu, ku, vu, mask=a.mask, comm=MPI.COMM_SELF)}
    for fn in sides.values():
        fn()  # first calls: thread pool, caches
    times = {name: [] for name in sides}
    for _ in range(a.rounds):
        for name, fn in sides.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print(f"N = {n:,}, {a.mask}, D = {D}, {cgather.describe(D)}, {a.rounds} alternating rounds")
    for name, ts in times.items():
        print(f"{name:>10}: median {np.median(ts):.4f} s ({4 * edges * D / np.median(ts) / 1e9:.1f} "
              f"useful GFLOP/s), best {min(ts):.4f} s")
    med = {name: np.median(ts) for name, ts in times.items()}
    print(f"attention / kernel time (median): {med['attention'] / med['kernel']:.3f}")


if __name__ == "__main__":
    main()
