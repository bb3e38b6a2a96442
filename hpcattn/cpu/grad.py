"""The local backward kernel: gradients of attention over one contiguous block of keys.

Knows nothing of MPI; the layout and mask API are those of the forward kernel (local.py):
q, do (B, Hkv, G, nq, D), k, v (B, Hkv, nk, D) holding keys k0 .. k0+nk-1. Following DESIGN
section 5, it recomputes each edge's probability from the forward's full-row lse instead of
storing it: P = exp(s - lse), dV += P^T dO, dS = P * (dO V^T - D), dQ += scale dS K,
dK += scale dS^T Q, with D = rowsum(dO * O). Query tiles ask the mask for the key spans they
reach and run dense float32 BLAS blocks over those spans only (masked elementwise); a kv
head's dK, dV sum over its G query heads (the G*tile rows of one matmul).
"""

import numpy as np

from ..arrays import array_module, as_float32, to_host

Q_TILE = 256
SCORE_ELEMS = 1 << 21  # scores held at once per block (float32, two such buffers): 2 x 8 MiB


def row_delta(do, o):
    """D = rowsum(dO * O) in float32: (..., n, D) -> (..., n)."""
    xp = array_module(do)
    return xp.einsum("...d,...d->...", _f32(xp, do), _f32(xp, o))


def _f32(xp, x):
    """x in float32, C-contiguous on the host (arrays.as_float32: strided half-precision views
    widen faster in two passes)."""
    return as_float32(x) if xp is np and x.dtype != np.float32 else x.astype(xp.float32, copy=False)


