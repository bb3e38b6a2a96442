"""The GPU forward: `attend` (the implicit terms on the tensor-core, Hopper or CUDA-core kernel,
listed terms by attend_rows merged in, key chunks on their own streams when few query rows
would not fill the device) and `attend_lean` (the least memory per token). Layouts are those
of hpcattn/cpu/local.py; inputs are checked on the host (gpu/encode.py) before any launch.
"""
import numpy as np

from ..errors import HpcattnError
from ..masks import Mask
from .encode import check, device_mask, device_positions, listed_terms
from .listed import attend_listed
from .loader import cupy, launch, sm_count, wgmma_available
from .merge import merge
from .shapes import BK, BQ, MMA_DIMS, MMA_SHAPES, WG_DIMS, WG_SHAPES, mma_name, mma_smem, wg_name, wg_smem

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
    device_positions(qpos)
    device_mask(mask)
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
    common = (q, device_positions(qpos), k, v, o, lse, edges, device_mask(mask), np.int32(nq), np.int32(nk))
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
                   device_mask(mask), np.int32(nq), np.int32(nk), np.int32(G),
                   np.int64(k0), np.float32(scale), np.int64(q0)))
    else:
        o.fill(0)
        lse.fill(-np.inf)
    return o, lse, int(edges.get()[0])
