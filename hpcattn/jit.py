"""Optional compiled loop for the kernel's gather piece (numba, the `fast` extra).

NumPy's gathers cost about a microsecond per edge; this loop walks each row's edges once with
an online softmax (rescaling the accumulator when a larger score arrives), reading each K and V
row once: the same maths as local._gather, about 50x faster. Used for float32 inputs when numba
imports; `HPCATTN_JIT=0` turns it off. Rows without edges give o = 0, lse = -inf.
"""
import os

import numpy as np

try:
    from numba import njit
except ImportError:  # the kernel falls back to its NumPy gather
    njit = None

FLAGS = {"reassoc", "contract", "arcp"}  # vectorise the dot products; keep inf semantics


def available(dtype):
    return njit is not None and dtype == np.float32 and os.environ.get("HPCATTN_JIT", "1") != "0"


KEY_BLOCK = 1024  # keys per pass: K and V rows of one block (2 x 256 KiB at D = 64) stay in L2

if njit is not None:
    @njit(nogil=True, cache=True, fastmath=FLAGS)
    def _rows(q, k, v, indptr, cols, scale, key_block, o, lse):
        """q (BH, G, n, D), k/v (BH, nk, D), all C-contiguous; CSR (indptr over the n rows,
        local cols sorted in each row). Keys are visited one cache-sized block at a time; in
        each block every row takes its edges there (scores, then exp-weighted V rows) and
        rescales its running (max, sum, accumulator) once: the online softmax per segment."""
        BH, G, n, D = q.shape
        nk = k.shape[1]
        width = 1
        for r in range(n):
            width = max(width, indptr[r + 1] - indptr[r])
        s = np.empty(width, dtype=np.float32)
        ptr = np.empty(n, dtype=np.int64)
        m = np.empty(n, dtype=np.float32)
        den = np.empty(n, dtype=np.float32)
        for b in range(BH):
            for g in range(G):
                acc = o[b, g]
                acc[:] = 0.0
                m[:] = -np.inf
                den[:] = 0.0
                ptr[:] = indptr[:n]
                for c1 in range(key_block, nk + key_block, key_block):
                    for r in range(n):
                        e0, e1 = ptr[r], indptr[r + 1]
                        if e0 == e1 or cols[e0] >= c1:
                            continue
                        qr = q[b, g, r]
                        top = m[r]
                        e = e0
                        while e < e1 and cols[e] < c1:
                            kr = k[b, cols[e]]
                            t = np.float32(0.0)
                            for d in range(D):
                                t += qr[d] * kr[d]
                            t *= scale
                            s[e - e0] = t
                            top = max(top, t)
                            e += 1
                        ptr[r] = e
                        ar = acc[r]
                        if top > m[r]:
                            f = np.exp(m[r] - top)
                            den[r] *= f
                            for d in range(D):
                                ar[d] *= f
                            m[r] = top
                        total = den[r]
                        for x in range(e0, e):
                            p = np.exp(s[x - e0] - top)
                            total += p
                            vr = v[b, cols[x]]
                            for d in range(D):
                                ar[d] += p * vr[d]
                        den[r] = total
                for r in range(n):
                    if den[r] > 0:
                        for d in range(D):
                            acc[r, d] /= den[r]
                        lse[b, g, r] = m[r] + np.log(den[r])
                    else:
                        lse[b, g, r] = -np.inf


def gather_rows(q, k, v, indptr, cols, scale):
    """(o, lse) of the rows of q (B, Hkv, G, n, D) over their CSR edges (local key indices)."""
    B, Hkv, G, n, D = q.shape
    o = np.empty((B * Hkv, G, n, D), dtype=np.float32)
    lse = np.empty((B * Hkv, G, n), dtype=np.float32)
    c = np.ascontiguousarray
    _rows(c(q).reshape(B * Hkv, G, n, D), c(k).reshape(B * Hkv, -1, D), c(v).reshape(B * Hkv, -1, D),
          indptr.astype(np.int64), cols.astype(np.int64), np.float32(scale), KEY_BLOCK, o, lse)
    return o.reshape(B, Hkv, G, n, D), lse.reshape(B, Hkv, G, n)


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
