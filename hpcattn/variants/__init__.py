"""Distribution variants. Each is a module with `forward(comm, shard) -> (o, lse)` and, where
supported, `backward(comm, shard, o, lse, do) -> (dq, dk, dv)`.

They share the local kernels, the merge, the ring helper and the comm layer, and know nothing
of HDF5.
"""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import burst, ring

VARIANTS = {"ring": ring, "burst": burst}


@dataclass
class Shard:
    """One rank's part of an attention problem, in the kernel's head-major layout.

    q (B, Hkv, G, nq, D) with query positions qpos (nq,) int64; k, v (B, Hkv, nk, D) holding
    this rank's keys. kv_offsets (P+1,): cumulative key counts per rank. kv_runs[r]: the global
    (start, stop) key ranges rank r holds, in row order (one range per rank by default, two in
    the zigzag layout); q_runs[r]: the lengths of the runs of consecutive positions of rank r's
    query rows (they sum to its nq; needed by variants that move queries). ranks_per_node: None = group ranks by shared memory.
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


def choose(name, shard):
    """The variant module for a name; 'auto' picks from the mask and shapes."""
    if name == "auto":
        return VARIANTS["ring"], "ring"
    return VARIANTS[name], name
