"""GPU local kernels: one loader over kernels/*.cu and the launches hpcattn needs.

Every source is compiled by `cupy.RawModule` with `name_expressions` per dtype and head-dim
bucket on first use and cached per device; `kernel(name)` is the one lookup helper. Layouts
are those of hpcattn/cpu/local.py. Inputs are checked here, on the host, before any launch.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import HpcattnError
from ..masks import Mask


def kernel_dir():
    """The folder of the CUDA sources: hpcattn/kernels in an installed package (setup.py ships
    the repository's kernels/ there), else kernels/ at the top of the source tree that holds
    this package (editable installs and PYTHONPATH runs)."""
    package = Path(__file__).resolve().parents[1]
    candidates = (package / "kernels", package.parent / "kernels")
    return next((d for d in candidates if any(d.glob("*.cu"))), candidates[0])


KERNEL_DIR = kernel_dir()
CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
DMAXES = (64, 128, 256)
BQ, BK, THREADS = 16, 32, 128  # must match kernels/attend.cu
MAX_TERMS = 8                  # HPCATTN_MAX_TERMS in kernels/mask.cuh
MK = 64  # MK in kernels/attend_mma.cu
# attend_fwd_mma's shape per head dim: (warps per block, 16-row MMA tiles per warp, q kept in
# registers, K/V buffers, blocks per SM asked of the register allocator): the fastest of
# jobs/mma_tune.py's candidates on an H100 (docs/benchmarks-log.md, "GPU local kernel")
MMA_SHAPES = {32: (2, 2, True, 3, 1), 64: (2, 2, True, 3, 1), 96: (4, 1, True, 2, 1), 128: (4, 1, True, 2, 1)}
MMA_DIMS = tuple(MMA_SHAPES)
# attend_fwd_wgmma's shape per head dim (Hopper, sm_90a): (consumer warpgroups of 64 rows,
# K/V buffers, blocks per SM, q in registers), the fastest of jobs/wgmma_check.py's candidates
# on an H100 (docs/benchmarks-log.md, "GPU local kernel")
WG_SHAPES = {64: (3, 8, 1, False), 128: (2, 5, 1, True)}
WG_DIMS = tuple(WG_SHAPES)
WG_CTAS = None  # blocks of the persistent wgmma kernel; None: as many as the SMs hold (tests lower it)


def mma_name(ctype, D, otype, shape=None):
    w, rm, qreg, st, minb = shape or MMA_SHAPES[D]
    return f"attend_fwd_mma<{ctype}, {D}, {otype}, {w}, {rm}, {str(qreg).lower()}, {st}, {minb}>"


def mma_smem(D, shape=None):
    """Shared bytes of attend_fwd_mma: its K and V tile buffers (half precision, rows padded by
    8), plus the q rows unless they stay in registers (then they pass through a K/V buffer)."""
    w, rm, qreg, st, _ = shape or MMA_SHAPES[D]
    return (2 * st * MK + (0 if qreg else 16 * rm * w)) * (D + 8) * 2


def wg_name(ctype, D, otype, shape=None):
    nwg, st, minb, qreg = shape or WG_SHAPES[D]
    return f"attend_fwd_wgmma<{ctype}, {D}, {otype}, {nwg}, {st}, {minb}, {str(qreg).lower()}>"


def wg_smem(D, shape=None):
    """Shared bytes of attend_fwd_wgmma: ST K/V tile buffers, two q buffers, 1024 for alignment."""
    nwg, st, _, _ = shape or WG_SHAPES[D]
    return (2 * st * MK + 2 * 64 * nwg) * D * 2 + 1024


SOURCES = {
    "attend.cu": tuple(f"attend_{d}<{t}, {m}>" for d in ("fwd", "bwd") for t in CTYPES.values()
                       for m in DMAXES),
    "attend_mma.cu": tuple(mma_name(t, d, o) for t in ("__half", "__nv_bfloat16")
                           for d in MMA_DIMS for o in ("float", t)),
    "attend_wgmma.cu": tuple(wg_name(t, d, o) for t in ("__half", "__nv_bfloat16") for d in WG_DIMS
                             for o in ("float", t)),
    "attend_rows.cu": ("random_columns",) + tuple(f"attend_rows<{t}, {m}>" for t in CTYPES.values()
                                                  for m in DMAXES),
    "merge.cu": ("merge_states",),
}
ROW_WARPS = 4  # RWARPS in kernels/attend_rows.cu
OPTIONS = ("-std=c++17", f"-I{KERNEL_DIR}")
_modules = {}
_cache = {}
COMPILED_BY = {}  # source -> which compiler built it (for logs)


def _cp():
    import cupy
    return cupy


def _cuda_include():
    """-I for the CUDA headers (cuda_fp16.h, mma.h) that NVRTC does not find on its own: the
    first candidate that has them all. CuPy's own guess may be a pip `nvidia/cu13` folder whose
    mma.h lacks crt/mma.h (seen on the lent H100 image), so full toolkits are tried first."""
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda",
             _cp().cuda.get_cuda_path()]
    for root in filter(None, roots):
        inc = os.path.join(root, "include")
        if all(os.path.isfile(os.path.join(inc, h)) for h in ("cuda_fp16.h", "mma.h", "crt/mma.h")):
            return (f"-I{inc}",)
    return ()


def kernel(name):
    """The compiled kernel for a name expression of SOURCES, on the current device."""
    cp = _cp()
    src = next((f for f, names in SOURCES.items() if name in names), None)
    if src is None:
        raise KeyError(f"no kernel {name!r} in {KERNEL_DIR}")
    key = (cp.cuda.Device().id, src)
    if key not in _modules:
        code, names = (KERNEL_DIR / src).read_text(), list(SOURCES[src])
        options = OPTIONS + _cuda_include()
        if src in SM90A:
            _modules[key] = Sm90aModule(code, names, options)
            COMPILED_BY[src] = "nvrtc (sm_90a)"
            return _modules[key].get_function(name)
        try:
            mod = cp.RawModule(code=code, options=options, name_expressions=names)
            mod.compile()
            COMPILED_BY[src] = "nvrtc"
        except cp.cuda.compiler.CompileException as e:  # e.g. NVRTC without the CUDA headers
            COMPILED_BY[src] = f"nvcc (NVRTC failed: {str(e).splitlines()[0][:200]})"
            mod = cp.RawModule(code=code, options=options, name_expressions=names, backend="nvcc")
            mod.compile()
        _modules[key] = mod
    return _modules[key].get_function(name)


class Sm90aModule:
    """Kernels that need Hopper's arch-specific instructions (wgmma: sm_90a), compiled by NVRTC
    straight to a cubin (cupy.RawModule always adds its own plain -arch option); the part of
    RawModule's interface that `kernel` and `_launch` use. The cubin is cached on disk beside
    CuPy's own kernel cache (CUPY_CACHE_DIR), keyed by the code, every kernels/ source it may
    include, the names, the options and the NVRTC version, so that each MPI rank of a job loads
    it instead of compiling it again inside its timed attention call."""

    def __init__(self, code, names, options):
        from cupy.cuda import function
        self._mod = function.Module()
        cubin, self._lowered = self._cached(code, names, options)
        self._mod.load(cubin)

    @staticmethod
    def _cached(code, names, options):
        """(cubin bytes, lowered names) from the disk cache, else compiled and stored there."""
        from cupy.cuda import nvrtc
        sources = sorted((p.name, p.read_text()) for p in KERNEL_DIR.glob("*.cu*"))
        key = hashlib.sha256(json.dumps([code, sources, list(names), list(options), nvrtc.getVersion()])
                             .encode()).hexdigest()[:32]
        cache = os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache")  # as CuPy's
        base = Path(cache) / f"hpcattn_sm90a_{key}"
        try:
            lowered = json.loads(base.with_suffix(".json").read_text())
            if sorted(lowered) == sorted(names):
                return base.with_suffix(".cubin").read_bytes(), lowered
        except (OSError, ValueError):
            pass
        cubin, lowered = Sm90aModule._compile(code, names, options)
        try:  # atomic: a concurrent rank reads either nothing or whole files
            base.parent.mkdir(parents=True, exist_ok=True)
            for suffix, data in ((".cubin", cubin), (".json", json.dumps(lowered).encode())):
                fd, tmp = tempfile.mkstemp(dir=base.parent, prefix=base.name)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, base.with_suffix(suffix))
        except OSError:  # a read-only cache only costs the next process a compilation
            pass
        return cubin, lowered

    @staticmethod
    def _compile(code, names, options):
        cp = _cp()
        from cupy.cuda import nvrtc
        prog = nvrtc.createProgram(code, "kernels.cu", [], [])
        try:
            for n in names:
                nvrtc.addNameExpression(prog, n)
            try:
                nvrtc.compileProgram(prog, tuple(options) + ("-arch=sm_90a",))
            except nvrtc.NVRTCError as e:
                raise cp.cuda.compiler.CompileException(nvrtc.getProgramLog(prog), code, "kernels.cu",
                                                        options, "nvrtc") from e
            return nvrtc.getCUBIN(prog), {n: nvrtc.getLoweredName(prog, n) for n in names}
        finally:
            nvrtc.destroyProgram(prog)

    def get_function(self, name):
        return _Sm90aFunction(self._mod.get_function(self._lowered[name]))


class _Sm90aFunction:
    def __init__(self, fn):
        self._fn = fn

    @property
    def max_dynamic_shared_size_bytes(self):
        return None

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, nbytes):
        from cupy.cuda import driver
        driver.funcSetAttribute(self._fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)

    def __call__(self, grid, block, args, shared_mem=0):
        self._fn(grid, block, args, shared_mem=shared_mem)


SM90A = ("attend_wgmma.cu",)  # sources built for sm_90a only


def wgmma_available():
    """Whether this device runs the Hopper kernel (compute capability 9.0) and NVRTC builds it;
    a build failure is remembered in COMPILED_BY and the tensor-core kernel serves instead."""
    cp = _cp()
    dev = cp.cuda.Device()
    key = ("wgmma", dev.id)
    if key not in _cache:
        ok = dev.compute_capability == "90"
        if ok:
            try:
                kernel(wg_name("__half", WG_DIMS[0], "float"))
            except (cp.cuda.compiler.CompileException, RuntimeError, OSError) as e:  # NVRTC errors, no libnvrtc
                why = (str(e).splitlines() or [type(e).__name__])[0][:200]
                COMPILED_BY["attend_wgmma.cu"] = f"unavailable (NVRTC failed: {why}); attend_mma.cu serves"
                ok = False
        _cache[key] = ok
    return _cache[key]


def dtype_name(x, bf16=False):
    """'float32' | 'float16' | 'bfloat16' for an array. CuPy has no bfloat16 dtype: bfloat16
    data travels as uint16 bit patterns (e.g. a torch tensor's memory) with bf16=True."""
    name = str(x.dtype)
    if bf16 and name == "uint16":
        return "bfloat16"
    return name


def _bucket(D):
    for m in DMAXES:
        if D <= m:
            return m
    raise HpcattnError(f"head dim {D} is above the GPU kernels' limit {DMAXES[-1]}")


def listed_terms(mask):
    """The terms whose edges are lists of columns (random, csr: `Term.listed`)."""
    return [t for t in mask.terms if t.listed]


def mask_words(mask):
    """The device encoding of a mask's implicit terms and causal flag (kernels/mask.cuh):
    int64 [n, causal, (kind, a, b)*n, zeros to MAX_TERMS]. Listed terms (random, csr) are left
    to attend_rows."""
    words, n = [], 0
    for t in mask.terms:
        if t.listed:
            continue
        n += 1
        code = t.device_words()
        if code is None:
            raise HpcattnError(f"mask term {t!r} of {mask.spec!r} has no GPU kernel yet")
        words += list(code)
    if n > MAX_TERMS:
        raise HpcattnError(f"mask {mask.spec!r} has {n} terms; the GPU kernels take {MAX_TERMS}")
    words += [0] * (3 * MAX_TERMS - len(words))  # fixed length: a warp reads it in one step
    return np.array([n, int(mask.causal), *words], dtype=np.int64)


def _device_copy(tag, host, make=np.asarray):
    """A device copy of make(host), reused while the same object is passed again (the ring
    passes the same positions and mask every hop)."""
    cp = _cp()
    key = (tag, cp.cuda.Device().id)
    hit = _cache.get(key)
    if hit is None or hit[0] is not host:
        hit = _cache[key] = (host, cp.asarray(make(host)))
    return hit[1]


def _check(q, qpos, k, v, k0, bf16):
    B, Hkv, G, nq, D = q.shape
    names = {dtype_name(x, bf16) for x in (q, k, v)}
    if len(names) != 1 or not names <= set(CTYPES):
        raise HpcattnError(f"GPU kernels take one dtype of {', '.join(CTYPES)}; got {', '.join(sorted(names))}")
    if k.shape != v.shape or k.shape[:2] != (B, Hkv) or k.shape[3] != D:
        raise HpcattnError(f"k {k.shape} / v {v.shape} do not match q {q.shape}")
    if B * Hkv * G > 65535 or nq >= 2**31 - BQ or k.shape[2] >= 2**31:
        raise HpcattnError(f"shape {q.shape} x {k.shape} exceeds the GPU kernels' grid")
    qpos = np.asarray(qpos) if qpos is not None else np.zeros(nq, dtype=np.int64)  # None: derived
    if qpos.shape != (nq,) or qpos.dtype != np.int64:
        raise HpcattnError(f"qpos must be int64 of shape ({nq},), got {qpos.dtype} {qpos.shape}")
    if not 0 <= k0 < 2**62:
        raise HpcattnError(f"key offset {k0} outside [0, 2**62)")
    return CTYPES[names.pop()], _bucket(D)


def _positions(qpos):
    """Query positions checked (once per array, on the host) and copied to the device."""
    qpos = np.asarray(qpos)
    if qpos.size and (qpos.min() < 0 or qpos.max() >= 2**62):
        raise HpcattnError(f"query positions must lie in [0, 2**62); got [{qpos.min()}, {qpos.max()}]")
    return qpos


def _sm_count(cp):
    """The current device's multiprocessors, cached (CuPy's Device.attributes reads every
    attribute of the device, tens of microseconds on each call)."""
    key = ("sms", cp.cuda.Device().id)
    if key not in _cache:
        _cache[key] = cp.cuda.Device().attributes["MultiProcessorCount"]
    return _cache[key]


def _launch(name, grid, smem, args, threads=THREADS):
    f = kernel(name)
    if smem > 48 * 1024:
        f.max_dynamic_shared_size_bytes = smem
    f(grid, (threads,), args, shared_mem=smem)


def _launch_wgmma(ctype, D, otype, nq, heads, args):
    """The persistent Hopper kernel: each block walks work items (rows x head) gridDim apart."""
    cp = _cp()
    nwg, _, minb, _ = WG_SHAPES[D]
    items = (nq + 64 * nwg - 1) // (64 * nwg) * heads
    ctas = min(items, WG_CTAS or _sm_count(cp) * minb)
    _launch(wg_name(ctype, D, otype), (ctas,), wg_smem(D), args + (np.int32(heads),), threads=128 * (nwg + 1))


def _tensor_kernel(ctype, D, scale, kernel_kind):
    """'wgmma', 'mma' or None (the CUDA-core kernel) for the implicit terms; kernel_kind as in
    `attend`. The tensor-core kernels need scale > 0 (row maxima of unscaled scores)."""
    ok = ctype != "float" and D in MMA_DIMS and scale > 0
    hopper = ok and D in WG_DIMS and wgmma_available()
    if kernel_kind == "wgmma" and not hopper:
        raise HpcattnError(f"the Hopper kernel takes float16/bfloat16, D in {WG_DIMS} and scale > 0 on a compute "
                           f"capability 9.0 device; this one is {_cp().cuda.Device().compute_capability}")
    if kernel_kind == "mma" and not ok:
        raise HpcattnError(f"the tensor-core kernel takes float16/bfloat16 with D in {MMA_DIMS} and scale > 0")
    if kernel_kind == "simt" or not ok:
        return None
    return "wgmma" if kernel_kind == "wgmma" or (kernel_kind == "auto" and hopper) else "mma"


def _launch_mma(ctype, D, otype, nq, heads, args):
    w, rm = MMA_SHAPES[D][:2]
    rows = 16 * rm * w
    _launch(mma_name(ctype, D, otype), ((nq + rows - 1) // rows, heads), mma_smem(D), args, threads=32 * w)


def attend(q, qpos, k, v, k0, mask, scale, bf16=False, kernel_kind="auto"):
    """local.attend on the GPU: (o, lse, edges) with o, lse float32 cupy arrays.
    bf16=True reads uint16 inputs as bfloat16 bit patterns. kernel_kind for the implicit
    terms: "wgmma" (Hopper's warpgroup MMA: float16/bfloat16, D in WG_DIMS), "mma" (tensor
    cores: float16/bfloat16, D in MMA_DIMS), "simt" (any dtype, D <= 256) or "auto" (the first
    of these that applies). Listed terms (random, csr) run in attend_rows and are merged in."""
    cp = _cp()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    ctype, dmax = _check(q, qpos, k, v, k0, bf16)
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
        po, pl, pe = _listed(cp, q, qpos, k, v, k0, mask, source, scale, ctype, dmax)
        o, lse = merge(o, lse, po, pl)
        edges += pe
    return o, lse, edges


SPLIT_KEYS = 4096  # the fewest keys per chunk when few query rows split the keys (flash-decoding)


def _key_chunks(cp, nq, heads, nk):
    """Chunks to split the keys into so that few query rows (decode) still fill the GPU: about
    two blocks of 64 rows x head per SM over all `heads` (batch x query heads), chunks of at
    least SPLIT_KEYS keys; 1 where the rows alone fill it (prefill)."""
    sms = _sm_count(cp)
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
    pool = _cache.setdefault(("streams", cp.cuda.Device().id), [])  # made once, reused by every call
    pool += [cp.cuda.Stream(non_blocking=True) for _ in range(min(chunks * B * Hkv, 32) - len(pool))]
    streams = pool[:min(chunks * B * Hkv, 32)]
    other = cp.zeros(1, dtype=cp.uint64)  # edges are counted per head: those of (0, 0) only
    # the positions and mask words go to the device on this stream, before `done`: every launch reuses them
    _device_copy("qpos", qpos, _positions)
    _device_copy("mask", mask, mask_words)
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
    common = (q, _device_copy("qpos", qpos, _positions), k, v, o, lse, edges, _device_copy("mask", mask, mask_words),
              np.int32(nq), np.int32(nk))
    if tensor:
        launch = _launch_wgmma if tensor == "wgmma" else _launch_mma
        launch(ctype, D, "float", nq, B * Hkv * G, common + (np.int32(G), np.int64(k0), np.float32(scale), np.int64(0)))
    else:
        smem = 4 * (BQ * dmax + BK * (dmax + 1) + BK * dmax)
        _launch(f"attend_fwd<{ctype}, {dmax}>", ((nq + BQ - 1) // BQ, B * Hkv * G), smem,
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
    cp = _cp()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    ctype, _ = _check(q, None, k, v, k0, bf16)
    if ctype == "float" or D not in MMA_DIMS or listed_terms(mask) or not scale > 0 or kernel_kind == "simt":
        raise HpcattnError(f"attend_lean takes float16/bfloat16, D in {MMA_DIMS}, implicit mask terms, scale > 0 "
                           "and a tensor-core kernel")
    launch = _launch_wgmma if _tensor_kernel(ctype, D, scale, kernel_kind) == "wgmma" else _launch_mma
    if not 0 <= q0 <= 2**62 - nq:
        raise HpcattnError(f"query offset {q0} with {nq} rows leaves [0, 2**62)")
    q = cp.ascontiguousarray(q)
    o = cp.empty(q.shape, dtype=q.dtype) if out is None else out
    if o.shape != q.shape or o.dtype != q.dtype or not o.flags.c_contiguous:
        raise HpcattnError(f"out must be a contiguous {q.dtype} array of shape {q.shape}")
    lse = cp.empty((B, Hkv, G, nq), dtype=cp.float32)
    edges = cp.zeros(1, dtype=cp.uint64)
    if nq and nk and B * Hkv * G:
        launch(ctype, D, ctype, nq, B * Hkv * G,
               (q, np.uintp(0), cp.ascontiguousarray(k), cp.ascontiguousarray(v), o, lse, edges,
                _device_copy("mask", mask, mask_words), np.int32(nq), np.int32(nk), np.int32(G),
                np.int64(k0), np.float32(scale), np.int64(q0)))
    else:
        o.fill(0)
        lse.fill(-np.inf)
    return o, lse, int(edges.get()[0])


def _random_columns(term, qpos):
    """(device int64 (nq*r) columns, r) of a random term's rows, drawn on the device exactly
    as masks.random_keys draws them (kernels/attend_rows.cu: random_columns)."""
    cp = _cp()
    if getattr(term, "n", None) is None:
        term.columns(qpos, 0, 0)  # raises the term's own "bind the number of keys" error
    r, nq = min(term.r, term.n), len(qpos)
    out = cp.empty(nq * r, dtype=cp.int64)
    if nq and r:
        kernel("random_columns")(((nq + 127) // 128,), (128,),
                                 (np.uint64(term.seed % 2**64), _device_copy("qpos", qpos, _positions),
                                  np.int32(nq), np.int64(r), np.int64(term.n), out))
    return out, r


def _host_columns(term, qpos, k0, k1):
    """A listed term's (indptr, columns) for this key block, bounds-checked on the host."""
    if not hasattr(term, "columns"):
        raise HpcattnError("this version of hpcattn.masks cannot list the union of several random/csr terms")
    indptr, cols = (np.asarray(a, dtype=np.int64) for a in term.columns(qpos, k0, k1))
    nq = len(qpos)
    if (indptr.shape != (nq + 1,) or indptr[0] != 0 or indptr[-1] != cols.size
            or (np.diff(indptr) < 0).any() or (cols.size and (cols.min() < k0 or cols.max() >= k1))):
        raise HpcattnError(f"mask term {type(term).__name__} gave malformed columns for keys [{k0}, {k1})")
    return indptr, cols


def _listed(cp, q, qpos, k, v, k0, mask, term, scale, ctype, dmax):
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    if getattr(term, "drawn", False):  # the device draws the columns (random)
        cols, width = _device_copy(("random", term), qpos, lambda p: _random_columns(term, p)[0]), \
            min(term.r, term.n or 0)
        indptr = cp.zeros(1, dtype=cp.int64)
        if width == 0:
            cols = None
    else:
        indptr, cols = (cp.asarray(a) for a in _host_columns(term, qpos, k0, k0 + nk))
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
        (cp.ascontiguousarray(q), _device_copy("qpos", qpos, _positions), cp.ascontiguousarray(k),
         cp.ascontiguousarray(v), indptr, cols, np.int64(width), o, lse, edges,
         _device_copy("mask", mask, mask_words), np.int32(nq), np.int32(nk), np.int32(D), np.int32(G),
         np.int64(k0), np.float32(scale)))
    return o, lse, int(edges.get()[0])


def backward(q, qpos, k, v, k0, mask, scale, do, lse, delta, dq=None, dk=None, dv=None, bf16=False):
    """grad.backward on the GPU: add the key block k0..k0+nk-1's share to the float32
    accumulators dq (like q), dk, dv (like k), created as zeros when not given, and return
    (dq, dk, dv, edges). lse (B,Hkv,G,nq) is the forward's full-row log-sum-exp, delta =
    rowsum(dO * O). Implicit mask terms only (random/csr backward stays on the CPU for now)."""
    cp = _cp()
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    ctype, dmax = _check(q, qpos, k, v, k0, bf16)
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
    _launch(f"attend_bwd<{ctype}, {dmax}>", ((nq + BQ - 1) // BQ, B * Hkv * G), smem,
            (cp.ascontiguousarray(q), _device_copy("qpos", qpos, _positions), cp.ascontiguousarray(k),
             cp.ascontiguousarray(v), cp.ascontiguousarray(do),
             cp.ascontiguousarray(lse, dtype=cp.float32), cp.ascontiguousarray(delta, dtype=cp.float32),
             dq, dk, dv, edges, _device_copy("mask", mask, mask_words),
             np.int32(nq), np.int32(nk), np.int32(D), np.int32(G), np.int64(k0), np.float32(scale)))
    return dq, dk, dv, int(edges.get()[0])


def merge(o_a, lse_a, o_b, lse_b):
    """merge.merge fused into one kernel for float32 cupy states of equal shapes."""
    cp = _cp()
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
