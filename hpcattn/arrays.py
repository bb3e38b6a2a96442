"""Array helpers: the array module (numpy or cupy) of an array, decided from the array
itself, cache-line aligned host buffers, and the host allocator's reuse of freed memory."""
import ctypes
import sys

import numpy as np


def is_device(x):
    """True for a CuPy (device) array; never imports cupy."""
    return type(x).__module__.startswith("cupy")


def array_module(x):
    """numpy for host arrays, cupy for device arrays (without importing cupy otherwise)."""
    if is_device(x):
        import cupy
        return cupy
    return np


def to_host(x):
    """A NumPy array of x (device arrays are copied back; host arrays pass through)."""
    return x.get() if is_device(x) else x


ALIGN = 64  # bytes: one cache line


def aligned_empty(xp, shape, dtype):
    """An uninitialised array of xp whose data starts on a cache-line (64-byte) boundary.

    NumPy's large allocations start 16 bytes past a page, so every 256-byte K or V row then
    spans five cache lines instead of four; the gather kernel's random row reads measured 20%
    slower on such arrays (docs/benchmarks-log.md, "Aligned rows, a prefetch cursor"). CuPy's are aligned already."""
    if xp is not np:
        return xp.empty(shape, dtype=dtype)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    off = -raw.ctypes.data % ALIGN
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def aligned_copy(x):
    """x itself if it is C-contiguous and cache-line aligned, else such a copy of it."""
    xp = array_module(x)
    if x.flags.c_contiguous and (xp is not np or x.ctypes.data % ALIGN == 0):
        return x
    out = aligned_empty(xp, x.shape, x.dtype)
    out[...] = x
    return out


def as_float32(x):
    """x as a C-contiguous float32 NumPy array. A strided float16/bfloat16 view (the caller's
    (B, N, H, D) rows seen head-major) is first made contiguous in its own dtype: NumPy's
    widening cast runs several times slower on strided input (on 2 cores, 33M float16 values:
    0.51 s strided, 0.18 s as two passes)."""
    if x.dtype != np.float32 and not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)



def keep_freed_memory():
    """Ask glibc's malloc to keep freed blocks of up to 32 MiB for reuse (a process-wide
    setting, made by `hpcattn run` for its own process): the kernels' per-chunk temporaries
    are then not mapped and page-faulted in afresh for every chunk, which cost 30-50% of a
    window:16 chunk's kernel time on 2 cores. Returns whether the setting took (False where
    the C library is not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30))
