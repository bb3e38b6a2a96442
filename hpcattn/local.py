"""The local kernel: attention of a rank's query rows over one contiguous block of keys.

Knows nothing of MPI. Layout (head-major, grouped-query):
  q (B, Hkv, G, nq, D), k and v (B, Hkv, nk, D); query head h = hkv * G + g.
It tiles the queries, asks the mask which key spans a tile can reach, and runs dense float32
blocks over those spans only, merging block partials with the shared merge.
"""
import numpy as np

from .backend import array_module
from .merge import empty_state, merge

Q_TILE = 256
SCORE_ELEMS = 1 << 22  # scores held at once per block (float32): 16 MiB


def attend(q, qpos, k, v, k0, mask, scale):
    """(o, lse, edges) of every query row of q over the keys k0 .. k0+nk-1 that the mask allows.

    o: (B, Hkv, G, nq, D) float32 normalised; lse: (B, Hkv, G, nq) float32, -inf where a row
    has no edge in this block. `edges` counts the (query, key) pairs visited (per head).
    """
    xp = array_module(q)
    if xp is not np:  # device arrays: the CUDA kernels in kernels/ (hpcattn/cuda.py)
        from . import cuda
        return cuda.attend(q, qpos, k, v, k0, mask, scale)
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    o, lse = empty_state(xp, (B, Hkv, G, nq), D)
    edges = 0
    if nq == 0 or nk == 0:
        return o, lse, edges
    k_chunk = max(64, SCORE_ELEMS // max(1, B * Hkv * G * Q_TILE))
    for t0 in range(0, nq, Q_TILE):
        t1 = min(nq, t0 + Q_TILE)
        pos = qpos[t0:t1]
        spans = mask.spans(int(pos.min()), int(pos.max()), k0, k0 + nk)
        if not spans:
            continue
        qt = q[:, :, :, t0:t1].astype(xp.float32, copy=False)
        to, tl = o[:, :, :, t0:t1], lse[:, :, :, t0:t1]
        for a, b in spans:
            for c0 in range(a, b, k_chunk):
                c1 = min(b, c0 + k_chunk)
                po, pl, n = _block(xp, qt, pos, k[:, :, c0 - k0:c1 - k0], v[:, :, c0 - k0:c1 - k0],
                                   c0, mask, scale)
                edges += n
                to, tl = merge(to, tl, po, pl)
        o[:, :, :, t0:t1], lse[:, :, :, t0:t1] = to, tl
    return o, lse, edges


def _block(xp, qt, pos, kb, vb, c0, mask, scale):
    """Dense softmax partial of a query tile over one key block, masked elementwise."""
    B, Hkv, G, tq, D = qt.shape
    nk = kb.shape[2]
    kb = kb.astype(xp.float32, copy=False)
    vb = vb.astype(xp.float32, copy=False)
    s = xp.matmul(qt.reshape(B, Hkv, G * tq, D), kb.swapaxes(-1, -2)).reshape(B, Hkv, G, tq, nk)
    s *= scale
    if mask.dense:
        n = tq * nk
    else:
        allowed = mask.allowed(pos[:, None], xp.arange(c0, c0 + nk)[None, :])
        n = int(allowed.sum())
        if n == 0:
            return (*empty_state(xp, (B, Hkv, G, tq), D), 0)
        s = xp.where(allowed, s, -xp.inf)
    m = s.max(axis=-1)
    m_ref = xp.where(xp.isneginf(m), 0, m)
    s -= m_ref[..., None]
    xp.exp(s, out=s)
    denom = s.sum(axis=-1)
    o = xp.matmul(s.reshape(B, Hkv, G * tq, nk), vb).reshape(B, Hkv, G, tq, D)
    o /= xp.where(denom > 0, denom, 1)[..., None]
    with np.errstate(divide="ignore"):
        lse = m_ref + xp.log(denom)
    return o, lse.astype(xp.float32, copy=False), n
