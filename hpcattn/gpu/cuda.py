"""GPU local kernels: the launches hpcattn needs, over the loader (gpu/loader.py), the shape
table (gpu/shapes.py) and the host-side checks and encodings (gpu/encode.py). Layouts are those
of hpcattn/cpu/local.py. Inputs are checked on the host, before any launch.
"""
import numpy as np

from ..errors import HpcattnError
from ..masks import Mask
from .encode import check, device_copy, listed_terms, mask_words, positions
from .loader import cupy, kernel, launch, sm_count, wgmma_available
from .shapes import (BK, BQ, MMA_DIMS, MMA_SHAPES, ROW_WARPS, WG_DIMS, WG_SHAPES, mma_name, mma_smem, wg_name,
                     wg_smem)


WG_CTAS = None  # blocks of the persistent wgmma kernel; None: as many as the SMs hold (tests lower it)
SPLIT_KEYS = 4096  # the fewest keys per chunk when few query rows split the keys (flash-decoding)
_streams = {}  # device -> the streams of the key chunks, made once, reused by every call


def _launch_wgmma(ctype, D, otype, nq, heads, args):
    """The persistent Hopper kernel: each block walks work items (rows x head) gridDim apart."""
    nwg, _, minb, _ = WG_SHAPES[D]
    items = (nq + 64 * nwg - 1) // (64 * nwg) * heads
    ctas = min(items, WG_CTAS or sm_count() * minb)
    launch(wg_name(ctype, D, otype), (ctas,), wg_smem(D), args + (np.int32(heads),), threads=128 * (nwg + 1))


def _tensor_kernel(ctype, D, scale, kernel_kind):
    """'wgmma', 'mma' or None (the CUDA-core kernel) for the implicit terms; kernel_kind as in
    `attend`. The tensor-core kernels need scale > 0 (row maxima of unscaled scores)."""
    ok = ctype != "float" and D in MMA_DIMS and scale > 0
    hopper = ok and D in WG_DIMS and wgmma_available()
    if kernel_kind == "wgmma" and not hopper:
        raise HpcattnError(f"the Hopper kernel takes float16/bfloat16, D in {WG_DIMS} and scale > 0 on a compute "
                           f"capability 9.0 device; this one is {cupy().cuda.Device().compute_capability}")
    if kernel_kind == "mma" and not ok:
        raise HpcattnError(f"the tensor-core kernel takes float16/bfloat16 with D in {MMA_DIMS} and scale > 0")
    if kernel_kind == "simt" or not ok:
        return None
    return "wgmma" if kernel_kind == "wgmma" or (kernel_kind == "auto" and hopper) else "mma"


