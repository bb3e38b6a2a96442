"""Optional compiled loop (numba, the `fast` extra): float16 -> float32 widening.

The gather piece's compiled kernel is C (kernels/gather.c, hpcattn/cpu/cgather.py), not numba:
it replaced numba's two passes here, being faster at every D measured (docs/benchmarks-log.md,
"A hand-written C gather"). `HPCATTN_JIT=0` turns this widening off (NumPy's cast instead).
"""
import os

import numpy as np

try:
    from numba import njit
except ImportError:  # widen falls back to NumPy's cast
    njit = None

# float16 -> float32 widening for the kernel's dense decode path (local._dense). NumPy's cast
# costs 1.4-2 ns per element (scalar code); a lookup in a 65,536-entry table built by that same
# cast (256 KiB, stays in L2) costs about 0.25 ns and is exact for every value, NaN payloads too.
_HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

if njit is not None:
    @njit(nogil=True, cache=True)
    def _widen(src, table, out):
        """out[...] = table[src] over 4-d arrays of the same shape (src uint16, any strides)."""
        A, B, C, D = src.shape
        for a in range(A):
            for b in range(B):
                for c in range(C):
                    for d in range(D):
                        out[a, b, c, d] = table[src[a, b, c, d]]


def widen(src, out):
    """out[...] = src, float16 (B, H, n, D) -> float32 `out` of the same shape; returns out.
    The compiled table lookup when numba imports (and HPCATTN_JIT is not 0), NumPy's cast else."""
    if njit is not None and src.dtype == np.float16 and os.environ.get("HPCATTN_JIT", "1") != "0":
        _widen(src.view(np.uint16), _HALF, out)
    else:
        np.copyto(out, src)
    return out
