"""Mask-aware sparse distribution (ours): a rank receives only the key rows its queries reach.

From the mask alone each rank works out the key intervals its query rows can reach
(`Mask.spans` per query tile), cuts them by owner rank and asks each owner for exactly those
rows (one Alltoallv of intervals, one Alltoallv of K/V rows). For a window this is a halo from
each neighbour; for global tokens, every rank's request to rank 0 for keys [0, G) forms one
small all-gather; for listed terms (random, csr) the exact columns (`Mask.columns`, when the
mask offers it). The rows then go through the same local kernel, one contiguous segment at a
time, and the segment partials merge with the shared merge. (Isolated listed columns make
one segment each: work-optimal compute for them needs a kernel entry that takes key
positions instead of one contiguous block; the exchange itself is exact already.)

Rows whose edges reach the whole sequence (queries i < G of a non-causal `global:G`, or a
non-causal `full` term) would need every key; instead they are handled as in decoding: the
few such rows are replicated and their partials combined across ranks (variants/tree.py).
"""
import time

import numpy as np

from ... import faults
from ...arrays import array_module
from ...cpu import grad, local
from ...merge import empty_state, merge
from ...profile import phase
from . import tree

Q_TILE = local.Q_TILE


def wide_rows(mask, qpos):
    """Bool (nq,) of rows whose edges reach the whole sequence, or None when the mask has no
    such term (then no rank has any: the mask alone decides, so every rank agrees)."""
    if mask.causal:
        return None
    if mask.dense:
        return np.ones(len(qpos), dtype=bool)
    g = mask.global_rows()
    return None if g == 0 else np.asarray(qpos) < g


def union(intervals):
    """Sorted disjoint (m, 2) int64 intervals covering the given [a, b) pairs (touching ones
    joined); empty pairs dropped."""
    a = np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
    a = a[a[:, 0] < a[:, 1]]
    if not len(a):
        return a
    a = a[np.argsort(a[:, 0], kind="stable")]
    ends = np.maximum.accumulate(a[:, 1])
    new = np.ones(len(a), dtype=bool)
    new[1:] = a[1:, 0] > ends[:-1]
    first = np.flatnonzero(new)
    return np.stack([a[first, 0], np.maximum.reduceat(a[:, 1], first)], axis=1)


def explicit_terms(mask):
    """The mask's terms that list their columns row by row (random, csr: `columns(qpos, k0,
    k1)`) rather than bounding them by spans."""
    return [t for t in mask.terms if t.listed]


def runs_of(keys):
    """Sorted unique key positions -> (m, 2) intervals of their consecutive runs."""
    keys = np.unique(np.asarray(keys, dtype=np.int64))
    if not len(keys):
        return np.empty((0, 2), dtype=np.int64)
    cut = np.flatnonzero(np.diff(keys) != 1) + 1
    first = np.concatenate([[0], cut])
    last = np.concatenate([cut, [len(keys)]]) - 1
    return np.stack([keys[first], keys[last] + 1], axis=1)


def reach(mask, qpos, n):
    """Sorted disjoint key intervals (m, 2) of [0, n) holding every edge of the rows at qpos.

    Span terms: queries are sorted and cut into tiles and each tile asks the mask for its
    spans, so a shard of consecutive positions gets exactly its halo. Listed terms (random,
    csr): their exact columns (Mask.columns), one interval per run of consecutive keys.
    """
    pos = np.sort(np.asarray(qpos, dtype=np.int64))
    ivs = []
    if explicit_terms(mask):
        cols = mask.subset(lambda t: t.listed).columns(pos, 0, n)[1]
        ivs.extend(runs_of(cols).tolist())
        mask = mask.subset(lambda t: t.listed, exclude=True)
    if mask is not None:
        ivs.extend(iv for t0 in range(0, len(pos), Q_TILE)
                   for iv in mask.spans(int(pos[t0]), int(pos[min(len(pos), t0 + Q_TILE) - 1]), 0, n))
    return union(ivs)


def pieces(kv_runs):
    """Every rank's key runs as one (m, 4) int64 table [start, stop, owner, first local row],
    sorted by start (any layout: contiguous shards, zigzag chunks)."""
    rows = []
    for owner, runs in enumerate(kv_runs):
        first = 0
        for a, b in runs:
            if b > a:
                rows.append((a, b, owner, first))
                first += b - a
    table = np.array(rows, dtype=np.int64).reshape(-1, 4)
    return table[np.argsort(table[:, 0], kind="stable")]


def requests(intervals, table, rank, ranks):
    """Cut intervals by owner: (reqs (k, 2) int64 ordered by owner, then position; counts
    (ranks,)), leaving out this rank's own keys."""
    lo = np.maximum(intervals[None, :, 0], table[:, 0, None])
    hi = np.minimum(intervals[None, :, 1], table[:, 1, None])
    keep = (lo < hi) & (table[:, 2, None] != rank)
    piece, iv = np.nonzero(keep)  # piece-major: ascending positions
    owner = table[piece, 2]
    order = np.argsort(owner, kind="stable")
    reqs = np.stack([lo[piece, iv], hi[piece, iv]], axis=1)[order]
    return reqs.reshape(-1, 2), np.bincount(owner, minlength=ranks).astype(np.int64)