def _launch_mma(ctype, D, otype, nq, heads, args):
    w, rm = MMA_SHAPES[D][:2]
    rows = 16 * rm * w
    launch(mma_name(ctype, D, otype), ((nq + rows - 1) // rows, heads), mma_smem(D), args, threads=32 * w)


def attend(q, qpos, k, v, k0, mask, scale, bf16=False, kernel_kind="auto"):
    """local.attend on the GPU: (o, lse, edges) with o, lse float32 cupy arrays.
    bf16=True reads uint16 inputs as bfloat16 bit patterns. kernel_kind for the implicit
    terms: "wgmma" (Hopper's warpgroup MMA: float16/bfloat16, D in WG_DIMS), "mma" (tensor
    cores: float16/bfloat16, D in MMA_DIMS), "simt" (any dtype, D <= 256) or "auto" (the first
    of these that applies). Listed terms (random, csr) run in attend_rows and are merged in."""
    cp = cupy()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    ctype, dmax = check(q, qpos, k, v, k0, bf16)
    listed = listed_terms(mask)
    if nq == 0 or nk == 0 or B * Hkv * G == 0 or len(listed) == len(mask.terms):
        o = cp.zeros((B, Hkv, G, nq, D), dtype=cp.float32)
        lse = cp.full((B, Hkv, G, nq), -cp.inf, dtype=cp.float32)
        if nq == 0 or nk == 0 or B * Hkv * G == 0:
            return o, lse, 0
        edges = 0
    else:
        o, lse, edges = _implicit(cp, q, qpos, k, v, k0, mask, scale, ctype, dmax, kernel_kind)
    if listed:  # several listed terms: their union, as masks.Mask.columns builds it
        source = listed[0] if len(listed) == 1 else Mask(mask.spec, listed, False)
        po, pl, pe = attend_listed(cp, q, qpos, k, v, k0, mask, source, scale, ctype, dmax)
        o, lse = merge(o, lse, po, pl)
        edges += pe
    return o, lse, edges


def _key_chunks(cp, nq, heads, nk):
    """Chunks to split the keys into so that few query rows (decode) still fill the GPU: about
    two blocks of 64 rows x head per SM over all `heads` (batch x query heads), chunks of at
    least SPLIT_KEYS keys; 1 where the rows alone fill it (prefill)."""
    sms = sm_count()
    return max(1, min(2 * sms // (-(-nq // 64) * heads), nk // SPLIT_KEYS))


def _implicit(cp, q, qpos, k, v, k0, mask, scale, ctype, dmax, kernel_kind):
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    q, k, v = cp.ascontiguousarray(q), cp.ascontiguousarray(k), cp.ascontiguousarray(v)
    edges = cp.zeros(1, dtype=cp.uint64)
    chunks = _key_chunks(cp, nq, B * Hkv * G, nk)
    if chunks == 1:
        o, lse = _launch_implicit(cp, q, qpos, k, v, k0, mask, scale, ctype, dmax, kernel_kind, edges)
        return o, lse, int(edges.get()[0])
    # flash-decoding: every (batch, kv head, key chunk) on its own stream at once, one partial
    # (o, lse) per chunk, folded by the one merge; the slices are contiguous views, not copies
    bounds = np.linspace(0, nk, chunks + 1).astype(np.int64)
    o = cp.empty((chunks, B, Hkv, G, nq, D), dtype=cp.float32)
    lse = cp.empty((chunks, B, Hkv, G, nq), dtype=cp.float32)
    pool = _streams.setdefault(cp.cuda.Device().id, [])  # made once, reused by every call
    pool += [cp.cuda.Stream(non_blocking=True) for _ in range(min(chunks * B * Hkv, 32) - len(pool))]
    streams = pool[:min(chunks * B * Hkv, 32)]
    other = cp.zeros(1, dtype=cp.uint64)  # edges are counted per head: those of (0, 0) only
    # the positions and mask words go to the device on this stream, before `done`: every launch reuses them
    device_copy("qpos", qpos, positions)
    device_copy("mask", mask, mask_words)
    done = cp.cuda.get_current_stream().record()
    for n, (c, b, h) in enumerate(np.ndindex(chunks, B, Hkv)):
        a, z, sl = int(bounds[c]), int(bounds[c + 1]), (slice(b, b + 1), slice(h, h + 1))
        with streams[n % len(streams)] as st:
            st.wait_event(done)
            o[c][sl], lse[c][sl] = _launch_implicit(cp, q[sl], qpos, k[sl + (slice(a, z),)], v[sl + (slice(a, z),)],
                                                    k0 + a, mask, scale, ctype, dmax, kernel_kind,
                                                    edges if b == h == 0 else other)
    for st in streams:
        cp.cuda.get_current_stream().wait_event(st.record())
    out, out_lse = o[0], lse[0]
    for c in range(1, chunks):
        out, out_lse = merge(out, out_lse, o[c], lse[c])
    return out, out_lse, int(edges.get()[0])


def _launch_implicit(cp, q, qpos, k, v, k0, mask, scale, ctype, dmax, kernel_kind, edges):
    """One launch of the implicit-term kernel over C-contiguous q, k, v; (o, lse) float32,
    edges added into `edges`."""
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    o = cp.empty((B, Hkv, G, nq, D), dtype=cp.float32)  # the kernels write every row
    lse = cp.empty((B, Hkv, G, nq), dtype=cp.float32)
    tensor = _tensor_kernel(ctype, D, scale, kernel_kind)
    common = (q, device_copy("qpos", qpos, positions), k, v, o, lse, edges, device_copy("mask", mask, mask_words),
              np.int32(nq), np.int32(nk))
    if tensor:
        launch_tc = _launch_wgmma if tensor == "wgmma" else _launch_mma
        launch_tc(ctype, D, "float", nq, B * Hkv * G,
                  common + (np.int32(G), np.int64(k0), np.float32(scale), np.int64(0)))
    else:
        smem = 4 * (BQ * dmax + BK * (dmax + 1) + BK * dmax)
        launch(f"attend_fwd<{ctype}, {dmax}>", ((nq + BQ - 1) // BQ, B * Hkv * G), smem,
               common + (np.int32(D), np.int32(G), np.int64(k0), np.float32(scale)))
    return o, lse


def attend_lean(q, q0, k, v, k0, mask, scale, bf16=False, out=None, kernel_kind="auto"):
    """The tensor-core forward with the least memory per token, for self-attention over very
    long sequences (jobs/gpu_bench.py's longest context): query row r sits at position q0 + r
    (no position array) and o comes in the input dtype (bfloat16 as uint16 bits), lse float32:
    2*D*4 + 4 bytes per token and head with q, k, v. out: where o goes (like q; q itself is
    allowed, each kernel block reads its q rows before writing those rows of o), saving 2*D
    more. Implicit mask terms, D in MMA_DIMS; kernel_kind "auto", "wgmma" or "mma" as in
    `attend`. Returns (o, lse, edges); o is the normalised output, not a float32 partial for merge."""
    cp = cupy()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    ctype, _ = check(q, None, k, v, k0, bf16)
    if ctype == "float" or D not in MMA_DIMS or listed_terms(mask) or not scale > 0 or kernel_kind == "simt":
        raise HpcattnError(f"attend_lean takes float16/bfloat16, D in {MMA_DIMS}, implicit mask terms, scale > 0 "
                           "and a tensor-core kernel")
    launch_tc = _launch_wgmma if _tensor_kernel(ctype, D, scale, kernel_kind) == "wgmma" else _launch_mma
    if not 0 <= q0 <= 2**62 - nq:
        raise HpcattnError(f"query offset {q0} with {nq} rows leaves [0, 2**62)")
    q = cp.ascontiguousarray(q)
    o = cp.empty(q.shape, dtype=q.dtype) if out is None else out
    if o.shape != q.shape or o.dtype != q.dtype or not o.flags.c_contiguous:
        raise HpcattnError(f"out must be a contiguous {q.dtype} array of shape {q.shape}")
    lse = cp.empty((B, Hkv, G, nq), dtype=cp.float32)
    edges = cp.zeros(1, dtype=cp.uint64)
    if nq and nk and B * Hkv * G:
        launch_tc(ctype, D, ctype, nq, B * Hkv * G,
                  (q, np.uintp(0), cp.ascontiguousarray(k), cp.ascontiguousarray(v), o, lse, edges,
                   device_copy("mask", mask, mask_words), np.int32(nq), np.int32(nk), np.int32(G),
                   np.int64(k0), np.float32(scale), np.int64(q0)))
    else:
        o.fill(0)
        lse.fill(-np.inf)
    return o, lse, int(edges.get()[0])


def random_columns(term, qpos):
    """(device int64 (nq*r) columns, r) of a random term's rows, drawn on the device exactly
    as masks.random_keys draws them (kernels/attend_rows.cu: random_columns)."""
    cp = cupy()
    if getattr(term, "n", None) is None:
        term.columns(qpos, 0, 0)  # raises the term's own "bind the number of keys" error
    r, nq = min(term.r, term.n), len(qpos)
    out = cp.empty(nq * r, dtype=cp.int64)
    if nq and r:
        kernel("random_columns")(((nq + 127) // 128,), (128,),
                                 (np.uint64(term.seed % 2**64), device_copy("qpos", qpos, positions),
                                  np.int32(nq), np.int64(r), np.int64(term.n), out))
    return out, r


def host_columns(term, qpos, k0, k1):
    """A listed term's (indptr, columns) for this key block, bounds-checked on the host."""
    if not hasattr(term, "columns"):
        raise HpcattnError("this version of hpcattn.masks cannot list the union of several random/csr terms")
    indptr, cols = (np.asarray(a, dtype=np.int64) for a in term.columns(qpos, k0, k1))
    nq = len(qpos)
    if (indptr.shape != (nq + 1,) or indptr[0] != 0 or indptr[-1] != cols.size
            or (np.diff(indptr) < 0).any() or (cols.size and (cols.min() < k0 or cols.max() >= k1))):
        raise HpcattnError(f"mask term {type(term).__name__} gave malformed columns for keys [{k0}, {k1})")
    return indptr, cols


def attend_listed(cp, q, qpos, k, v, k0, mask, term, scale, ctype, dmax):
    """(o, lse, edges) of a listed term's edges (random drawn on the device, csr listed on the
    host) by attend_rows, the mask's implicit terms and causal flag applied on top."""
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    if getattr(term, "drawn", False):  # the device draws the columns (random)
        cols, width = device_copy(("random", term), qpos, lambda p: random_columns(term, p)[0]), \
            min(term.r, term.n or 0)
        indptr = cp.zeros(1, dtype=cp.int64)
        if width == 0:
            cols = None
    else:
        indptr, cols = (cp.asarray(a) for a in host_columns(term, qpos, k0, k0 + nk))
        width = 0
    o = cp.empty((B, Hkv, G, nq, D), dtype=cp.float32)
    lse = cp.empty((B, Hkv, G, nq), dtype=cp.float32)
    if cols is None or cols.size == 0:
        o.fill(0)
        lse.fill(-np.inf)
        return o, lse, 0
    edges = cp.zeros(1, dtype=cp.uint64)
    kernel(f"attend_rows<{ctype}, {dmax}>")(
        ((nq + ROW_WARPS - 1) // ROW_WARPS, B * Hkv * G), (32 * ROW_WARPS,),
        (cp.ascontiguousarray(q), device_copy("qpos", qpos, positions), cp.ascontiguousarray(k),
         cp.ascontiguousarray(v), indptr, cols, np.int64(width), o, lse, edges,
         device_copy("mask", mask, mask_words), np.int32(nq), np.int32(nk), np.int32(D), np.int32(G),
         np.int64(k0), np.float32(scale)))
    return o, lse, int(edges.get()[0])


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
           (cp.ascontiguousarray(q), device_copy("qpos", qpos, positions), cp.ascontiguousarray(k),
            cp.ascontiguousarray(v), cp.ascontiguousarray(do),
            cp.ascontiguousarray(lse, dtype=cp.float32), cp.ascontiguousarray(delta, dtype=cp.float32),
            dq, dk, dv, edges, device_copy("mask", mask, mask_words),
            np.int32(nq), np.int32(nk), np.int32(D), np.int32(G), np.int64(k0), np.float32(scale)))
    return dq, dk, dv, int(edges.get()[0])


def merge(o_a, lse_a, o_b, lse_b):
    """merge.merge fused into one kernel for float32 cupy states of equal shapes."""
    cp = cupy()
    o_a, o_b = cp.ascontiguousarray(o_a), cp.ascontiguousarray(o_b)
    lse_a, lse_b = cp.ascontiguousarray(lse_a), cp.ascontiguousarray(lse_b)
    o, lse = cp.empty_like(o_a), cp.empty_like(lse_a)
    n = o.size
    if n:
        D = o.shape[-1]
        kernel("merge_states")(((n + 255) // 256,), (256,),
                               (o_a, lse_a, o_b, lse_b, o, lse, np.int64(lse.size), np.int32(D)))
    elif lse.size:
        lse[...] = cp.logaddexp(lse_a, lse_b)
    return o, lse
