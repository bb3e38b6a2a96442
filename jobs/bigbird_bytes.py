"""BigBird bytes: `sparse` vs ring vs the exact number of key rows reached.

Needs the `random` mask term. In-process under MPI:

  OPENBLAS_NUM_THREADS=1 mpiexec -n 4 python jobs/bigbird_bytes.py --seq 32768 \
      --mask window:64+global:8+random:3

Each rank runs `sparse` on its even shard and reports its bytes received (everything the comm
layer counted); ring's per-rank bytes are its exact formula (K and V of the P-1 other shards,
as tests/distributed/test_tree_sparse.py asserts). Rows reached: the keys outside the rank's shard that its rows
(those not handled tree-style) have an edge to, from the mask's own definition: the window
and global spans plus each row's random columns (Mask.columns).
"""
import argparse
import pickle

import numpy as np
from mpi4py import MPI

import hpcattn
from hpcattn import Comm
from hpcattn.masks import Global, Window, parse
from hpcattn.partition import even_offsets
from hpcattn.dist.variants import sparse

import tables  # jobs/tables.py (jobs/ is on sys.path when this runs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--mask", default="window:64+global:8+random:3")
    p.add_argument("--head-dim", type=int, default=64)
    a = p.parse_args()
    world = MPI.COMM_WORLD
    P, r, N, D = world.size, world.rank, a.seq, a.head_dim
    mask = parse(a.mask, n_keys=N)
    off = even_offsets(N, P)
    lo, hi = int(off[r]), int(off[r + 1])
    rng = np.random.default_rng(r)
    q, k, v = (rng.standard_normal((1, hi - lo, 1, D)).astype(np.float32) for _ in range(3))
    comm = Comm(world)
    hpcattn.attention(q, k, v, mask=mask, comm=comm, variant="sparse")
    sizes = [(int(off[i + 1] - off[i]),) * 2 for i in range(P)]
    control = sum(len(pickle.dumps(s)) for i, s in enumerate(sizes) if i != r)
    row = 2 * D * 4
    ring = (N - (hi - lo)) * row + control
    rows = np.arange(lo, hi)
    wide = sparse.wide_rows(mask, rows)
    rows = rows if wide is None else rows[~wide]
    need = np.zeros(N, dtype=bool)
    w = max((t.w for t in mask.terms if isinstance(t, Window)), default=0)
    g = max((t.g for t in mask.terms if isinstance(t, Global)), default=0)
    if len(rows):
        need[max(0, rows.min() - w):min(N, rows.max() + w + 1)] = True
        need[:g] = True
        listed = mask.subset(tuple({type(t) for t in sparse.explicit_terms(mask)}))
        need[listed.columns(rows, 0, N)[1]] = True
    need[lo:hi] = False
    got = world.gather((comm.bytes_received, ring, int(need.sum()), int(wide.sum()) if wide is not None else 0))
    if r == 0:
        print(f"`{a.mask}`, N = {N:,}, P = {P}, D = {D}, float32, one kv head\n")
        tables.header("rank", "sparse bytes recv", "ring bytes recv", "sparse / ring", "rows reached outside shard",
               "their bytes", "sparse / that", "rows done tree-style")
        for i, (s, rg, n, t) in enumerate(got):
            tables.row(i, f"{s:,}", f"{rg:,}", f"{100 * s / rg:.2f}%", f"{n:,}", f"{n * row:,}",
                       f"{s / (n * row):.3f}", t)
    comm.free()


if __name__ == "__main__":
    main()
