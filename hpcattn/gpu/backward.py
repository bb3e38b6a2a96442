"""The GPU backward, implicit mask terms: the tensor-core kernels (kernels/attend_bwd_mma.cu:
float16/bfloat16, D in BWD_DIMS) or the CUDA-core one (kernels/attend.cu: attend_bwd, any dtype
and head dim). `backward` adds one key block's share into float32 accumulators (the variants'
contract); `backward_out` writes a whole rank's gradients in the caller's dtype and layout."""
import numpy as np

from ..errors import HpcattnError
from .encode import check, device_mask, device_positions, listed_terms, run_start
from .forward import NULL, row_strides
from .loader import cupy, kernel, kernel_with_smem, launch, wgmma_available
from .shapes import (BK, BQ, BWD_DIMS, BWD_SHAPES, BWD_WG_DIMS, BWD_WG_Q_SHAPES, BWD_WG_SHAPES,
                     bwd_fused_name, bwd_fused_shape, bwd_fused_smem, bwd_names, bwd_smem, bwd_wg_name, bwd_wg_q_name,
                     bwd_wg_q_smem, bwd_wg_smem, bwd_wg_threads)
from .tma import TensorMaps

# what kernel_kind "auto" runs on a compute capability 9.0 device (D in BWD_WG_DIMS), by the
# mask's reach (Mask.reach): where rows reach keys without bound (causal, full) the one-pass
# fixed-point form, which skips the dQ pass's two recomputed products (through the API on an
# H100, 2026-12-06: 1.05-1.08x at causal 16K, 1.14-1.18x at 64K, D = 128); where they reach a
# band (window, block, dilated), the two passes, which skip its dq tiles' memset and conversion
# (5% faster at window:256). A str instead of the dict: that kind for every mask.
HOPPER_AUTO = {"unbounded": "fused-fixed", "bounded": "wgmma"}
FUSED = ("fused", "fused-bulk", "fused-fixed")


def backward(q, qpos, k, v, k0, mask, scale, do, lse, delta, dq=None, dk=None, dv=None, bf16=False,
             kernel_kind="auto"):
    """grad.backward on the GPU: add the key block k0..k0+nk-1's share to the float32
    accumulators dq (like q), dk, dv (like k), created as zeros when not given, and return
    (dq, dk, dv, edges). lse (B,Hkv,G,nq) is the forward's full-row log-sum-exp, delta =
    rowsum(dO * O). Implicit mask terms only (random/csr backward stays on the CPU for now).
    kernel_kind: "mma" (tensor cores: float16/bfloat16, D in BWD_DIMS, scale > 0), "wgmma" (the
    same on Hopper's warpgroup MMA: D in BWD_WG_DIMS, compute capability 9.0), "fused" (Hopper,
    dq from the key-major pass), "fused-bulk" and "fused-fixed" (the same, dq through bulk
    reductions into dq tiles), "simt" (any dtype, D <= 256) or "auto" (HOPPER_AUTO's choice for
    the mask, else mma, where it applies, else simt). Each gives the same bits on every rerun."""
    cp = cupy()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    ctype, dmax = check(q, qpos, k, v, k0, bf16)
    if do.shape != q.shape or do.dtype != q.dtype:
        raise HpcattnError(f"do must match q: {do.shape} {do.dtype} vs {q.shape} {q.dtype}")
    if listed_terms(mask):
        raise HpcattnError(f"mask {mask.spec!r}: the GPU backward takes implicit terms only")
    tensor = _tensor_fits(ctype, D, scale)
    if kernel_kind in ("mma", "wgmma") + FUSED and not tensor:
        raise HpcattnError(f"the tensor-core backward takes float16/bfloat16 with D in {BWD_DIMS} and scale > 0")
    hopper = _hopper(kernel_kind, D, mask) if tensor else None
    dq = cp.zeros(q.shape, dtype=cp.float32) if dq is None else dq
    dk = cp.zeros(k.shape, dtype=cp.float32) if dk is None else dk
    dv = cp.zeros(k.shape, dtype=cp.float32) if dv is None else dv
    for name, acc, shape in (("dq", dq, q.shape), ("dk", dk, k.shape), ("dv", dv, k.shape)):
        if acc.shape != shape or acc.dtype != cp.float32 or not acc.flags.c_contiguous:
            raise HpcattnError(f"{name} must be a contiguous float32 array of shape {shape}")
    if nq == 0 or nk == 0 or B * Hkv * G == 0:
        return dq, dk, dv, 0
    edges = cp.zeros(1, dtype=cp.uint64)
    tensor = tensor and kernel_kind != "simt"
    q0 = run_start(qpos) if tensor else None  # rows in a run: no positions array for the kernels
    args = (cp.ascontiguousarray(q), device_positions(qpos) if q0 is None else NULL, cp.ascontiguousarray(k),
            cp.ascontiguousarray(v), cp.ascontiguousarray(do), cp.ascontiguousarray(lse, dtype=cp.float32),
            cp.ascontiguousarray(delta, dtype=cp.float32))
    if tensor:
        Passes(ctype, "float", q.shape, nk, k0, scale, mask, row_strides(args[0]), row_strides(args[2]), hopper,
               q0 or 0)(args, dq, dk, dv, edges, _unsorted(cp, args[1], nq))
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
    nq = q.shape[3]
    ctype, _ = check(q, qpos, k, v, 0, False)
    run = _out_launch(q, k, v, o, do, out, mask, scale, ctype, kernel_kind)
    if run is None:
        from ..cpu.grad import row_delta
        qpos = np.arange(nq, dtype=np.int64) if qpos is None else qpos
        *grads, edges = backward(q, qpos, k, v, 0, mask, scale, do.astype(q.dtype, copy=False), lse,
                                 row_delta(do, o), kernel_kind=kernel_kind)
        for dst, src in zip(out, grads):
            dst[...] = src
        return edges
    pos = NULL if qpos is None else device_positions(qpos)
    return run(q, k, v, o, cp.ascontiguousarray(lse, dtype=cp.float32), do, *out, pos, _unsorted(cp, pos, nq))


