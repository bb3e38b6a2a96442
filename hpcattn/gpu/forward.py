"""The GPU forward: `attend` (the implicit terms on the tensor-core, Hopper or CUDA-core kernel,
listed terms by attend_rows merged in, key chunks on their own streams when few query rows
would not fill the device) and `attend_lean` (the least memory per token). Layouts are those
of hpcattn/cpu/local.py; inputs are checked on the host (gpu/encode.py) before any launch.
"""
import numpy as np

from ..errors import HpcattnError
from ..masks import Mask
from .encode import check, device_mask, device_positions, listed_terms, run_start, window_only
from .listed import attend_listed
from .loader import cupy, kernel_with_smem, launch, sm_count, wgmma_available
from .merge import merge
from .shapes import (BK, BQ, DENSE_SHAPES, MMA_DIMS, MMA_SHAPES, WG_DIMS, WG_SHAPES, dense_name, dense_smem, mma_name,
                     mma_smem, wg_name, wg_smem)

WG_CTAS = None  # blocks of the persistent wgmma kernel; None: as many as the SMs hold (tests lower it)
SPLIT_KEYS = 4096  # the fewest keys per chunk when few query rows split the keys (flash-decoding)
_streams = {}  # device -> the streams of the key chunks, made once, reused by every call
NULL = np.uintp(0)  # no positions array: the kernels derive row r's position q0 + r


