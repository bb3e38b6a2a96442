"""Ring attention: queries stay, K/V shards travel P-1 hops; each hop's partial is merged.

The next hop's transfer is posted before the current block is computed (plan-once double
buffers), so communication overlaps compute. Blocks the mask leaves empty travel but cost no
compute. Backward: K, V travel again, and the accumulating dK, dV follow them home.
"""
import time

import numpy as np

from ... import faults
from ...arrays import array_module
from ...cpu import grad
from ...profile import phase
from . import blocks
from .rings import RingPlan, circulate, circulate_accumulating


def flat_plan(comm):
    """The one-level ring over all ranks of comm in rank order."""
    return RingPlan(comm.rank, [0] * comm.size)


def forward(comm, shard, plan=None):
    """(o, lse) of this rank's queries over the whole sequence; collective over comm.

    K and V circulate along `plan` (default: the one-level ring)."""
    plan = plan or flat_plan(comm)
    B, Hkv, G, nq, D = shard.q.shape
    o = lse = None  # the first partial becomes the state
    qplan = blocks.query_runs(shard.qpos, shard.q_runs[comm.rank])
    keys = [shard.key_runs(q) for q in range(plan.P)]  # (starts, slices) of every owner's block

    def shapes(owner):
        return [(B, Hkv, shard.kv_rows(owner), D)] * 2

    xp = array_module(shard.k)
    kv = [xp.ascontiguousarray(shard.k), xp.ascontiguousarray(shard.v)]
    for _, owner, (kb, vb) in circulate(comm, plan, kv, shapes):
        faults.point("compute", comm.rank)
        t = time.perf_counter()
        starts, kruns = keys[owner]
        with phase("local"):
            o, lse, edges = blocks.forward(shard.q, shard.qpos, qplan, kb, vb, starts, kruns,
                                           shard.mask, shard.scale, o, lse, comm.progress)
        shard.stats["compute_s"] += time.perf_counter() - t
        shard.stats["edges"] += edges
    return (o, lse) if o is not None else blocks.new_state(shard.q)


def backward(comm, shard, o, lse, do, plan=None):
    """(dq, dk, dv) float32 of this rank's rows, given the forward's o (B, Hkv, G, nq, D), its
    full-row lse (B, Hkv, G, nq) and dO (like q); collective over comm."""
    plan = plan or flat_plan(comm)
    B, Hkv, G, nq, D = shard.q.shape
    nk = shard.k.shape[2]
    qplan = blocks.query_runs(shard.qpos, shard.q_runs[comm.rank])
    keys = [shard.key_runs(q) for q in range(plan.P)]
    delta = grad.row_delta(do, o)
    xp = array_module(shard.k)
    dq = xp.zeros((B, Hkv, G, nq, D), np.float32)
    dk, dv = xp.zeros((B, Hkv, nk, D), np.float32), xp.zeros((B, Hkv, nk, D), np.float32)

    def shapes(owner):
        return [(B, Hkv, shard.kv_rows(owner), D)] * 2

    kv = [xp.ascontiguousarray(shard.k), xp.ascontiguousarray(shard.v)]
    for _, owner, (kb, vb), acc in circulate_accumulating(comm, plan, kv, shapes, [dk, dv], shapes):
        t = time.perf_counter()
        starts, kruns = keys[owner]
        edges = blocks.backward(shard.q, shard.qpos, qplan, do, lse, delta, kb, vb, starts, kruns,
                                shard.mask, shard.scale, dq, *acc, progress=comm.progress)
        shard.stats["compute_s"] += time.perf_counter() - t
        shard.stats["edges"] += edges
    return dq, dk, dv
