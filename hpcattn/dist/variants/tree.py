"""Tree attention for decoding (Shyam et al., 2024): queries replicated, K/V stay sharded.

Every rank gathers the (few) query rows of all ranks, attends them to its own K/V shard with
the local kernel, and the partial (o, lse) states combine across ranks by Allreduce, so each
rank ends with every row and keeps its own slice. Traffic depends on the number of queries,
not on the sequence length.

Two combines (DESIGN.md section 6), chosen by `method`:
- "packed": one Allreduce of rows [lse, o] with a user-defined op that is the shared merge;
- "three": Allreduce(MAX) of lse, then Allreduce(SUM) of exp(lse - m)·o and of exp(lse - m).
With more than one node (real, or simulated by the communicator's ranks_per_node) and more
than one rank per node, the topology-aware form reduces inside each node, Allreduces among node
leaders and broadcasts inside the node.
"""
import functools
import time

import numpy as np

from ... import faults
from ...arrays import array_module
from ...cpu import grad, local
from ...merge import empty_state, merge
from ...profile import phase
from ..comm import UserOp

METHODS = ("packed", "three")
DEFAULT_METHOD = "packed"  # faster in jobs/tree_combine_bench.py (docs/benchmarks-log.md, "Tree combine")


def _merge_rows(a, b):
    """b <- merge(a, b) on packed rows [lse, o_0 .. o_{D-1}] (the UserOp body)."""
    o, lse = merge(a[:, 1:], a[:, 0], b[:, 1:], b[:, 0])
    b[:, 0], b[:, 1:] = lse, o


