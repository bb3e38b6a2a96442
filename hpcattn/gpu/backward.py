"""The GPU backward, implicit mask terms: the tensor-core kernels (kernels/attend_bwd_mma.cu:
float16/bfloat16, D in BWD_DIMS) or the CUDA-core one (kernels/attend.cu: attend_bwd, any dtype
and head dim). `backward` adds one key block's share into float32 accumulators (the variants'
contract); `backward_out` writes a whole rank's gradients in the caller's dtype and layout."""
import numpy as np

from ..errors import HpcattnError
from .encode import check, device_mask, device_positions, listed_terms
from .forward import row_strides
from .loader import cupy, launch, wgmma_available
from .shapes import (BK, BQ, BWD_DIMS, BWD_FUSED_SHAPES, BWD_SHAPES, BWD_WG_DIMS, BWD_WG_Q_SHAPES, BWD_WG_SHAPES,
                     bwd_fused_name, bwd_fused_smem, bwd_names, bwd_smem, bwd_wg_name, bwd_wg_q_name, bwd_wg_q_smem,
                     bwd_wg_smem, bwd_wg_threads)

# what kernel_kind "auto" runs on a compute capability 9.0 device (D in BWD_WG_DIMS): "wgmma" (two
# passes) or "fused" (one key-major pass; see _hopper)
HOPPER_AUTO = "wgmma"



