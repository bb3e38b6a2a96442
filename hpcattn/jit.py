"""Optional compiled loop for the kernel's gather piece (numba, the `fast` extra).

NumPy's gathers cost about a microsecond per edge; these loops walk the edges in blocks of rows
and keys that stay in L2 (scores and exact row maxima, then exp by NumPy, then exp-weighted V
rows), four edges at a time so the inner loops over D vectorise: the same maths as
local._gather, about 5 ns per edge and pass on this machine's cores. Used for float32 inputs
when numba imports; `HPCATTN_JIT=0` turns it off. Rows without edges give o = 0, lse = -inf.
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


ROW_BLOCK = 512    # query rows per block: their q (or accumulator) rows stay in L2
KEY_BLOCK = 4096   # keys per block: their K (or V) rows, 1 MiB at D = 64, mostly stay in L2

if njit is not None:
    @njit(inline="always", fastmath=FLAGS)
    def _dot4(qr, k0, k1, k2, k3, D):
        t0 = t1 = t2 = t3 = np.float32(0.0)
        for d in range(D):
            x = qr[d]
            t0 += x * k0[d]
            t1 += x * k1[d]
            t2 += x * k2[d]
            t3 += x * k3[d]
        return t0, t1, t2, t3

    @njit(inline="always", fastmath=FLAGS)
    def _dot1(qr, kr, D):
        t = np.float32(0.0)
        for d in range(D):
            t += qr[d] * kr[d]
        return t

    @njit(inline="always", fastmath=FLAGS)
    def _axpy4(acc, p0, v0, p1, v1, p2, v2, p3, v3, D):
        for d in range(D):
            acc[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d])

    @njit(inline="always", fastmath=FLAGS)
    def _axpy1(acc, p0, v0, D):
        for d in range(D):
            acc[d] += p0 * v0[d]

    @njit(inline="always", fastmath=FLAGS)
    def _score_segment(qr, kb, cols, e, e1, c1, sg, top, scale, D):
        """Scores of one row's edges e.. with key < c1 (four at a time); returns (next e, max)."""
        while e + 3 < e1 and cols[e + 3] < c1:
            t0, t1, t2, t3 = _dot4(qr, kb[cols[e]], kb[cols[e + 1]], kb[cols[e + 2]], kb[cols[e + 3]], D)
            t0, t1, t2, t3 = t0 * scale, t1 * scale, t2 * scale, t3 * scale
            sg[e], sg[e + 1], sg[e + 2], sg[e + 3] = t0, t1, t2, t3
            top = max(top, max(max(t0, t1), max(t2, t3)))
            e += 4
        while e < e1 and cols[e] < c1:
            t = _dot1(qr, kb[cols[e]], D) * scale
            sg[e] = t
            top = max(top, t)
            e += 1
        return e, top

    @njit(inline="always", fastmath=FLAGS)
    def _weight_segment(acc, vb, cols, e, e1, c1, pg, total, D):
        """acc += p_e v_col over one row's edges e.. with key < c1; returns (next e, sum of p)."""
        while e + 3 < e1 and cols[e + 3] < c1:
            p0, p1, p2, p3 = pg[e], pg[e + 1], pg[e + 2], pg[e + 3]
            _axpy4(acc, p0, vb[cols[e]], p1, vb[cols[e + 1]], p2, vb[cols[e + 2]], p3, vb[cols[e + 3]], D)
            total += (p0 + p1) + (p2 + p3)
            e += 4
        while e < e1 and cols[e] < c1:
            _axpy1(acc, pg[e], vb[cols[e]], D)
            total += pg[e]
            e += 1
        return e, total

    @njit(nogil=True, cache=True, fastmath=FLAGS)
    def _scores(q, k, indptr, cols, scale, row_block, key_block, s, m):
        """Pass 1: s[b, g, e] = scale * q_row . k_col of every edge e, and each row's maximum m.

        q (BH, G, n, D), k (BH, nk, D), CSR over the n rows (local cols sorted in each row).
        Blocks of rows x blocks of keys, so the q and k rows in use stay in L2; four edges at
        a time (each q element loaded serves four dot products); D = 64 compiled as a constant
        (unrolled). Ends with s -= m row by row, so exp(s) (vectorised NumPy) gives the weights."""
        BH, G, n, D = q.shape
        nk = k.shape[1]
        ptr = np.empty(n, dtype=np.int64)
        for b in range(BH):
            kb = k[b]
            for g in range(G):
                sg, mg = s[b, g], m[b, g]
                ptr[:] = indptr[:n]
                mg[:] = -np.inf
                for r0 in range(0, n, row_block):
                    r1 = min(n, r0 + row_block)
                    for c1 in range(key_block, nk + key_block, key_block):
                        for r in range(r0, r1):
                            e, e1 = ptr[r], indptr[r + 1]
                            if e == e1 or cols[e] >= c1:
                                continue
                            qr = q[b, g, r]
                            if D == 64:  # a constant: the loops over D unroll
                                e, mg[r] = _score_segment(qr, kb, cols, e, e1, c1, sg, mg[r], scale, 64)
                            else:
                                e, mg[r] = _score_segment(qr, kb, cols, e, e1, c1, sg, mg[r], scale, D)
                            ptr[r] = e
                for r in range(n):
                    top = mg[r]
                    for e in range(indptr[r], indptr[r + 1]):
                        sg[e] -= top

    @njit(nogil=True, cache=True, fastmath=FLAGS)
    def _weighted(v, indptr, cols, row_block, key_block, p, o, den):
        """Pass 2: o[b, g, r] = sum of p[b, g, e] * v_col over row r's edges, den its sum of p.

        Same block order as _scores; four edges per update of the row's accumulator."""
        BH, G, n, D = o.shape
        nk = v.shape[1]
        ptr = np.empty(n, dtype=np.int64)
        for b in range(BH):
            vb = v[b]
            for g in range(G):
                pg, dg = p[b, g], den[b, g]
                ptr[:] = indptr[:n]
                o[b, g] = 0.0
                dg[:] = 0.0
                for r0 in range(0, n, row_block):
                    r1 = min(n, r0 + row_block)
                    for c1 in range(key_block, nk + key_block, key_block):
                        for r in range(r0, r1):
                            e, e1 = ptr[r], indptr[r + 1]
                            if e == e1 or cols[e] >= c1:
                                continue
                            if D == 64:
                                e, dg[r] = _weight_segment(o[b, g, r], vb, cols, e, e1, c1, pg, dg[r], 64)
                            else:
                                e, dg[r] = _weight_segment(o[b, g, r], vb, cols, e, e1, c1, pg, dg[r], D)
                            ptr[r] = e


