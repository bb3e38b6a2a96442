"""The public entry point: attention over a sequence sharded across the ranks of a communicator."""
import math

import numpy as np

from .backend import array_module
from .comm import Comm
from .errors import HpcattnError
from .masks import Mask, parse
from .variants import Shard, choose

DTYPES = ("float32", "float16")


def check_shapes(q_shape, k_shape, v_shape, dtypes):
    """Problem with the (local or global) shapes/dtypes of q, k, v as a message, or None."""
    if len(q_shape) != 4 or len(k_shape) != 4:
        return f"q and k must be 4-D (B, N, H, D); got q {tuple(q_shape)}, k {tuple(k_shape)}"
    if tuple(k_shape) != tuple(v_shape):
        return f"k and v must have the same shape; got k {tuple(k_shape)}, v {tuple(v_shape)}"
    (B, _, H, D), (Bk, _, Hkv, Dk) = q_shape, k_shape
    if B != Bk or D != Dk:
        return f"q {tuple(q_shape)} and k {tuple(k_shape)} disagree in batch or head dim"
    if D < 1:
        return f"head dim must be at least 1; got q {tuple(q_shape)}, k {tuple(k_shape)}"
    if Hkv < 1 or H % Hkv:
        return f"query heads ({H}) must be a positive multiple of kv heads ({Hkv})"
    names = {np.dtype(d).name for d in dtypes}  # any byte order
    if len(names) != 1 or not names <= set(DTYPES):
        return f"q, k, v must share one dtype of {', '.join(DTYPES)}; got {', '.join(map(str, dtypes))}"
    return None


def to_heads(x, hkv):
    """(B, n, H, D) -> contiguous (B, Hkv, H//Hkv, n, D)."""
    xp = array_module(x)
    B, n, H, D = x.shape
    return xp.ascontiguousarray(x.reshape(B, n, hkv, H // hkv, D).transpose(0, 2, 3, 1, 4))


def from_heads(x, dtype):
    """(B, Hkv, G, n, D) -> (B, n, Hkv*G, D) in dtype."""
    B, Hkv, G, n, D = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, n, Hkv * G, D).astype(dtype)


def attention(q, k, v, mask="full", comm=None, variant="auto", q_positions=None, scale=None,
              stats=None):
    """Attention of this rank's query rows over the whole sharded sequence (collective).

    q: (B, nq, H, D), this rank's query rows; k, v: (B, nk, Hkv, D), this rank's key rows.
    Ranks hold contiguous pieces in rank order (any sizes, empty allowed). q_positions: the
    global positions of this rank's query rows (default: rows continue 0..Nq-1 in rank order,
    i.e. self-attention, which needs Nq == N). mask: a spec string or Mask. comm: an mpi4py
    communicator or hpcattn Comm (default COMM_WORLD). scale defaults to 1/sqrt(D).
    Returns (o, lse) on every rank: o (B, nq, H, D) in q's dtype, lse (B, H, nq) float32.
    If `stats` is a dict, compute_s, edges and the variant used are added to it.
    """
    comm = Comm.wrap(comm)
    mask = mask if isinstance(mask, Mask) else parse(mask)
    problem = check_shapes(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype))
    if problem:
        raise HpcattnError(problem)
    xp = array_module(q)
    B, nq, H, D = q.shape
    Hkv = k.shape[2]
    sizes = np.array(comm.allgather_object((nq, k.shape[1])), dtype=np.int64).reshape(-1, 2)
    q_off = np.concatenate([[0], np.cumsum(sizes[:, 0])])
    kv_off = np.concatenate([[0], np.cumsum(sizes[:, 1])])
    n = int(kv_off[-1])
    if q_positions is None:
        if q_off[-1] != n:
            raise HpcattnError(f"{q_off[-1]} query rows but {n} keys: give q_positions")
        qpos = np.arange(q_off[comm.rank], q_off[comm.rank + 1], dtype=np.int64)
    else:
        if np.size(q_positions) and np.asarray(q_positions).dtype.kind not in "iu":
            raise HpcattnError(f"q_positions must be integers, got {np.asarray(q_positions).dtype}")
        qpos = np.asarray(q_positions, dtype=np.int64)
        if qpos.shape != (nq,):
            raise HpcattnError(f"q_positions must have shape ({nq},), got {qpos.shape}")
        if nq and (qpos.min() < 0 or qpos.max() >= n):
            raise HpcattnError(f"q_positions must lie in [0, {n}); got [{qpos.min()}, {qpos.max()}]")
    shard = Shard(to_heads(q, Hkv), qpos, to_heads(k, Hkv)[:, :, 0], to_heads(v, Hkv)[:, :, 0],
                  kv_off, mask, float(scale if scale is not None else 1 / math.sqrt(D)))
    module, name = choose(variant, shard)
    o, lse = module.forward(comm, shard)
    if stats is not None:
        stats.update(shard.stats, variant=name)
    return from_heads(o, q.dtype), xp.ascontiguousarray(lse.reshape(B, H, nq))