def row_strides(x):
    """(bs, hs, rs), in elements, of a (B, Hkv, G, n, D) or (B, Hkv, n, D) array whose heads
    (Hkv x G flattened) are evenly spaced and whose rows start on 16 bytes with D contiguous:
    kernels/tiles.cuh's Strides, so the tensor-core kernels read and write it in place. None
    for any other layout (the caller copies)."""
    item, shape = x.itemsize, x.shape
    st = [s // item for s in x.strides]
    if x.ndim == 5:
        if shape[1] > 1 and shape[2] > 1 and st[1] != shape[2] * st[2]:
            return None
        st = [st[0], st[2] if shape[2] > 1 else st[1], st[3], st[4]]
        shape = (shape[0], shape[1] * shape[2], shape[3], shape[4])
    bs, hs, rs, ds = (s if n > 1 else 0 for s, n in zip(st, shape))
    if ds not in (0, 1) or x.data.ptr % 16 or any(s * item % 16 for s in (bs, hs, rs)):
        return None
    return bs, hs, rs


def _readable(cp, q, k, v, strided=True):
    """(q, k, v, q's row_strides, k's and v's) as a kernel reads them: in place where it takes
    their strides (`strided`: the tensor-core kernels; k and v alike), else C-contiguous copies."""
    sq, sk = (row_strides(q), row_strides(k)) if strided else (None, None)
    if sq is None:
        q = cp.ascontiguousarray(q)
        sq = row_strides(q)
    if sk is None or k.strides != v.strides:
        k, v = cp.ascontiguousarray(k), cp.ascontiguousarray(v)
        sk = row_strides(k)
    return q, k, v, sq, sk


def stride_args(q, k, o, H):
    """The kernels' STRIDE_ARGS (kernels/tiles.cuh) for q, k and v (one layout), o."""
    return _stride_args(row_strides(q), row_strides(k), row_strides(o), H)


def _stride_args(sq, sk, so, H):
    return tuple(np.int64(x) for x in (*sq, *sk, *so)) + (np.int32(H),)


def _wgmma_spec(ctype, D, otype, nq, heads, shape=None, dense=False, **form):
    """(name, grid, shared bytes, threads, arguments after the strides) of the persistent Hopper
    kernels: each block walks work items (rows x head), heavy-first in a snake over the blocks.
    dense: attend_fwd_dense (hopper_form says where it applies); shape and form (sched, kt, win):
    another of attend_fwd_wgmma's forms than WG_SHAPES' default (shapes.wg_name)."""
    if dense:
        nwg, minb = (shape or DENSE_SHAPES[D])[0], 1
        name, smem = dense_name(ctype, D, otype, shape), dense_smem(D, shape)
    else:
        nwg, _, minb, _ = shape or WG_SHAPES[D]
        name, smem = wg_name(ctype, D, otype, shape, **form), wg_smem(D, shape)
    items = (nq + 64 * nwg - 1) // (64 * nwg) * heads
    ctas = min(items, WG_CTAS or sm_count() * minb)
    return name, (ctas,), smem, 128 * (nwg + 1), (np.int32(heads),)


def hopper_form(tensor, mask, D, run):
    """The Hopper forward's form for a call: attend_fwd_dense ({"dense": True}) where the mask's
    implicit part is one full or window term (dense causal blocks among them) and the rows are
    one run (no positions array), else attend_fwd_wgmma's default ({})."""
    return {"dense": True} if tensor == "wgmma" and run and D in DENSE_SHAPES and window_only(mask) else {}


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


def _mma_spec(ctype, D, otype, nq, heads):
    """As _wgmma_spec, for attend_fwd_mma: a block per 16 * rm * w rows of a head."""
    w, rm = MMA_SHAPES[D][:2]
    rows = 16 * rm * w
    return mma_name(ctype, D, otype), ((nq + rows - 1) // rows, heads), mma_smem(D), 32 * w, ()


class Launch:
    """One tensor-core forward launch with everything but its arrays fixed: the kernel (its
    shared-memory limit set), grid, sizes, offsets, scale and strides. Made once per shape, it
    leaves a repeated call (a decode step, a training loop) only its arrays to pass. form (the
    Hopper kernel's shape, sched, kt, win): a job's choice of another of its forms."""

    def __init__(self, tensor, ctype, D, otype, q_shape, nk, k0, q0, scale, mask, strides, **form):
        B, Hkv, G, nq, _ = q_shape
        spec = _wgmma_spec if tensor == "wgmma" else _mma_spec
        name, self.grid, self.smem, threads, extra = spec(ctype, D, otype, nq, B * Hkv * G, **form)
        self.fn, self.block = kernel_with_smem(name, self.smem), (threads,)
        self.lse_shape, self.words = (B, Hkv * G, nq), device_mask(mask)
        self.tail = (np.int32(nq), np.int32(nk), np.int32(G), np.int64(k0), np.float32(scale),
                     np.int64(q0)) + _stride_args(*strides, Hkv * G) + extra

    def __call__(self, q, pos, k, v, o):
        """(lse (B, H, nq) float32, edges as a 0-d device count) of o written in place; pos: the
        device positions or np.uintp(0) (row r at position q0 + r)."""
        cp = cupy()
        lse = cp.empty(self.lse_shape, dtype=cp.float32)
        edges = cp.zeros(1, dtype=cp.uint64)
        self.fn(self.grid, self.block, (q, pos, k, v, o, lse, edges, self.words) + self.tail, shared_mem=self.smem)
        return lse, edges[0]


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
    q, k, v, _, _ = _readable(cp, q, k, v, _tensor_kernel(ctype, D, scale, kernel_kind) is not None)
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
    """One launch of the implicit-term kernel over q, k, v as _readable gives them; (o, lse)
    float32, edges added into `edges`."""
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    o = cp.empty((B, Hkv, G, nq, D), dtype=cp.float32)  # the kernels write every row
    lse = cp.empty((B, Hkv, G, nq), dtype=cp.float32)
    tensor = _tensor_kernel(ctype, D, scale, kernel_kind)
    q0 = run_start(qpos) if tensor else None  # rows in a run: no positions array for the kernels
    pos = device_positions(qpos) if q0 is None else NULL
    common = (q, pos, k, v, o, lse, edges, device_mask(mask), np.int32(nq), np.int32(nk))
    if tensor:
        name, grid, smem, threads, extra = (_wgmma_spec if tensor == "wgmma" else _mma_spec)(
            ctype, D, "float", nq, B * Hkv * G, **hopper_form(tensor, mask, D, q0 is not None))
        launch(name, grid, smem, common + (np.int32(G), np.int64(k0), np.float32(scale), np.int64(q0 or 0))
               + stride_args(q, k, o, Hkv * G) + extra, threads)
    else:
        smem = 4 * (BQ * dmax + BK * (dmax + 1) + BK * dmax)
        launch(f"attend_fwd<{ctype}, {dmax}>", ((nq + BQ - 1) // BQ, B * Hkv * G), smem,
               common + (np.int32(D), np.int32(G), np.int64(k0), np.float32(scale)))
    return o, lse


def attend_lean(q, q0, k, v, k0, mask, scale, bf16=False, out=None, kernel_kind="auto", qpos=None):
    """The tensor-core forward with the least memory per token, for self-attention over very
    long sequences (jobs/gpu_bench.py's longest context): query row r sits at position q0 + r
    (no position array) and o comes in the input dtype (bfloat16 as uint16 bits), lse float32:
    2*D*4 + 4 bytes per token and head with q, k, v. out: where o goes (like q; q itself is
    allowed, each kernel block reads its q rows before writing those rows of o), saving 2*D
    more. Implicit mask terms, D in MMA_DIMS; kernel_kind "auto", "wgmma" or "mma" as in
    `attend`. q, k, v and out may be views in any layout row_strides takes (the caller's
    (B, N, H, D) arrays as heads() views): no copy. qpos, when given, replaces q0 + r. Returns
    (o, lse, edges) with edges a 0-d device count (int() it when needed: no wait here); o is the
    normalised output, not a float32 partial for merge."""
    cp = cupy()
    B, Hkv, G, nq, D = q.shape
    ctype, _ = check(q, qpos, k, v, k0, bf16)
    if ctype == "float" or D not in MMA_DIMS or listed_terms(mask) or not scale > 0 or kernel_kind == "simt":
        raise HpcattnError(f"attend_lean takes float16/bfloat16, D in {MMA_DIMS}, implicit mask terms, scale > 0 "
                           "and a tensor-core kernel")
    if not 0 <= q0 <= 2**62 - nq:
        raise HpcattnError(f"query offset {q0} with {nq} rows leaves [0, 2**62)")
    o = cp.empty(q.shape, dtype=q.dtype) if out is None else out
    so = row_strides(o)
    if o.shape != q.shape or o.dtype != q.dtype or so is None:
        raise HpcattnError(f"out must be a {q.dtype} array of shape {q.shape} with 16-byte aligned rows")
    return _lean(cp, q, qpos, q0, k, v, k0, mask, scale, ctype, o, so, _tensor_kernel(ctype, D, scale, kernel_kind))


def _lean(cp, q, qpos, q0, k, v, k0, mask, scale, ctype, o, so, tensor):
    """attend_lean's launch on checked arguments (o's row strides so)."""
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    q, k, v, sq, sk = _readable(cp, q, k, v)
    if nq and nk and B * Hkv * G:
        run = Launch(tensor, ctype, D, ctype, q.shape, nk, k0, q0, scale, mask, (sq, sk, so),
                     **hopper_form(tensor, mask, D, qpos is None))
        lse, edges = run(q, NULL if qpos is None else device_positions(qpos), k, v, o)
        return o, lse.reshape(B, Hkv, G, nq), edges
    o.fill(0)
    return o, cp.full((B, Hkv, G, nq), -np.inf, dtype=cp.float32), cp.zeros((), dtype=cp.uint64)


def launch_for(q, k, v, out, mask, scale):
    """attend_out's one-launch case for rows at positions 0 .. nq-1 over keys from 0 as a
    Launch on arrays shaped and laid out like these (callers cache it by shape), or None where
    attend_out takes another path."""
    cp = cupy()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    if (out.dtype != q.dtype or q.dtype.itemsize != 2 or D not in MMA_DIMS or not scale > 0 or listed_terms(mask)
            or not nq * nk * B * Hkv * G or k.strides != v.strides or _key_chunks(cp, nq, B * Hkv * G, nk) != 1):
        return None
    strides = (row_strides(q), row_strides(k), row_strides(out))
    if None in strides:
        return None
    ctype, _ = check(q, None, k, v, 0, False)
    tensor = _tensor_kernel(ctype, D, scale, "auto")
    return Launch(tensor, ctype, D, ctype, q.shape, nk, 0, 0, scale, mask, strides, **hopper_form(tensor, mask, D, True))


def attend_out(q, qpos, k, v, k0, mask, scale, out):
    """local.attend's device side writing o into `out` (any float dtype, any layout): the
    tensor-core kernel writes out in place where it applies (out in q's half-precision dtype,
    implicit terms, D in MMA_DIMS, rows that fill the device), else `attend` and a cast into
    out. qpos None: query r at position r. Returns (out, lse, edges), edges a device count."""
    cp = cupy()
    B, Hkv, G, nq, D = q.shape
    if out.dtype == q.dtype and q.dtype.itemsize == 2 and D in MMA_DIMS and scale > 0 and not listed_terms(mask):
        so = row_strides(out)
        if so is not None and _key_chunks(cp, nq, B * Hkv * G, k.shape[2]) == 1:
            ctype, _ = check(q, qpos, k, v, k0, False)
            return _lean(cp, q, qpos, 0, k, v, k0, mask, scale, ctype, out, so, _tensor_kernel(ctype, D, scale, "auto"))
    if qpos is None:
        qpos = np.arange(nq, dtype=np.int64)
    o, lse, edges = attend(q, qpos, k, v, k0, mask, scale)
    out[...] = o
    return out, lse, edges