def gather_rows(q, k, v, indptr, cols, scale):
    """(o, lse) of the rows of q (B, Hkv, G, n, D) over their CSR edges (local key indices).

    Two compiled passes over the edges in key-block order (scores and row maxima; weighted V
    rows), with NumPy's vectorised exp between them: exact row maxima, so no rescaling."""
    B, Hkv, G, n, D = q.shape
    BH, nnz = B * Hkv, len(cols)
    c = np.ascontiguousarray
    # unsigned 32-bit key indices where they fit: no negative-index handling per edge, half the bytes
    indptr = indptr.astype(np.int64, copy=False)
    cols = cols.astype(np.uint32 if k.shape[2] < 2**32 else np.int64, copy=False)
    s = np.empty((BH, G, nnz), dtype=np.float32)
    m = np.empty((BH, G, n), dtype=np.float32)
    _scores(c(q).reshape(BH, G, n, D), c(k).reshape(BH, -1, D), indptr, cols, np.float32(scale),
            ROW_BLOCK, KEY_BLOCK, s, m)
    np.exp(s, out=s)
    o = np.empty((BH, G, n, D), dtype=np.float32)
    den = np.empty((BH, G, n), dtype=np.float32)
    _weighted(c(v).reshape(BH, -1, D), indptr, cols, ROW_BLOCK, KEY_BLOCK, s, o, den)
    has = den > 0
    o /= np.where(has, den, 1)[..., None]
    with np.errstate(divide="ignore"):
        lse = np.where(has, m + np.log(np.where(has, den, 1)), -np.inf).astype(np.float32)
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
