"""The one loader over kernels/*.cu: where the sources are, which name expressions each is
compiled with, how (NVRTC through `cupy.RawModule`, NVCC where NVRTC fails, NVRTC straight to an
sm_90a cubin for the Hopper kernels, cached on disk), and the launch helpers.

Every source is compiled with `name_expressions` per dtype and head-dim bucket on first use and
cached per device; `kernel(name)` is the one lookup helper, `build(source, names)` compiles a
source with other name expressions (jobs/ sweeping shapes). The sources #include their headers
(kernels/*.cuh) from KERNEL_DIR, which OPTIONS puts on the include path.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .shapes import (BWD_DIMS, BWD_FUSED_SHAPES, BWD_WG_DIMS, CTYPES, DENSE_SHAPES, DMAXES, MMA_DIMS, THREADS, WG_DIMS,
                     WG_KT2_SHAPES, WG_SCHEDS, bwd_fused_name, bwd_names, bwd_wg_name, bwd_wg_q_name, dense_name, mma_name,
                     wg_name)


def kernel_dir():
    """The folder of the CUDA sources: hpcattn/kernels in an installed package (setup.py ships
    the repository's kernels/ there), else kernels/ at the top of the source tree that holds
    this package (editable installs and PYTHONPATH runs)."""
    package = Path(__file__).resolve().parents[1]
    candidates = (package / "kernels", package.parent / "kernels")
    return next((d for d in candidates if any(d.glob("*.cu"))), candidates[0])


KERNEL_DIR = kernel_dir()
SOURCES = {
    "attend.cu": tuple(f"attend_{d}<{t}, {m}>" for d in ("fwd", "bwd") for t in CTYPES.values()
                       for m in DMAXES),
    "attend_mma.cu": tuple(mma_name(t, d, o) for t in ("__half", "__nv_bfloat16")
                           for d in MMA_DIMS for o in ("float", t)),
    "attend_bwd_mma.cu": ("rows_unsorted",) + tuple(n for t in ("__half", "__nv_bfloat16") for d in BWD_DIMS
                                                     for n in (f"row_delta<{t}, {d}>", f"store_rows<{t}, {d}>")
                                                     + bwd_names(t, d, "float") + bwd_names(t, d, t)),
    "attend_wgmma.cu": tuple(wg_name(t, d, o) for t in ("__half", "__nv_bfloat16") for d in WG_DIMS
                             for o in ("float", t)),
    "attend_fwd_dense.cu": tuple(dense_name(t, d, o) for t in ("__half", "__nv_bfloat16") for d in DENSE_SHAPES
                                 for o in ("float", t)),
    "attend_bwd_wgmma.cu": tuple(n for t in ("__half", "__nv_bfloat16") for d in BWD_WG_DIMS
                                 for o in ("float", t) for n in (bwd_wg_name(t, d, o), bwd_wg_q_name(t, d, o))),
    "attend_bwd_fused.cu": tuple(bwd_fused_name(t, d, o, True) for t in ("__half", "__nv_bfloat16")
                                 for d in BWD_FUSED_SHAPES for o in ("float", t)),
    "attend_rows.cu": ("random_columns",) + tuple(f"attend_rows<{t}, {m}>" for t in CTYPES.values()
                                                  for m in DMAXES),
    "merge.cu": ("merge_states",),
}
# forms compiled one at a time, each in a module of its own, when first asked for: the forward's
# other schedules (jobs/ only) and the one-pass backward's dq-tile forms (`auto` takes the
# fixed-point one on causal and full masks), so that a first call compiles only the kernel it runs;
# and the one-pass backward's atomic form, which no kernel_kind takes (jobs/ build their own)
ON_DEMAND = {
    "attend_wgmma.cu": tuple(n for t in ("__half", "__nv_bfloat16") for d in WG_DIMS for o in ("float", t)
                             for n in [wg_name(t, d, o, sched=s) for s in WG_SCHEDS]
                             + [wg_name(t, d, o, win=True), wg_name(t, d, o, WG_KT2_SHAPES[d], kt=2, win=True)]),
    "attend_bwd_fused.cu": tuple(bwd_fused_name(t, d, o, ordered, bulk=bulk) for t in ("__half", "__nv_bfloat16")
                                 for d in BWD_FUSED_SHAPES for o in ("float", t)
                                 for ordered, bulk in ((False, True), (True, True), (False, False))),
    "attend_bwd_mma.cu": tuple(f"tile_rows_out<{o}, {d}>" for o in ("float", "__half", "__nv_bfloat16")
                               for d in BWD_FUSED_SHAPES)  # the BULK forms' dq tiles as rows
    + tuple(f"{n}<{t}, {d}>" for n in ("key_maxima", "row_scales") for t in ("__half", "__nv_bfloat16")
            for d in BWD_FUSED_SHAPES),  # and the fixed-point form's scales
}
SM90A = ("attend_wgmma.cu", "attend_fwd_dense.cu", "attend_bwd_wgmma.cu", "attend_bwd_fused.cu")  # sources built for sm_90a only
OPTIONS = ("-std=c++17", f"-I{KERNEL_DIR}")
_modules = {}
_cache = {}
COMPILED_BY = {}  # source -> which compiler built it (for logs)


def cupy():
    """The cupy module, imported on first use (hpcattn imports without it)."""
    import cupy
    return cupy


def toolkit_include(roots=None):
    """The include folder of the first CUDA install among `roots` (default: CUDA_PATH, CUDA_HOME,
    /usr/local/cuda) that has the headers kernels/*.cu need (cuda_fp16.h, mma.h, crt/mma.h), or None."""
    roots = roots or (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda")
    for root in filter(None, roots):
        inc = os.path.join(root, "include")
        if all(os.path.isfile(os.path.join(inc, h)) for h in ("cuda_fp16.h", "mma.h", "crt/mma.h")):
            return inc
    return None


def cuda_include():
    """-I for the CUDA headers that NVRTC does not find on its own: a full toolkit's
    (toolkit_include), else CuPy's own guess, which may be a pip `nvidia/cu13` folder whose mma.h
    lacks crt/mma.h (seen on the lent H100 image)."""
    inc = toolkit_include() or toolkit_include((cupy().cuda.get_cuda_path(),))
    return (f"-I{inc}",) if inc else ()


def options(kernel_dir=KERNEL_DIR):
    """Every compiler option: OPTIONS (the kernels' own headers, from kernel_dir) and the CUDA headers."""
    return tuple(o.replace(str(KERNEL_DIR), str(kernel_dir)) for o in OPTIONS) + cuda_include()


def _stamped(path, kernel_dir=KERNEL_DIR):
    """The source text with a first line naming the digest of the headers it may include:
    CuPy's compile cache is keyed by the text alone, so an edited header must change it."""
    headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(Path(kernel_dir).glob("*.cuh")))).hexdigest()
    return f"// kernels/*.cuh {headers[:16]}\n" + path.read_text()


def build(source, names=None, kernel_dir=KERNEL_DIR):
    """kernels/`source` compiled on the current device with the name expressions `names`
    (default: SOURCES[source]): a module whose get_function(name) gives a kernel. NVRTC, else
    NVCC; SM90A sources as an sm_90a cubin (Sm90aModule). COMPILED_BY records which.
    kernel_dir: another tree's kernels/ (a job comparing commits), source and headers from there."""
    cp = cupy()
    kernel_dir = Path(kernel_dir)
    code, names = _stamped(kernel_dir / source, kernel_dir), list(SOURCES[source] if names is None else names)
    opts = options(kernel_dir)
    if source in SM90A:
        mod = Sm90aModule(code, names, opts)
        COMPILED_BY[source] = "nvrtc (sm_90a)"
        return mod
    try:
        mod = cp.RawModule(code=code, options=opts, name_expressions=names)
        mod.compile()
        COMPILED_BY[source] = "nvrtc"
    except cp.cuda.compiler.CompileException as e:  # e.g. NVRTC without the CUDA headers
        COMPILED_BY[source] = f"nvcc (NVRTC failed: {str(e).splitlines()[0][:200]})"
        mod = cp.RawModule(code=code, options=opts, name_expressions=names, backend="nvcc")
        mod.compile()
    return mod


def kernel(name):
    """The compiled kernel for a name expression of SOURCES (or ON_DEMAND), on the current device."""
    cp = cupy()
    src = next((f for f, names in SOURCES.items() if name in names), None)
    extra = src is None and next((f for f, names in ON_DEMAND.items() if name in names), None)
    if src is None and not extra:
        raise KeyError(f"no kernel {name!r} in {KERNEL_DIR}")
    key = (cp.cuda.Device().id, src) if src else (cp.cuda.Device().id, extra, name)
    if key not in _modules:  # an ON_DEMAND form alone: 24 forward forms in one program take minutes
        _modules[key] = build(src) if src else build(extra, (name,))
    return _modules[key].get_function(name)


def every_name(source):
    """SOURCES' and ON_DEMAND's name expressions of one source."""
    return SOURCES[source] + ON_DEMAND.get(source, ())


def kernel_with_smem(name, smem):
    """kernel(name), allowed `smem` bytes of dynamic shared memory."""
    f = kernel(name)
    if smem > 48 * 1024:
        f.max_dynamic_shared_size_bytes = smem
    return f


def launch(name, grid, smem, args, threads=THREADS):
    """kernel(name) on `grid` blocks of `threads`, with `smem` bytes of dynamic shared memory."""
    kernel_with_smem(name, smem)(grid, (threads,), args, shared_mem=smem)


class Sm90aModule:
    """Kernels that need Hopper's arch-specific instructions (wgmma: sm_90a), compiled by NVRTC
    straight to a cubin (cupy.RawModule always adds its own plain -arch option); the part of
    RawModule's interface that `kernel` and `launch` use. The cubin is cached on disk beside
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
        cp = cupy()
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


def wgmma_available():
    """Whether this device runs the Hopper kernel (compute capability 9.0) and NVRTC builds it;
    a build failure is remembered in COMPILED_BY and the tensor-core kernel serves instead."""
    cp = cupy()
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


def sm_count():
    """The current device's multiprocessors, cached (CuPy's Device.attributes reads every
    attribute of the device, tens of microseconds on each call)."""
    cp = cupy()
    key = ("sms", cp.cuda.Device().id)
    if key not in _cache:
        _cache[key] = cp.cuda.Device().attributes["MultiProcessorCount"]
    return _cache[key]
