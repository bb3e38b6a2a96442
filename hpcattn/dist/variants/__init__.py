"""Distribution variants. Each is a module with `forward(comm, shard) -> (o, lse)` and, where
supported, `backward(comm, shard, o, lse, do) -> (dq, dk, dv)`.

They share the local kernels, the merge, the ring helper and the comm layer, and know nothing
of HDF5.
"""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import burst, ring, sparse, tree

VARIANTS = {"ring": ring, "burst": burst, "tree": tree, "sparse": sparse}

DECODE_FRACTION = 8  # tree when all queries together number at most (keys per rank) / this


@dataclass
class Shard:
    """One rank's part of an attention problem, in the kernel's head-major layout.

    q (B, Hkv, G, nq, D) with query positions qpos (nq,) int64; k, v (B, Hkv, nk, D) holding
    this rank's keys. kv_offsets (P+1,): cumulative key counts per rank. kv_runs[r]: the global
    (start, stop) key ranges rank r holds, in row order (one range per rank by default, two in
    the zigzag layout); q_runs[r]: the lengths of the runs of consecutive positions of rank r's
    query rows (they sum to its nq; needed by variants that move queries). ranks_per_node: None = group ranks by shared memory.
    q_offsets (P+1,): cumulative query-row counts per rank (rank r holds rows q_offsets[r]..[r+1]-1).
    `stats` collects compute_s and edges.
    """
    q: object
    qpos: np.ndarray
    k: object
    v: object
    kv_offsets: np.ndarray
    mask: object
    scale: float
    stats: dict = field(default_factory=lambda: {"compute_s": 0.0, "edges": 0})
    kv_runs: Optional[list] = None
    q_runs: Optional[list] = None
    ranks_per_node: Optional[int] = None
    q_offsets: Optional[np.ndarray] = None

    def __post_init__(self):
        off = [int(x) for x in self.kv_offsets]
        if self.kv_runs is None:
            self.kv_runs = [[(a, b)] for a, b in zip(off[:-1], off[1:])]

    @property
    def n_keys(self):
        return int(self.kv_offsets[-1])

    def kv_rows(self, owner):
        """Number of key rows rank `owner` holds."""
        return int(self.kv_offsets[owner + 1] - self.kv_offsets[owner])

    def key_runs(self, owner):
        """(global starts, local row slices) of owner's key runs."""
        starts = [a for a, b in self.kv_runs[owner] if b > a]
        cuts = np.cumsum([0] + [b - a for a, b in self.kv_runs[owner] if b > a])
        return starts, [slice(int(c0), int(c1)) for c0, c1 in zip(cuts[:-1], cuts[1:])]


def reach_width(mask):
    """Widest key range one query row can reach through the mask's span-bounded terms (listed
    terms such as random or csr add only their own columns), or None when some term is
    unbounded (full, causal alone: each term answers `width()`)."""
    width = 0
    for t in mask.terms:
        if t.listed:  # listed columns (random, csr): fetched row by row
            continue
        w = t.width()
        if w is None:
            return None
        width = max(width, w)
    return width


def backward_bytes(n_queries, n_keys, ranks, B, Hkv, G, D, q_size, kv_size):
    """(ring, burst): bytes the two backwards move in all, summed over ranks (DESIGN.md section 6).

    Each travelling block makes P - 1 hops and its accumulator P - 1 more sends. Ring moves every
    key row's K, V (kv_size bytes each) and its dK, dV (float32); burst moves every query row's
    Q, dO (q_size bytes) in all B * Hkv * G query heads, their lse and D (float32), their
    positions (int64) and dQ (float32). So burst is smaller for G = 1 (0.76x ring at D = 64,
    float32) and about G times larger with grouped-query heads.
    """
    hops = ranks - 1
    ring = hops * B * Hkv * n_keys * D * (2 * kv_size + 8)
    burst = hops * (B * Hkv * G * n_queries * (D * (2 * q_size + 4) + 8) + 8 * n_queries)
    return ring, burst


def pick(mask, n_queries, n_keys, ranks, backward=None):
    """The variant name `auto` uses; a pure function of global facts, so every rank agrees.

    - one rank: ring (one hop, nothing travels);
    - tree when all queries together are few: at most (keys per rank) / DECODE_FRACTION;
    - sparse when every row's reach is bounded (window, dilated, block, plus global tokens) and
      narrower than a shard, so halos are cheaper than a ring;
    - otherwise burst, except for a backward (`backward` = the shape facts B, Hkv, G, D, q_size,
      kv_size of `backward_bytes`) where ring moves fewer bytes: with grouped-query heads the
      query side burst moves is larger than the key side ring moves.
    """
    if ranks == 1:
        return "ring"
    per_rank = -(-n_keys // ranks)
    if n_queries * DECODE_FRACTION <= per_rank:
        return "tree"
    width = reach_width(mask)
    g = mask.global_rows()
    if width is not None and width <= per_rank and g <= per_rank:
        return "sparse"
    if backward is not None:
        ring_b, burst_b = backward_bytes(n_queries, n_keys, ranks, *backward)
        if ring_b < burst_b:
            return "ring"
    return "burst"


def choose(name, shard, backward=False):
    """(variant module, name) for a name; 'auto' picks from the mask and shapes (see `pick`),
    for the backward pass when `backward`."""
    if name == "auto":
        q_off = shard.q_offsets
        n_queries = int(q_off[-1]) if q_off is not None else len(shard.qpos)
        B, Hkv, G, _, D = shard.q.shape
        facts = (B, Hkv, G, D, shard.q.dtype.itemsize, shard.k.dtype.itemsize) if backward else None
        name = pick(shard.mask, n_queries, shard.n_keys, len(shard.kv_offsets) - 1, facts)
    return VARIANTS[name], name
