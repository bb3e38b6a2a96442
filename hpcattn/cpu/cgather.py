"""The compiled gather and band kernels (kernels/gather.c), loaded with ctypes.

setup.py builds the C file into the package as hpcattn/cpu/_gather*.so (a plain shared library
shaped like an extension module, so every install builds it; it is never imported as a
module). ctypes releases the GIL during the call, so local.attend's row-chunk threads run it on
every core. Runs from a source tree where it was not built fall back to NumPy's gathers.

`HPCATTN_GATHER` picks the variant: unset or `auto` the best this CPU runs (AVX-512 for D a
multiple of 16 up to 256, else AVX2 + FMA: 8-lane loops for D a multiple of 8 up to 256,
portable loops compiled for AVX2 for other D; else the portable loops for baseline x86-64 or
any other CPU), `avx512`, `avx2` or `generic` to force one (lowered to what the CPU runs; tests
use it to check every variant), `numpy` to turn the compiled kernel off.
"""
import ctypes
import importlib.machinery
import os
import warnings

import numpy as np

from ..arrays import as_float32
from ..errors import HpcattnError

ABI = 5  # hpcattn_gather_abi() of the kernels/gather.c this module calls
VARIANTS = {"generic": 1, "avx2": 2, "avx512": 3}
NAMES = {v: k for k, v in VARIANTS.items()}


_SKIPPED = []  # why a library found beside this file was not used


