"""The GPU backward of one key block, implicit mask terms: the tensor-core kernels
(kernels/attend_bwd_mma.cu: float16/bfloat16, D in BWD_DIMS) or the CUDA-core one (kernels/attend.cu:
attend_bwd, any dtype and head dim)."""
import numpy as np

from ..errors import HpcattnError
from .encode import check, device_mask, device_positions, listed_terms
from .loader import cupy, launch
from .shapes import BK, BQ, BWD_DIMS, BWD_ROWS, BWD_SHAPES, bwd_names, bwd_smem


def backward(q, qpos, k, v, k0, mask, scale, do, lse, delta, dq=None, dk=None, dv=None, bf16=False,
             kernel_kind="auto"):
    """grad.backward on the GPU: add the key block k0..k0+nk-1's share to the float32
    accumulators dq (like q), dk, dv (like k), created as zeros when not given, and return
    (dq, dk, dv, edges). lse (B,Hkv,G,nq) is the forward's full-row log-sum-exp, delta =
    rowsum(dO * O). Implicit mask terms only (random/csr backward stays on the CPU for now).
    kernel_kind: "mma" (tensor cores: float16/bfloat16, D in BWD_DIMS, scale > 0), "simt" (any
    dtype, D <= 256) or "auto" (the first that applies). Both give the same bits on every rerun."""
    cp = cupy()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    ctype, dmax = check(q, qpos, k, v, k0, bf16)
    if do.shape != q.shape or do.dtype != q.dtype:
        raise HpcattnError(f"do must match q: {do.shape} {do.dtype} vs {q.shape} {q.dtype}")
    if listed_terms(mask):
        raise HpcattnError(f"mask {mask.spec!r}: the GPU backward takes implicit terms only")
    tensor = ctype != "float" and D in BWD_DIMS and scale > 0
    if kernel_kind == "mma" and not tensor:
        raise HpcattnError(f"the tensor-core backward takes float16/bfloat16 with D in {BWD_DIMS} and scale > 0")
    dq = cp.zeros(q.shape, dtype=cp.float32) if dq is None else dq
    dk = cp.zeros(k.shape, dtype=cp.float32) if dk is None else dk
    dv = cp.zeros(k.shape, dtype=cp.float32) if dv is None else dv
    for name, acc, shape in (("dq", dq, q.shape), ("dk", dk, k.shape), ("dv", dv, k.shape)):
        if acc.shape != shape or acc.dtype != cp.float32 or not acc.flags.c_contiguous:
            raise HpcattnError(f"{name} must be a contiguous float32 array of shape {shape}")
    if nq == 0 or nk == 0 or B * Hkv * G == 0:
        return dq, dk, dv, 0
    edges = cp.zeros(1, dtype=cp.uint64)
    args = (cp.ascontiguousarray(q), device_positions(qpos), cp.ascontiguousarray(k), cp.ascontiguousarray(v),
            cp.ascontiguousarray(do), cp.ascontiguousarray(lse, dtype=cp.float32),
            cp.ascontiguousarray(delta, dtype=cp.float32))
    if tensor and kernel_kind != "simt":
        _tensor(cp, args, dq, dk, dv, edges, mask, nq, nk, G, B * Hkv, ctype, D, k0, scale)
    else:
        smem = 4 * (2 * BQ * dmax + 2 * BK * (dmax + 1) + 2 * BK * dmax)
        launch(f"attend_bwd<{ctype}, {dmax}>", ((nq + BQ - 1) // BQ, B * Hkv * G), smem,
               args + (dq, dk, dv, edges, device_mask(mask),
                       np.int32(nq), np.int32(nk), np.int32(D), np.int32(G), np.int64(k0), np.float32(scale)))
    return dq, dk, dv, int(edges.get()[0])


def _tensor(cp, args, dq, dk, dv, edges, mask, nq, nk, G, kv_heads, ctype, D, k0, scale):
    """attend_bwd_kv (dk, dv: a block per 16 W keys of a kv head) then attend_bwd_q (dq and the
    edges: a block per 16 W query rows of a head); rows_unsorted first tells attend_bwd_kv
    whether it may search the positions."""
    wk, _, wq, _, _ = BWD_SHAPES[D]
    kv_name, q_name = bwd_names(ctype, D)
    kv_smem, q_smem = bwd_smem(D)
    unsorted = cp.zeros(1, dtype=cp.int32)
    launch("rows_unsorted", (min(1024, -(-nq // 256)),), 0, (args[1], np.int32(nq), unsorted), threads=256)
    tail = (np.int32(nq), np.int32(nk), np.int32(G), np.int64(k0), np.float32(scale), np.int64(0))
    words = device_mask(mask)
    launch(kv_name, (-(-nk // (16 * wk)), kv_heads), kv_smem, args + (dk, dv, words, unsorted) + tail,
           threads=32 * wk)
    launch(q_name, (-(-nq // (16 * wq)), kv_heads * G), q_smem, args + (dq, edges, words) + tail, threads=32 * wq)