def hierarchical(comm, ranks_per_node=None):
    """True when the topology-aware combine applies: several nodes, some with several ranks.
    Nodes are simulated ones of ranks_per_node consecutive ranks when given (collective
    otherwise)."""
    if comm.size == 1:
        return False
    nodes = -(-comm.size // ranks_per_node) if ranks_per_node else comm.nodes()
    return 1 < nodes < comm.size


def _allreduce(comm, buf, op, topo, ranks_per_node):
    """Allreduce, flat or as node reduce -> leaders' allreduce -> node broadcast."""
    if not topo:
        return comm.allreduce(buf, op)
    node, leaders = comm.node_groups(ranks_per_node)
    out = node.reduce(buf, op, root=0)
    if leaders is not None:
        out = leaders.allreduce(out, op)
    return node.bcast(out if out is not None else array_module(buf).empty_like(buf), root=0)


def combine(comm, o, lse, method=DEFAULT_METHOD, ranks_per_node=None, topo=None):
    """Merge every rank's partial (o, lse) of the same rows; every rank gets the result.

    o (..., n, D) float32, lse (..., n) float32, the same shape on every rank. Collective.
    topo: use the topology-aware form (default: when `hierarchical(comm, ranks_per_node)`).
    """
    if comm.size == 1:
        return o, lse
    topo = hierarchical(comm, ranks_per_node) if topo is None else topo
    reduce = functools.partial(_allreduce, comm, topo=topo, ranks_per_node=ranks_per_node)
    D = o.shape[-1]
    xp = array_module(o)
    if method == "packed":  # the UserOp is NumPy: device rows go through host memory (comm.py)
        buf = xp.concatenate([lse[..., None], o], axis=-1).astype(np.float32, copy=False)
        out = reduce(xp.ascontiguousarray(buf), UserOp(_merge_rows, D + 1))
        return xp.ascontiguousarray(out[..., 1:]), xp.ascontiguousarray(out[..., 0])
    if method != "three":
        raise ValueError(f"unknown tree combine {method!r}; expected one of {METHODS}")
    m = reduce(xp.ascontiguousarray(lse, dtype=np.float32), "max")
    ref = xp.where(xp.isneginf(m), 0, m)
    w = xp.exp(lse - ref)
    num = reduce(xp.ascontiguousarray(w[..., None] * o, dtype=np.float32), "sum")
    den = reduce(xp.ascontiguousarray(w, dtype=np.float32), "sum")
    o = num / xp.where(den > 0, den, 1)[..., None]
    with np.errstate(divide="ignore"):
        lse = (ref + xp.log(den)).astype(np.float32)
    return o.astype(np.float32, copy=False), lse


def replicate(comm, q, qpos, rows):
    """Every rank's query rows, in rank order: q (B, Hkv, G, nq_r, D) -> (B, Hkv, G, sum, D),
    qpos (nq_r,) -> (sum,). rows: (P,) the nq_r of every rank. Collective."""
    if comm.size == 1:
        return q, qpos
    xp = array_module(q)
    qt = comm.allgather_rows(xp.moveaxis(q, 3, 0), rows)
    return xp.ascontiguousarray(xp.moveaxis(qt, 0, 3)), comm.allgather_rows(qpos, rows)


def partial(q, qpos, shard, rank):
    """(o, lse, edges) of rows q over this rank's own keys (one or more runs: any layout)."""
    o = lse = None
    edges = 0
    for start, rows in zip(*shard.key_runs(rank)):
        with phase("local"):
            po, pl, n = local.attend(q, qpos, shard.k[:, :, rows], shard.v[:, :, rows], start,
                                     shard.mask, shard.scale)
        with phase("merge"):
            o, lse = (po, pl) if o is None else merge(o, lse, po, pl)
        edges += n
    if o is None:
        o, lse = empty_state(array_module(q), q.shape[:-1], q.shape[-1])
    return o, lse, edges


def forward(comm, shard, method=DEFAULT_METHOD):
    """(o, lse) of this rank's queries over the whole sequence; collective over comm."""
    r = comm.rank
    q_off = shard.q_offsets
    q, qpos = replicate(comm, shard.q, shard.qpos, np.diff(q_off))
    faults.point("compute", r)
    t = time.perf_counter()
    o, lse, edges = partial(q, qpos, shard, r)
    shard.stats["compute_s"] += time.perf_counter() - t
    shard.stats["edges"] += edges
    o, lse = combine(comm, o, lse, method, shard.ranks_per_node)
    a, b = int(q_off[r]), int(q_off[r + 1])
    return o[..., a:b, :], lse[..., a:b]


def backward_rows(comm, shard, q, qpos, do, lse, delta, rows, dk, dv):
    """Backward of query rows replicated tree-style: every rank's rows q, do (B, Hkv, G, n_r, D),
    lse, delta (B, Hkv, G, n_r) are gathered (one packed allgather), each rank adds their dK, dV
    over its own keys into dk, dv and computes their dQ partial, and the partials are summed
    by Allreduce. rows: (P,) the n_r of every rank. Returns this rank's dq (float32)."""
    r, D = comm.rank, q.shape[-1]
    xp, q_dtype, do_dtype = array_module(q), q.dtype, do.dtype
    pack = xp.concatenate([q.astype(np.float32), do.astype(np.float32), lse[..., None].astype(np.float32),
                           delta[..., None].astype(np.float32)], axis=-1)
    pack, qpos = replicate(comm, pack, qpos, rows)
    # q, dO back in the input dtype (exact: they were widened): the GPU kernel takes one dtype
    q, do = pack[..., :D].astype(q_dtype), pack[..., D:2 * D].astype(do_dtype)
    lse, delta = pack[..., 2 * D], pack[..., 2 * D + 1]
    dq = xp.zeros(q.shape, np.float32)
    t = time.perf_counter()
    for start, sl in zip(*shard.key_runs(r)):
        shard.stats["edges"] += grad.backward(q, qpos, shard.k[:, :, sl], shard.v[:, :, sl], start,
                                              shard.mask, shard.scale, do, lse, delta, dq,
                                              dk[:, :, sl], dv[:, :, sl])[3]
    shard.stats["compute_s"] += time.perf_counter() - t
    dq = comm.allreduce(xp.ascontiguousarray(dq), "sum") if comm.size > 1 else dq
    a = int(np.sum(rows[:r]))
    return dq[:, :, :, a:a + int(rows[r])]


def backward(comm, shard, o, lse, do):
    """(dq, dk, dv) float32 of this rank's rows, given the forward's o (B, Hkv, G, nq, D), its
    full-row lse (B, Hkv, G, nq) and dO (like q); collective over comm. Bytes depend on the
    number of queries only: the packed gather of q, dO, lse, D and the Allreduce of dQ."""
    B, Hkv, G, nq, D = shard.q.shape
    nk = shard.k.shape[2]
    xp = array_module(shard.k)
    dk, dv = xp.zeros((B, Hkv, nk, D), np.float32), xp.zeros((B, Hkv, nk, D), np.float32)
    dq = backward_rows(comm, shard, shard.q, shard.qpos, do, lse, grad.row_delta(do, o),
                       np.diff(shard.q_offsets), dk, dv)
    return dq, dk, dv