def _load(path=None):
    """The library at path, else the one beside this file (hpcattn/cpu/_gather + an
    extension suffix); None if unbuilt."""
    if path is None:
        here = os.path.dirname(os.path.abspath(__file__))
        paths = [os.path.join(here, "_gather" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]
        path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        if lib.hpcattn_gather_abi() != ABI:
            raise OSError(f"built from another kernels/gather.c (ABI {lib.hpcattn_gather_abi()})")
    except (OSError, AttributeError) as e:
        _SKIPPED.append(f"{os.path.basename(path)} ignored: {e}; reinstall to rebuild it")
        warnings.warn(f"hpcattn: {_SKIPPED[0]} (NumPy gathers meanwhile)", RuntimeWarning, stacklevel=2)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.hpcattn_gather.argtypes = [ptr] * 5 + [i64] * 5 + [ctypes.c_float, ctypes.c_int, ptr, ptr]
    lib.hpcattn_gather.restype = ctypes.c_int
    lib.hpcattn_band.argtypes = [ptr] * 5 + [i64] * 5 + [ctypes.c_float, ctypes.c_int, ptr, ptr]
    lib.hpcattn_band.restype = ctypes.c_int
    lib.hpcattn_gather_best.restype = ctypes.c_int
    lib.hpcattn_variant_for.argtypes = [ctypes.c_int, i64]
    lib.hpcattn_variant_for.restype = ctypes.c_int
    lib.hpcattn_band_blocked.argtypes = [ctypes.c_int, i64]
    lib.hpcattn_band_blocked.restype = ctypes.c_int
    return lib


LIB = _load()


def _choice():
    choice = os.environ.get("HPCATTN_GATHER", "auto").strip().lower() or "auto"
    if choice not in ("auto", "numpy", *VARIANTS):
        raise HpcattnError(f"HPCATTN_GATHER={choice!r}: expected auto, numpy, "
                           + ", ".join(VARIANTS))
    return choice


def available(dtype):
    """Whether the compiled kernel takes inputs of this dtype here (float32, library built,
    not turned off by HPCATTN_GATHER=numpy)."""
    return LIB is not None and dtype == np.float32 and _choice() != "numpy"


HALF_OR_SINGLE = ("float32", "float16", "bfloat16")


def band_available(dtype, D):
    """Whether local._band takes the compiled band kernel: float32, float16 or bfloat16 inputs (half
    widened a row chunk at a time) and, unless HPCATTN_GATHER forces a variant (tests), only
    where its blocked loops run (AVX-512 or AVX2, D a multiple of 8 up to 256): the portable
    loops are slower than the BLAS tiles."""
    if LIB is None or np.dtype(dtype).name not in HALF_OR_SINGLE or _choice() == "numpy":
        return False
    return _choice() != "auto" or band_blocked(D)


def band_blocked(D):
    """Whether this CPU runs the band kernel's blocked loops at head dim D (the library's rule)."""
    return bool(LIB.hpcattn_band_blocked(0, D))


def best():
    """Name of the best variant this CPU runs ('avx512', 'avx2', 'generic'), None if unbuilt."""
    return NAMES[LIB.hpcattn_gather_best()] if LIB is not None else None


def describe(D=64):
    """One line for `hpcattn info` and `bench`: the CPU kernels a float32 run at head dim D
    takes (the compiled variant, and whether the window band is compiled or BLAS tiles)."""
    if LIB is None:
        return f"NumPy gathers, BLAS band ({_SKIPPED[0] if _SKIPPED else 'hpcattn/cpu/_gather not built'})"
    choice = _choice()
    if choice == "numpy":
        return "NumPy gathers, BLAS band (HPCATTN_GATHER=numpy)"
    used = NAMES[LIB.hpcattn_variant_for(VARIANTS.get(choice, 0), D)]
    band = "compiled band" if band_available(np.dtype(np.float32), D) else "BLAS band"
    forced = "" if choice == "auto" else f", HPCATTN_GATHER={choice}"
    return f"compiled {used}, {band} at D = {D}{forced}"


def gather_rows(q, k, v, indptr, cols, scale):
    """(o, lse) of the rows of q (B, Hkv, G, n, D) over their CSR edges (local key indices).

    k, v (B, Hkv, nk, D) float32; indptr (n + 1,), cols (nnz,) in [0, nk): local._gather's
    columns, already validated (masks.check_csr, Mask.columns); nothing is checked again here.
    o (B, Hkv, G, n, D) float32, lse (B, Hkv, G, n) float32 (-inf and o = 0 for rows without
    edges). The variant comes from HPCATTN_GATHER (module docstring)."""
    return run(q, k, v, indptr, cols, scale)[:2]


def run(q, k, v, indptr, cols, scale):
    """gather_rows, plus the name of the variant that ran."""
    B, Hkv, G, n, D = q.shape
    nk = k.shape[2]
    c = np.ascontiguousarray
    q, k, v = as_float32(q), as_float32(k), as_float32(v)
    indptr = c(indptr, dtype=np.int64)
    cols = c(cols, dtype=np.int64)
    return _call(LIB.hpcattn_gather, "gather", q.shape, q, k, v, indptr, cols, B * Hkv, G, n, nk, D,
                 float(scale))


def _call(fn, what, shape, *args):
    """(o, lse, variant) from one of the library's kernels: arrays go by address, then the
    variant asked for (HPCATTN_GATHER) and the fresh float32 o (shape) and lse (shape[:-1])."""
    o = np.empty(shape, dtype=np.float32)
    lse = np.empty(shape[:-1], dtype=np.float32)
    used = fn(*(a.ctypes.data if isinstance(a, np.ndarray) else a for a in args),
              VARIANTS.get(_choice(), 0), o.ctypes.data, lse.ctypes.data)
    if used < 0:
        raise MemoryError(f"the compiled {what} could not allocate its scratch memory")
    return o, lse, NAMES[used]


def band_rows(q, k, v, lo, hi, scale):
    """(o, lse, variant) of the rows of q (B, Hkv, G, n, D) over the contiguous keys
    [lo[r], hi[r]) of k, v (B, Hkv, nk, D) float32 (local indices, 0 <= lo, hi <= nk; hi <= lo:
    no key, o = 0 and lse = -inf). Each row block reads only its keys in place: k and v are
    not copied when their rows are contiguous and their (B, Hkv) slabs evenly spaced."""
    B, Hkv, G, n, D = q.shape
    c = np.ascontiguousarray
    q = as_float32(q)
    ok = (k.dtype == np.float32 and v.dtype == np.float32 and k.strides == v.strides
          and k.strides[3] == 4 and k.strides[2] == 4 * D
          and (B == 1 or Hkv == 1 or k.strides[0] == Hkv * k.strides[1]))
    if not ok:
        k, v = as_float32(k), as_float32(v)
    ldk = k.strides[1] // 4 if Hkv > 1 else k.strides[0] // 4 if B > 1 else 0
    lo, hi = c(lo, dtype=np.int64), c(hi, dtype=np.int64)
    return _call(LIB.hpcattn_band, "band kernel", q.shape, q, k, v, lo, hi, B * Hkv, G, n, D, ldk,
                 float(scale))