def local_rows(asked, table, rank):
    """Local row indices of this rank's keys in the asked global intervals (checked: a peer's
    request outside this rank's keys is a bug, not data to trust)."""
    own = table[table[:, 2] == rank]
    j = np.searchsorted(own[:, 0], asked[:, 0], side="right") - 1
    if len(asked) and ((j < 0).any() or (asked[:, 1] > own[np.maximum(j, 0), 1]).any()):
        raise RuntimeError(f"rank {rank} was asked for keys it does not hold")
    shift = own[j, 3] - own[j, 0] if len(asked) else np.zeros(0, dtype=np.int64)
    return expand(asked + shift[:, None])


def expand(intervals):
    """All positions of sorted intervals (m, 2), concatenated: vectorised arange per interval."""
    lengths = intervals[:, 1] - intervals[:, 0]
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(intervals[:, 0] - starts, lengths)


def _per_group(values, counts):
    """Sums of consecutive groups of `values` with the given sizes (empty groups give 0)."""
    ends = np.cumsum(counts)
    c = np.concatenate([[0], np.cumsum(values)])
    return c[ends] - c[ends - counts]


class Halo:
    """One rank's exchange plan (collective to build): the rows it asks other ranks for and
    the rows it serves them. `gather` brings the asked K/V rows in; `scatter_add` sends
    gradient rows for them back to their owners, who add them into their own dK, dV.

    Bytes: the interval requests (16 per interval) and the count exchange once, then the rows
    themselves per transfer (K, V in the input dtype; dK, dV in float32).
    """

    def __init__(self, comm, table, intervals):
        r = comm.rank
        reqs, counts = requests(intervals, table, r, comm.size)
        asked, asked_counts = comm.alltoallv(reqs, counts)
        self.comm = comm
        self.positions = expand(reqs)  # of the received rows: by owner, then position
        self.recv_rows = _per_group(reqs[:, 1] - reqs[:, 0], counts)
        self.serve = local_rows(asked, table, r)  # local rows served, by requester
        self.serve_rows = _per_group(asked[:, 1] - asked[:, 0], asked_counts)

    def _swap(self, arrays, rows, send_rows, recv_rows):
        """Alltoallv of row `rows` of several (B, Hkv, n, D) arrays, packed row-major."""
        xp = array_module(arrays[0])
        pack = xp.moveaxis(xp.stack([a[:, :, rows] for a in arrays]), 3, 0)  # (m, A, B, Hkv, D)
        got, _ = self.comm.alltoallv(pack, send_rows, recv_rows)
        return list(xp.moveaxis(got, 0, 3))  # A x (B, Hkv, M, D)

    def gather(self, k, v):
        """(k, v) (B, Hkv, M, D) of the asked rows, in `positions` order."""
        return self._swap([k, v], self.serve, self.serve_rows, self.recv_rows)

    def scatter_add(self, dk_far, dv_far, dk, dv):
        """Send dK, dV of the received rows to their owners; add what comes back into dk, dv
        (this rank's own rows; several requesters may send the same row)."""
        every = slice(None)  # all received rows, in order: views, not a gathered copy
        back_k, back_v = self._swap([dk_far, dv_far], every, self.recv_rows, self.serve_rows)
        at = (slice(None), slice(None), self.serve)
        if array_module(dk) is np:
            np.add.at(dk, at, back_k)
            np.add.at(dv, at, back_v)
        else:
            import cupy
            import cupyx
            at = (slice(None), slice(None), cupy.asarray(self.serve))
            cupyx.scatter_add(dk, at, back_k)
            cupyx.scatter_add(dv, at, back_v)


