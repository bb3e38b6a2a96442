"""Tree combine micro-benchmark: one packed Allreduce with the merge as a user op
vs three Allreduces (MAX, SUM, SUM), flat and topology-aware (simulated nodes).

  OPENBLAS_NUM_THREADS=1 mpiexec -n 4 python jobs/tree_combine_bench.py --queries 16 --heads 8

Times the combine alone on random partials (the same on every method), median and best of
--repeat calls after a barrier, slowest rank (the best shows the cost without interference); bytes are the comm layer's per-rank counts.
"""
import argparse
import time

import numpy as np
from mpi4py import MPI

from hpcattn import Comm
from hpcattn.dist.variants import tree

import tables  # jobs/tables.py (jobs/ is on sys.path when this runs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--ranks-per-node", type=int, default=2)
    a = p.parse_args()
    world = MPI.COMM_WORLD
    rng = np.random.default_rng(world.rank)
    shape = (1, a.heads, 1, a.queries)
    o = rng.standard_normal((*shape, a.head_dim)).astype(np.float32)
    lse = rng.standard_normal(shape).astype(np.float32)
    rows = []
    for rpn in (None, a.ranks_per_node):
        comm = Comm(world)
        topo = tree.hierarchical(comm, rpn)
        if rpn and not topo:
            comm.free()
            continue
        for method in tree.METHODS:
            tree.combine(comm, o, lse, method, rpn, topo)  # warm-up: creates ops and node groups
            sent0 = comm.bytes_sent
            times = []
            for _ in range(a.repeat):
                world.Barrier()
                t = time.perf_counter()
                tree.combine(comm, o, lse, method, rpn, topo)
                times.append(time.perf_counter() - t)
            med = world.allreduce(float(np.median(times)), MPI.MAX)
            best = world.allreduce(float(np.min(times)), MPI.MAX)
            sent = world.allreduce((comm.bytes_sent - sent0) // a.repeat, MPI.MAX)
            rows.append((method, "node-aware rpn=%d" % rpn if topo else "flat", med, best, sent))
        comm.free()
    if world.rank == 0:
        print(f"P={world.size}, rows {a.queries} x heads {a.heads} x D {a.head_dim}, median of {a.repeat}")
        tables.header("P", "combine", "form", "median us (slowest rank)", "best us (slowest rank)",
               "max bytes sent/rank per call")
        for method, form, med, best, sent in rows:
            tables.row(world.size, method, form, f"{med * 1e6:.0f}", f"{best * 1e6:.0f}", f"{sent:,}")


if __name__ == "__main__":
    main()
