"""BurstAttention: the ring with lse-only global state, tiled local kernels and a two-level
ring (ranks grouped by node; the inter-node hop runs during the intra-node hops).

Forward: K, V circulate along the two-level plan; the state per query row is (o, lse) only,
merged by the one merge. Backward keeps K, V, dK, dV home and moves Q, dO, lse, D = rowsum(dO*O)
(and the query positions) instead, with the accumulating dQ following them home: three
full-size tensors per hop instead of ring's four. A block's owner keeps its own dQ part, so the
relay starts at the second holder and its last hop is the one home (P-1 hops in all). With
grouped-query attention (G query heads per kv head) the moved tensors are G times larger than
ring's K, V: burst's backward saves bytes only when G = 1.
"""
import time

import numpy as np

from ...arrays import array_module, to_host
from ...cpu import grad
from . import blocks, ring
from .rings import RingPlan, circulate_accumulating


def plan(comm, shard):
    """The two-level ring: nodes from shared memory, or blocks of shard.ranks_per_node ranks."""
    return RingPlan(comm.rank, comm.node_ids(shard.ranks_per_node))


def forward(comm, shard):
    """(o, lse) of this rank's queries over the whole sequence; collective over comm."""
    p = plan(comm, shard)
    shard.stats["ring_levels"] = p.levels
    return ring.forward(comm, shard, p)


def backward(comm, shard, o, lse, do):
    """(dq, dk, dv) float32 of this rank's rows; see ring.backward for the arguments."""
    p = plan(comm, shard)
    B, Hkv, G, nq, D = shard.q.shape
    nk = shard.k.shape[2]
    starts, kruns = shard.key_runs(comm.rank)
    delta = grad.row_delta(do, o)
    xp = array_module(shard.k)
    dk, dv = xp.zeros((B, Hkv, nk, D), np.float32), xp.zeros((B, Hkv, nk, D), np.float32)
    dq = xp.zeros((B, Hkv, G, nq, D), np.float32)
    nq_of = [sum(r) for r in shard.q_runs]

    def shapes(owner):
        n = nq_of[owner]
        return [(B, Hkv, G, n, D)] * 2 + [(B, Hkv, G, n)] * 2 + [(n,)]

    def acc_shapes(owner):
        return [(B, Hkv, G, nq_of[owner], D)]

    # the positions travel with the rows, as device arrays on the GPU (one transport per hop)
    mine = [xp.ascontiguousarray(a) for a in (shard.q, do, lse.astype(np.float32, copy=False),
                                              delta.astype(np.float32, copy=False), xp.asarray(shard.qpos))]
    for _, owner, (qb, dob, lseb, deltab, qposb), acc in circulate_accumulating(comm, p, mine, shapes,
                                                                               [dq], acc_shapes):
        qposb = to_host(qposb)  # the arriving rows' positions: their plan is made per hop
        t = time.perf_counter()
        edges = blocks.backward(qb, qposb, blocks.query_runs(qposb, shard.q_runs[owner]), dob, lseb,
                                deltab, shard.k, shard.v, starts, kruns, shard.mask, shard.scale,
                                acc[0], dk, dv, comm.progress)
        shard.stats["compute_s"] += time.perf_counter() - t
        shard.stats["edges"] += edges
    return dq, dk, dv
