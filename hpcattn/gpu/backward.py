"""The GPU backward of one key block (kernels/attend.cu: attend_bwd), implicit mask terms."""
import numpy as np

from ..errors import HpcattnError
from .encode import check, device_mask, device_positions, listed_terms
from .loader import cupy, launch
from .shapes import BK, BQ


def backward(q, qpos, k, v, k0, mask, scale, do, lse, delta, dq=None, dk=None, dv=None, bf16=False):
    """grad.backward on the GPU: add the key block k0..k0+nk-1's share to the float32
    accumulators dq (like q), dk, dv (like k), created as zeros when not given, and return
    (dq, dk, dv, edges). lse (B,Hkv,G,nq) is the forward's full-row log-sum-exp, delta =
    rowsum(dO * O). Implicit mask terms only (random/csr backward stays on the CPU for now)."""
    cp = cupy()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    ctype, dmax = check(q, qpos, k, v, k0, bf16)
    if do.shape != q.shape or do.dtype != q.dtype:
        raise HpcattnError(f"do must match q: {do.shape} {do.dtype} vs {q.shape} {q.dtype}")
    if listed_terms(mask):
        raise HpcattnError(f"mask {mask.spec!r}: the GPU backward takes implicit terms only")
    dq = cp.zeros(q.shape, dtype=cp.float32) if dq is None else dq
    dk = cp.zeros(k.shape, dtype=cp.float32) if dk is None else dk
    dv = cp.zeros(k.shape, dtype=cp.float32) if dv is None else dv
    for name, acc, shape in (("dq", dq, q.shape), ("dk", dk, k.shape), ("dv", dv, k.shape)):
        if acc.shape != shape or acc.dtype != cp.float32 or not acc.flags.c_contiguous:
            raise HpcattnError(f"{name} must be a contiguous float32 array of shape {shape}")
    if nq == 0 or nk == 0 or B * Hkv * G == 0:
        return dq, dk, dv, 0
    edges = cp.zeros(1, dtype=cp.uint64)
    smem = 4 * (2 * BQ * dmax + 2 * BK * (dmax + 1) + 2 * BK * dmax)
    launch(f"attend_bwd<{ctype}, {dmax}>", ((nq + BQ - 1) // BQ, B * Hkv * G), smem,
           (cp.ascontiguousarray(q), device_positions(qpos), cp.ascontiguousarray(k),
            cp.ascontiguousarray(v), cp.ascontiguousarray(do),
            cp.ascontiguousarray(lse, dtype=cp.float32), cp.ascontiguousarray(delta, dtype=cp.float32),
            dq, dk, dv, edges, device_mask(mask),
            np.int32(nq), np.int32(nk), np.int32(D), np.int32(G), np.int64(k0), np.float32(scale)))
    return dq, dk, dv, int(edges.get()[0])