def segments(positions):
    """(start, stop) index ranges of maximal runs of consecutive positions."""
    if not len(positions):
        return []
    cut = np.flatnonzero(np.diff(positions) != 1) + 1
    bounds = np.concatenate([[0], cut, [len(positions)]])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def forward(comm, shard):
    """(o, lse) of this rank's queries over the whole sequence; collective over comm."""
    P, r = comm.size, comm.rank
    B, Hkv, G, nq, D = shard.q.shape
    n = shard.n_keys
    mask, stats = shard.mask, shard.stats
    xp = array_module(shard.q)

    wide = wide_rows(mask, shard.qpos)
    near = _near(wide)
    mixed = not isinstance(near, slice)  # this rank has wide rows: o, lse are assembled
    o, lse = empty_state(xp, (B, Hkv, G, nq), D) if mixed else (None, None)
    if wide is not None:  # every rank takes this branch (it depends on the mask only)
        rows = np.array(comm.allgather_object(int(wide.sum())), dtype=np.int64)
        if rows.sum():
            q, qpos = tree.replicate(comm, shard.q[:, :, :, wide], shard.qpos[wide], rows)
            t = time.perf_counter()
            wo, wl, edges = tree.partial(q, qpos, shard, r)
            stats["compute_s"] += time.perf_counter() - t
            stats["edges"] += edges
            wo, wl = tree.combine(comm, wo, wl, ranks_per_node=shard.ranks_per_node)
            if mixed:
                a = int(rows[:r].sum())
                n_r = int(rows[r])
                o[:, :, :, wide], lse[:, :, :, wide] = wo[..., a:a + n_r, :], wl[..., a:a + n_r]

    q, qpos = shard.q[:, :, :, near], shard.qpos[near]
    blocks = [(start, shard.k[:, :, rows], shard.v[:, :, rows]) for start, rows in zip(*shard.key_runs(r))]
    if P > 1:
        halo = Halo(comm, pieces(shard.kv_runs), reach(mask, qpos, n))
        kr, vr = halo.gather(shard.k, shard.v)
        pos = halo.positions
        blocks += [(int(pos[a]), kr[:, :, a:b], vr[:, :, a:b]) for a, b in segments(pos)]
    faults.point("compute", r)
    t = time.perf_counter()
    no = nl = None  # the first segment's partial becomes the state (the identity's merge is a no-op)
    for start, kb, vb in blocks:
        with phase("local"):
            po, pl, edges = local.attend(q, qpos, kb, vb, start, mask, shard.scale)
        with phase("merge"):
            no, nl = (po, pl) if no is None else merge(no, nl, po, pl)
        stats["edges"] += edges
    if no is None:
        no, nl = empty_state(xp, (B, Hkv, G, len(qpos)), D)
    stats["compute_s"] += time.perf_counter() - t
    if not mixed:
        return no, nl
    o[:, :, :, near], lse[:, :, :, near] = no, nl
    return o, lse


def _near(wide):
    """The index of the rows that are not wide: every row as a slice (views, no copies) when
    this rank has no wide row, else the boolean mask."""
    return slice(None) if wide is None or not wide.any() else ~wide


def backward(comm, shard, o, lse, do):
    """(dq, dk, dv) float32 of this rank's rows, given the forward's o (B, Hkv, G, nq, D), its
    full-row lse (B, Hkv, G, nq) and dO (like q); collective over comm.

    The same halo as the forward brings the reached K/V rows in; the local backward kernel runs
    over the own runs and each received segment; dK, dV of received rows go back to their
    owners. Rows reaching everything are replicated (as in decoding): each rank adds their
    dK, dV over its own keys and their dQ partials are summed across ranks.
    """
    P, r = comm.size, comm.rank
    B, Hkv, G, nq, D = shard.q.shape
    nk = shard.k.shape[2]
    mask, stats, scale = shard.mask, shard.stats, shard.scale
    delta = grad.row_delta(do, o)
    xp = array_module(shard.k)
    dq = xp.zeros((B, Hkv, G, nq, D), np.float32)
    dk, dv = xp.zeros((B, Hkv, nk, D), np.float32), xp.zeros((B, Hkv, nk, D), np.float32)
    own = list(zip(*shard.key_runs(r)))

    wide = wide_rows(mask, shard.qpos)
    near = _near(wide)
    if wide is not None:  # collective on every rank, with wide rows or none
        rows = np.array(comm.allgather_object(int(wide.sum())), dtype=np.int64)
        if rows.sum():
            dq[:, :, :, wide] = tree.backward_rows(comm, shard, shard.q[:, :, :, wide], shard.qpos[wide],
                                                   do[:, :, :, wide], lse[..., wide], delta[..., wide],
                                                   rows, dk, dv)

    q, qpos, do_n = shard.q[:, :, :, near], shard.qpos[near], do[:, :, :, near]
    lse_n, delta_n = lse[..., near], delta[..., near]
    dq_n = dq if isinstance(near, slice) else xp.zeros(q.shape, np.float32)
    blocks = [(start, shard.k[:, :, sl], shard.v[:, :, sl], dk[:, :, sl], dv[:, :, sl]) for start, sl in own]
    if P > 1:
        halo = Halo(comm, pieces(shard.kv_runs), reach(mask, qpos, shard.n_keys))
        kr, vr = halo.gather(shard.k, shard.v)
        dk_far, dv_far = xp.zeros(kr.shape, np.float32), xp.zeros(vr.shape, np.float32)
        pos = halo.positions
        blocks += [(int(pos[a]), kr[:, :, a:b], vr[:, :, a:b], dk_far[:, :, a:b], dv_far[:, :, a:b])
                   for a, b in segments(pos)]
    t = time.perf_counter()
    for start, kb, vb, dkb, dvb in blocks:
        stats["edges"] += grad.backward(q, qpos, kb, vb, start, mask, scale, do_n, lse_n, delta_n,
                                        dq_n, dkb, dvb)[3]
    stats["compute_s"] += time.perf_counter() - t
    if P > 1:
        halo.scatter_add(dk_far, dv_far, dk, dv)
    if dq_n is not dq:
        dq[:, :, :, near] = dq_n
    return dq, dk, dv