def backward(q, qpos, k, v, k0, mask, scale, do, lse, delta, dq=None, dk=None, dv=None, bf16=False,
             kernel_kind="auto"):
    """grad.backward on the GPU: add the key block k0..k0+nk-1's share to the float32
    accumulators dq (like q), dk, dv (like k), created as zeros when not given, and return
    (dq, dk, dv, edges). lse (B,Hkv,G,nq) is the forward's full-row log-sum-exp, delta =
    rowsum(dO * O). Implicit mask terms only (random/csr backward stays on the CPU for now).
    kernel_kind: "mma" (tensor cores: float16/bfloat16, D in BWD_DIMS, scale > 0), "wgmma" (the
    same on Hopper's warpgroup MMA: D in BWD_WG_DIMS, compute capability 9.0), "fused" (Hopper,
    dq from the key-major pass), "simt" (any dtype, D <= 256) or "auto" (HOPPER_AUTO, else mma,
    where it applies, else simt). Each gives the same bits on every rerun."""
    cp = cupy()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    ctype, dmax = check(q, qpos, k, v, k0, bf16)
    if do.shape != q.shape or do.dtype != q.dtype:
        raise HpcattnError(f"do must match q: {do.shape} {do.dtype} vs {q.shape} {q.dtype}")
    if listed_terms(mask):
        raise HpcattnError(f"mask {mask.spec!r}: the GPU backward takes implicit terms only")
    tensor = _tensor_fits(ctype, D, scale)
    if kernel_kind in ("mma", "wgmma", "fused") and not tensor:
        raise HpcattnError(f"the tensor-core backward takes float16/bfloat16 with D in {BWD_DIMS} and scale > 0")
    hopper = tensor and _hopper(kernel_kind, D)
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
        _tensor(cp, args, (dq, dk, dv), edges, mask, G, k0, scale, ctype, "float", args[1], hopper=hopper)
    else:
        smem = 4 * (2 * BQ * dmax + 2 * BK * (dmax + 1) + 2 * BK * dmax)
        launch(f"attend_bwd<{ctype}, {dmax}>", ((nq + BQ - 1) // BQ, B * Hkv * G), smem,
               args + (dq, dk, dv, edges, device_mask(mask),
                       np.int32(nq), np.int32(nk), np.int32(D), np.int32(G), np.int64(k0), np.float32(scale)))
    return dq, dk, dv, int(edges.get()[0])


def backward_out(q, qpos, k, v, mask, scale, o, lse, do, out, kernel_kind="auto"):
    """The whole backward of q's rows over all keys k, v (positions 0 .. nk-1), written into
    out = (dq, dk, dv) (like q, k, v: any dtype, any layout); returns the edges (a device count
    where the tensor-core kernels ran: read it only when needed). q, o, do (B,Hkv,G,nq,D) and k,
    v (B,Hkv,nk,D) may be views of the caller's arrays: the tensor-core kernels read them and
    write out in place, and delta = rowsum(dO * O) is made on the device (no float32 copy of o
    or do). qpos None: query r sits at position r. kernel_kind as for `backward`."""
    cp = cupy()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    ctype, _ = check(q, qpos, k, v, 0, False)
    sq, sk = row_strides(q), row_strides(k)
    direct = (_tensor_fits(ctype, D, scale) and not listed_terms(mask) and nq and nk and B * Hkv * G
              and sq is not None and sk is not None and row_strides(o) is not None
              and all(x.dtype == q.dtype for x in (o, do, *out))
              and row_strides(do) == row_strides(out[0]) == sq and row_strides(v) == sk
              and row_strides(out[1]) == row_strides(out[2]) == sk)
    if not direct:
        from ..cpu.grad import row_delta
        qpos = np.arange(nq, dtype=np.int64) if qpos is None else qpos
        *grads, edges = backward(q, qpos, k, v, 0, mask, scale, do.astype(q.dtype, copy=False), lse,
                                 row_delta(do, o), kernel_kind=kernel_kind)
        for dst, src in zip(out, grads):
            dst[...] = src
        return edges
    lse = cp.ascontiguousarray(lse, dtype=cp.float32)
    delta = cp.empty((B, Hkv, G, nq), dtype=cp.float32)
    lanes = 4 if D <= 32 else 8 if D <= 64 else 16  # row_delta's L
    rows = B * Hkv * G * nq
    launch(f"row_delta<{ctype}, {D}>", (-(-rows * lanes // 256),), 0,
           (do, o, delta, np.int32(nq), np.int64(rows)) + tuple(np.int64(x) for x in (*sq, *row_strides(o)))
           + (np.int32(Hkv * G),), threads=256)
    edges = cp.zeros(1, dtype=cp.uint64)
    pos = np.uintp(0) if qpos is None else device_positions(qpos)
    _tensor(cp, (q, pos, k, v, do, lse, delta), out, edges, mask, G, 0, scale, ctype, ctype, pos, sq, sk,
            hopper=_hopper(kernel_kind, D))
    return edges[0]


def _tensor_fits(ctype, D, scale):
    return ctype != "float" and D in BWD_DIMS and scale > 0


def _hopper(kernel_kind, D):
    """Which Hopper kernels run, if any: "wgmma" (attend_bwd_kv_wg for dk and dv, then
    attend_bwd_q_wg for dq) or "fused" (attend_bwd_fused_wg, ordered: dk, dv and dq in one
    key-major pass, the key blocks adding into each dq tile in ascending order); kernel_kind
    names one (refused where it cannot run), or "auto": HOPPER_AUTO on a compute capability 9.0
    device with D in BWD_WG_DIMS."""
    if kernel_kind == "auto":
        return HOPPER_AUTO if D in BWD_WG_DIMS and wgmma_available() else None
    if kernel_kind not in ("wgmma", "fused"):
        return None
    if D not in BWD_WG_DIMS or not wgmma_available():
        raise HpcattnError(f"the Hopper backward takes D in {BWD_WG_DIMS} on a compute capability 9.0 device")
    return kernel_kind


def _tensor(cp, args, grads, edges, mask, G, k0, scale, ctype, otype, qpos, sq=None, sk=None, hopper=None):
    """attend_bwd_kv (dk, dv: a block per 16 W keys of a kv head; hopper "wgmma":
    attend_bwd_kv_wg, a block per 64 NWG keys) then attend_bwd_q (dq and the edges: a block per
    16 W query rows of a head; "wgmma": attend_bwd_q_wg, a block per 64 NWG query rows, heaviest
    first on a 1-D grid), or hopper "fused": attend_bwd_fused_wg alone (a block per 64 NWG keys
    of a kv head, kv heads fastest on a 1-D grid; dq added into float32 sums, then stored in
    otype when that is not float), on args = (q, qpos, k, v, do, lse, delta);
    rows_unsorted first tells attend_bwd_kv whether it may search the positions (none to search
    when qpos is the null pointer: row r at position r). sq, sk: the row strides of q (do, dq)
    and k (v, dk, dv), head-major contiguous when not given."""
    q, k = args[0], args[2]
    B, Hkv, _, nq, D = q.shape
    nk = k.shape[2]
    unsorted = np.uintp(0)
    if not isinstance(qpos, np.uintp):
        unsorted = cp.zeros(1, dtype=cp.int32)
        launch("rows_unsorted", (min(1024, -(-nq // 256)),), 0, (qpos, np.int32(nq), unsorted), threads=256)
    tail = (np.int32(nq), np.int32(nk), np.int32(G), np.int64(k0), np.float32(scale), np.int64(0))
    tail += tuple(np.int64(x) for x in (*(sq or row_strides(q)), *(sk or row_strides(k)))) + (np.int32(Hkv * G),)
    words = device_mask(mask)
    dq, dk, dv = grads
    kv_args, q_args = args + (dk, dv, words, unsorted) + tail, args + (dq, edges, words) + tail
    if hopper == "fused":
        shape, heads = BWD_FUSED_SHAPES[D], B * Hkv * G
        acc = dq if otype == "float" else cp.zeros(q.shape, dtype=cp.float32)
        turns = cp.zeros(heads * -(-nq // 64) * (D // 64), dtype=cp.int32)  # a counter per (head, tile, slice)
        launch(bwd_fused_name(ctype, D, otype, True), (-(-nk // (64 * shape[0])) * B * Hkv,), bwd_fused_smem(D),
               args + (dk, dv, acc, edges, turns, words, unsorted) + tail, threads=bwd_wg_threads(shape))
        if acc is not dq:
            launch(f"store_rows<{ctype}, {D}>", (-(-heads * nq * D // 8 // 256),), 0,
                   (acc, dq, np.int32(nq), np.int64(heads * nq)) + tail[6:9] + tail[-1:], threads=256)
    elif hopper == "wgmma":
        kv, qm = BWD_WG_SHAPES[D], BWD_WG_Q_SHAPES[D]
        launch(bwd_wg_name(ctype, D, otype), (-(-nk // (64 * kv[0])), B * Hkv), bwd_wg_smem(D), kv_args,
               threads=bwd_wg_threads(kv))
        launch(bwd_wg_q_name(ctype, D, otype), (-(-nq // (64 * qm[0])) * B * Hkv * G,), bwd_wg_q_smem(D), q_args,
               threads=bwd_wg_threads(qm))
    else:
        wk, _, _, wq, _, _, _ = BWD_SHAPES[D]
        (kv_name, q_name), (kv_smem, q_smem) = bwd_names(ctype, D, otype), bwd_smem(D)
        launch(kv_name, (-(-nk // (16 * wk)), B * Hkv), kv_smem, kv_args, threads=32 * wk)
        launch(q_name, (-(-nq // (16 * wq)), B * Hkv * G), q_smem, q_args, threads=32 * wq)
