"""Ring attention: queries stay, K/V shards travel P-1 hops; each hop's partial is merged.

The next hop's transfer is posted before the current block is computed, so communication
overlaps compute. Blocks the mask leaves empty cost no compute (the kernel sees no spans).
"""
import time

import numpy as np

from .. import faults, local
from ..merge import empty_state, merge


def forward(comm, shard):
    """(o, lse) of this rank's queries over the whole sequence; collective over comm."""
    P, r = comm.size, comm.rank
    B, Hkv, G, nq, D = shard.q.shape
    off = shard.kv_offsets
    o, lse = empty_state(np, (B, Hkv, G, nq), D)
    k, v, owner = shard.k, shard.v, r
    for hop in range(P):
        pending = None
        if hop < P - 1:
            nxt = (r - hop - 1) % P
            n = int(off[nxt + 1] - off[nxt])
            bufs = [np.empty((B, Hkv, n, D), dtype=k.dtype) for _ in range(2)]
            pending = comm.exchange([k, v], (r + 1) % P, bufs, (r - 1) % P)
        faults.point("compute", r)
        t = time.perf_counter()
        po, pl, edges = local.attend(shard.q, shard.qpos, k, v, int(off[owner]), shard.mask, shard.scale)
        o, lse = merge(o, lse, po, pl)
        shard.stats["compute_s"] += time.perf_counter() - t
        shard.stats["edges"] += edges
        if pending is not None:
            (k, v), owner = pending.wait(), nxt
    return o, lse
