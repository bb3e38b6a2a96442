"""Distribution variants. Each is a module with `forward(comm, shard) -> (o, lse)`.

They share the local kernel, the merge and the comm layer, and know nothing of HDF5.
"""
from dataclasses import dataclass, field

import numpy as np

from . import ring

VARIANTS = {"ring": ring}


@dataclass
class Shard:
    """One rank's part of an attention problem, in the kernel's head-major layout.

    q (B, Hkv, G, nq, D) with query positions qpos (nq,) int64; k, v (B, Hkv, nk, D) holding
    keys kv_offsets[rank] .. kv_offsets[rank+1]-1; kv_offsets (P+1,) over the whole sequence.
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

    @property
    def n_keys(self):
        return int(self.kv_offsets[-1])


def choose(name, shard):
    """The variant module for a name; 'auto' picks from the mask and shapes."""
    if name == "auto":
        return VARIANTS["ring"], "ring"
    return VARIANTS[name], name