def launch_for(q, k, v, o, do, out, mask, scale):
    """backward_out's tensor-core case (rows at positions 0 .. nq-1, kernel_kind "auto") as an
    OutLaunch on arrays shaped and laid out like these (callers cache it by shape), or None
    where backward_out takes another path."""
    ctype, _ = check(q, None, k, v, 0, False)
    return _out_launch(q, k, v, o, do, out, mask, scale, ctype, "auto")


def _out_launch(q, k, v, o, do, out, mask, scale, ctype, kernel_kind):
    """The OutLaunch of backward_out's arguments, or None where the tensor-core kernels cannot
    read and write them in place (dtype, head dim, listed terms, layouts, no rows)."""
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    sq, sk, so = row_strides(q), row_strides(k), row_strides(o)
    if not (_tensor_fits(ctype, D, scale) and kernel_kind != "simt" and not listed_terms(mask) and nq and nk
            and B * Hkv * G and None not in (sq, sk, so) and all(x.dtype == q.dtype for x in (o, do, *out))
            and row_strides(do) == row_strides(out[0]) == sq and row_strides(v) == sk
            and row_strides(out[1]) == row_strides(out[2]) == sk):
        return None
    return OutLaunch(ctype, q.shape, nk, mask, scale, sq, sk, so, _hopper(kernel_kind, D, mask))