def backward(q, qpos, k, v, k0, mask, scale, do, lse, delta, dq=None, dk=None, dv=None, progress=None):
    """Add this key block's contribution to (dq, dk, dv) and return (dq, dk, dv, edges).

    lse (B, Hkv, G, nq) float32 is the forward's log-sum-exp over the whole row (not just this
    block); delta (B, Hkv, G, nq) = row_delta(do, o). dq (B, Hkv, G, nq, D) and dk, dv
    (B, Hkv, nk, D) are float32 accumulators, created as zeros when not given. `edges` counts
    the (query, key) pairs visited, per head, as the forward kernel does. `progress`, if
    given, is called after every query tile (the comm layer's hook to advance transfers).
    """
    xp = array_module(q)
    if xp is not np:  # device arrays: kernels/attend.cu (hpcattn/gpu/backward.py)
        return _on_device(q, qpos, k, v, k0, mask, scale, do, lse, delta, dq, dk, dv)
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    dq = xp.zeros((B, Hkv, G, nq, D), xp.float32) if dq is None else dq
    dk = xp.zeros((B, Hkv, nk, D), xp.float32) if dk is None else dk
    dv = xp.zeros((B, Hkv, nk, D), xp.float32) if dv is None else dv
    edges = 0
    if nq == 0 or nk == 0:
        return dq, dk, dv, edges
    # a row with no edge at all (lse = -inf) has every score masked: exp(-inf - 0) = 0
    lse0 = xp.where(xp.isneginf(lse), 0, lse).astype(xp.float32, copy=False)
    k_chunk = max(64, SCORE_ELEMS // max(1, B * Hkv * G * Q_TILE))
    for t0 in range(0, nq, Q_TILE):
        t1 = min(nq, t0 + Q_TILE)
        pos = qpos[t0:t1]
        spans = mask.spans(int(pos.min()), int(pos.max()), k0, k0 + nk)
        if not spans:
            continue
        tile = _Tile(xp, q[:, :, :, t0:t1], do[:, :, :, t0:t1], lse0[:, :, :, t0:t1],
                     delta[:, :, :, t0:t1], pos, scale)
        dqt = dq[:, :, :, t0:t1].reshape(B, Hkv, G * (t1 - t0), D)
        for a, b in spans:
            for c0 in range(a, b, k_chunk):
                c1 = min(b, c0 + k_chunk)
                edges += tile.block(k[:, :, c0 - k0:c1 - k0], v[:, :, c0 - k0:c1 - k0], c0, mask,
                                    dqt, dk[:, :, c0 - k0:c1 - k0], dv[:, :, c0 - k0:c1 - k0])
        dq[:, :, :, t0:t1] = dqt.reshape(B, Hkv, G, t1 - t0, D)
        if progress is not None:
            progress()
    return dq, dk, dv, edges


def backward_out(q, qpos, k, v, mask, scale, o, lse, do, out):
    """The whole backward of q's rows over all keys k, v (positions 0 .. nk-1) written into
    out = (dq, dk, dv), arrays like q, k, v of any dtype and layout (e.g. views of the caller's
    arrays): one rank's gradients with no exchange. Returns the edges (on the GPU a device
    count, read only when needed). qpos None: query r sits at position r."""
    if array_module(q) is not np:  # the tensor-core kernels write out in place (gpu/backward.py)
        from ..gpu.backward import backward_out as on_device
        return on_device(q, qpos, k, v, mask, scale, o, lse, do, out)
    qpos = np.arange(q.shape[3], dtype=np.int64) if qpos is None else qpos
    *grads, edges = backward(q, qpos, k, v, 0, mask, scale, do, lse, row_delta(do, o))
    for dst, src in zip(out, grads):
        dst[...] = src
    return edges


def _on_device(q, qpos, k, v, k0, mask, scale, do, lse, delta, dq, dk, dv):
    """The GPU backward (gpu/backward.py) with this function's contract: accumulators may be
    strided views (a variant's row or key runs); the kernel wants contiguous ones, so those go
    through a copy."""
    from ..gpu.backward import backward as on_device
    accs = [a if a is None or a.flags.c_contiguous else a.copy() for a in (dq, dk, dv)]
    *out, edges = on_device(q, to_host(qpos), k, v, k0, mask, scale, do.astype(q.dtype, copy=False),
                            lse, delta, *accs)
    for view, got in zip((dq, dk, dv), out):
        if view is not None and view is not got:
            view[...] = got
    return (*[got if view is None else view for view, got in zip((dq, dk, dv), out)], edges)


class _Tile:
    """One query tile in float32, flattened to (B, Hkv, G*tq, .) so a matmul covers all G heads."""

    def __init__(self, xp, q, do, lse, delta, pos, scale):
        B, Hkv, G, tq, D = q.shape
        self.xp, self.pos, self.scale, self.shape = xp, pos, scale, (B, Hkv, G, tq)
        self.q = _f32(xp, q).reshape(B, Hkv, G * tq, D)
        self.do = _f32(xp, do).reshape(B, Hkv, G * tq, D)
        self.lse = lse.reshape(B, Hkv, G * tq, 1)
        self.delta = delta.reshape(B, Hkv, G * tq, 1)

    def block(self, kb, vb, c0, mask, dq, dk, dv):
        """Accumulate one key block into dq (B,Hkv,G*tq,D), dk, dv (B,Hkv,nb,D); edges visited."""
        xp = self.xp
        B, Hkv, G, tq = self.shape
        nb = kb.shape[2]
        kb, vb = _f32(xp, kb), _f32(xp, vb)
        s = xp.matmul(self.q, kb.swapaxes(-1, -2))
        s *= self.scale
        if mask.dense:
            n = tq * nb
        else:
            allowed = mask.allowed(self.pos[:, None], xp.arange(c0, c0 + nb)[None, :])
            n = int(allowed.sum())
            if n == 0:
                return 0
            xp.copyto(s.reshape(B, Hkv, G, tq, nb), -xp.inf, where=~allowed)
        s -= self.lse
        p = xp.exp(s, out=s)                                   # P, zero off the mask
        dv += xp.matmul(p.swapaxes(-1, -2), self.do)
        ds = xp.matmul(self.do, vb.swapaxes(-1, -2))           # dP
        ds -= self.delta
        ds *= p                                                # dS = P * (dP - D)
        ds *= self.scale
        dq += xp.matmul(ds, kb)
        dk += xp.matmul(ds.swapaxes(-1, -2), self.q)
        return n