class OutLaunch:
    """backward_out's tensor-core launches with everything but the arrays fixed: row_delta
    (delta = rowsum(dO * O) on the device) then Passes writing the gradients in the input dtype.
    Made once per shape, it leaves a repeated call (a training loop) only its arrays to pass;
    arrays are passed by pointer, so the caller's (B, N, H, D) arrays do as well as their
    head-major views."""

    def __init__(self, ctype, q_shape, nk, mask, scale, sq, sk, so, hopper):
        B, Hkv, G, nq, D = q_shape
        rows, lanes = B * Hkv * G * nq, 4 if D <= 32 else 8 if D <= 64 else 16  # row_delta's L
        self.delta_shape = (B, Hkv, G, nq)
        self.delta = kernel(f"row_delta<{ctype}, {D}>"), (-(-rows * lanes // 256),), (
            np.int32(nq), np.int64(rows)) + tuple(np.int64(x) for x in (*sq, *so)) + (np.int32(Hkv * G),)
        self.passes = Passes(ctype, ctype, q_shape, nk, 0, scale, mask, sq, sk, hopper)

    def __call__(self, q, k, v, o, lse, do, dq, dk, dv, pos=NULL, unsorted=NULL):
        """The edges (a device count) of dq, dk, dv written; lse float32 (B, H, nq) contiguous;
        pos: device positions or NULL (row r at position r), unsorted: rows_unsorted's flag."""
        cp = cupy()
        delta = cp.empty(self.delta_shape, dtype=cp.float32)
        fn, grid, tail = self.delta
        fn(grid, (256,), (do, o, delta) + tail)
        edges = cp.zeros(1, dtype=cp.uint64)
        self.passes((q, pos, k, v, do, lse, delta), dq, dk, dv, edges, unsorted)
        return edges[0]


def _tensor_fits(ctype, D, scale):
    return ctype != "float" and D in BWD_DIMS and scale > 0


def _hopper(kernel_kind, D, mask):
    """Which Hopper kernels run, if any: "wgmma" (attend_bwd_kv_wg for dk and dv, then
    attend_bwd_q_wg for dq) or "fused" (attend_bwd_fused_wg, ordered: dk, dv and dq in one
    key-major pass, the key blocks adding into each dq tile in ascending order; "fused-bulk":
    its BULK form, dq added into float32 dq tiles by bulk reductions in that order, then into
    rows; "fused-fixed": into 32-bit fixed-point tiles, in any order, the same bits); kernel_kind
    names one (refused where it cannot run), or "auto": HOPPER_AUTO's choice for the mask on a
    compute capability 9.0 device with D in BWD_WG_DIMS."""
    if kernel_kind == "auto":
        if not (D in BWD_WG_DIMS and wgmma_available()):
            return None
        return HOPPER_AUTO if isinstance(HOPPER_AUTO, str) else HOPPER_AUTO[
            "unbounded" if mask.reach() is None else "bounded"]
    if kernel_kind not in ("wgmma",) + FUSED:
        return None
    if D not in BWD_WG_DIMS or not wgmma_available():
        raise HpcattnError(f"the Hopper backward takes D in {BWD_WG_DIMS} on a compute capability 9.0 device")
    return kernel_kind


class RowScales:
    """The fixed-point scales of "fused-fixed"'s dq tiles (kernels/bwd_keys.cuh, BULK) for one
    shape: 2^e per query row (each head's rows padded to whole 64-row tiles), e the largest with
    2^e b_i <= 2^30, b_i = scale (|dO_i| max_k |V_k| + |delta_i|) max |K| a bound on any partial
    sum of row i's dq over these keys (|dS_ik| <= P_ik (|dP_ik| + |delta_i|), sum_k P_ik <= 1).
    Two small kernels (attend_bwd_mma.cu: key_maxima, row_scales) read k, v (row strides sk)
    and do (sq) in place, delta (B, Hkv, G, nq) contiguous; float32, flat."""

    def __init__(self, ctype, q_shape, nk, sq, sk, scale):
        B, Hkv, G, nq, D = q_shape
        self.kv_size, self.size = 2 * B * Hkv, B * Hkv * G * -(-nq // 64) * 64
        keys = 32 // (D // 8) * 8  # a block's: 8 warps
        self.keys = kernel(f"key_maxima<{ctype}, {D}>"), (max(1, min(-(-nk // keys), 4096 // (B * Hkv))), B * Hkv), (
            np.int32(nk),) + tuple(map(np.int64, sk)) + (np.int32(Hkv),)
        self.rows = kernel(f"row_scales<{ctype}, {D}>"), (-(-self.size * (D // 8) // 256),), (
            np.int32(nq), np.int32(G), np.float32(scale), np.int64(self.size)) + tuple(map(np.int64, sq)) + (
            np.int32(Hkv * G),)

    def __call__(self, k, v, do, delta):
        cp = cupy()
        kv, out = cp.zeros(self.kv_size, dtype=cp.uint32), cp.empty(self.size, dtype=cp.float32)
        fn, grid, tail = self.keys
        fn(grid, (256,), (k, v, kv) + tail)
        fn, grid, tail = self.rows
        fn(grid, (256,), (do, delta, kv, out) + tail)
        return out


def _unsorted(cp, pos, nq):
    """rows_unsorted's flag for device positions pos (launched here), or NULL for no positions
    (row r at position r: nothing to search)."""
    if isinstance(pos, np.uintp):
        return NULL
    flag = cp.zeros(1, dtype=cp.int32)
    launch("rows_unsorted", (min(1024, -(-nq // 256)),), 0, (pos, np.int32(nq), flag), threads=256)
    return flag


class Passes:
    """The tensor-core backward's launches for one shape, everything but the arrays fixed
    (kernels and their shared-memory limits, grids, sizes, scale, strides, mask words), on args =
    (q, qpos, k, v, do, lse, delta). hopper None: attend_bwd_kv (dk, dv: a block per 16 W keys of
    a kv head) then attend_bwd_q (dq and the edges: a block per 16 W query rows of a head);
    "wgmma": attend_bwd_kv_wg (a block per 64 NWG keys) then attend_bwd_q_wg (a block per 64 NWG
    query rows, heaviest first on a 1-D grid); "fused": attend_bwd_fused_wg alone (a block per
    64 NWG keys of a kv head on a 1-D grid, kv heads fastest; dq added into float32 sums, then
    stored in otype when that is not float); "fused-bulk", "fused-fixed": its BULK forms (dq added
    into dq tiles, then into dq or stored in otype by tile_rows_out; fused-fixed's key blocks
    fastest on the grid). The key-major kernels (fused, attend_bwd_kv_wg) read q, k, v and do by
    TMA through tensor maps (tma.TensorMaps, kept per array addresses). otype "float": dq, dk, dv
    are float32 accumulators added into, else they are written in the input dtype. sq, sk: the row
    strides of q (do, dq) and k (v, dk, dv); q0: row r's position q0 + r where args carry no
    positions."""

    def __init__(self, ctype, otype, q_shape, nk, k0, scale, mask, sq, sk, hopper, q0=0):
        B, Hkv, G, nq, D = q_shape
        heads = B * Hkv * G
        self.q_shape, self.hopper, self.otype, self.words = q_shape, hopper, otype, device_mask(mask)
        self.tail = (np.int32(nq), np.int32(nk), np.int32(G), np.int64(k0), np.float32(scale), np.int64(q0))
        self.tail += tuple(np.int64(x) for x in (*sq, *sk)) + (np.int32(Hkv * G),)
        self.maps = None
        if hopper in FUSED:
            bulk = hopper != "fused"
            self.scales = RowScales(ctype, q_shape, nk, sq, sk, scale) if hopper == "fused-fixed" else None
            ordered = hopper != "fused-fixed"
            shape, smem = bwd_fused_shape(D, ordered, bulk), bwd_fused_smem(D, ordered, bulk=bulk)
            self.fused = (kernel_with_smem(bwd_fused_name(ctype, D, otype, ordered, bulk=bulk), smem),
                          (-(-nk // (64 * shape[0])) * B * Hkv,), (bwd_wg_threads(shape),), smem)
            self.maps = TensorMaps(ctype, q_shape, nk, sq, sk, 64 * shape[0])
            self.tiles = (heads, -(-nq // 64), D // 64)  # a turn per (head, tile, 64-column slice)
            tail = (np.int32(nq), np.int64(heads * nq)) + tuple(np.int64(x) for x in sq) + (np.int32(Hkv * G),)
            self.store = None if otype == "float" and not bulk else (
                kernel(f"tile_rows_out<{otype}, {D}>" if bulk else f"store_rows<{ctype}, {D}>"),
                (-(-heads * nq * D // 8 // 256),), tail)
            return
        if hopper == "wgmma":
            (kv, qm), (kv_smem, q_smem) = (BWD_WG_SHAPES[D], BWD_WG_Q_SHAPES[D]), (bwd_wg_smem(D), bwd_wg_q_smem(D))
            names = bwd_wg_name(ctype, D, otype), bwd_wg_q_name(ctype, D, otype)
            grids = (-(-nk // (64 * kv[0])), B * Hkv), (-(-nq // (64 * qm[0])) * heads,)
            threads = bwd_wg_threads(kv), bwd_wg_threads(qm)
            self.maps = TensorMaps(ctype, q_shape, nk, sq, sk, 64 * kv[0])
        else:
            wk, _, _, wq, _, _, _ = BWD_SHAPES[D]
            names, (kv_smem, q_smem) = bwd_names(ctype, D, otype), bwd_smem(D)
            grids = (-(-nk // (16 * wk)), B * Hkv), (-(-nq // (16 * wq)), heads)
            threads = 32 * wk, 32 * wq
        self.kv, self.q = ((kernel_with_smem(n, m), g, (t,), m)
                           for n, m, g, t in zip(names, (kv_smem, q_smem), grids, threads))

    def __call__(self, args, dq, dk, dv, edges, unsorted):
        """dq, dk, dv added into (otype float) or written, the edges of query head 0 added into
        edges; unsorted: rows_unsorted's flag (NULL without positions)."""
        maps = () if self.maps is None else (self.maps(args[0], args[2], args[3], args[4]),)
        if self.hopper in FUSED:
            cp = cupy()
            acc = (cp.zeros(self.tiles + (4096,), dtype=cp.float32) if self.hopper != "fused"  # dq tiles
                   else dq if self.otype == "float" else cp.zeros(self.q_shape, dtype=cp.float32))
            fixed = self.hopper == "fused-fixed"
            turns = NULL if fixed else cp.zeros(self.tiles, dtype=cp.int32)
            tscale = self.scales(args[2], args[3], args[4], args[6]) if fixed else NULL
            fn, grid, block, smem = self.fused
            fn(grid, block, args + (dk, dv, acc, edges, turns, tscale, self.words, unsorted) + self.tail + maps,
               shared_mem=smem)
            if acc is not dq:
                fn, grid, tail = self.store
                fn(grid, (256,), (acc,) + ((tscale,) if self.hopper != "fused" else ()) + (dq,) + tail)
            return
        fn, grid, block, smem = self.kv
        fn(grid, block, args + (dk, dv, self.words, unsorted) + self.tail + maps, shared_mem=smem)
        fn, grid, block, smem = self.q
        fn(grid, block, args + (dq, edges, self.words) + self.tail, shared_mem=smem)
