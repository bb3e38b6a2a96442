"""Float64 dense reference attention, for verification: no tiling, no spans, no MPI."""
import numpy as np

REF_ELEMS = 1 << 24  # float64 scores per reference batch


def reference(q, k, v, qpos, mask, scale, keys=None):
    """Exact attention of the given query rows over all keys, in float64.

    q: (B, nr, H, D) rows at positions qpos (nr,); k, v: (B, N, Hkv, D), the whole sequence,
    or only the key rows at positions `keys` (sorted) when every edge of the rows is among them.
    Returns o (B, nr, H, D) float64 and lse (B, H, nr) float64 (-inf and 0 for empty rows).
    """
    B, nr, H, D = q.shape
    o = np.zeros((B, nr, H, D))
    lse = np.full((B, H, nr), -np.inf)
    for b, hk, h, rows, allowed, kk, vv in _blocks(q, k, v, qpos, mask, keys):
        s = np.where(allowed, scale * (np.asarray(q[b, rows, h], dtype=np.float64) @ kk.T), -np.inf)
        m = s.max(axis=1, initial=-np.inf)
        m_ref = np.where(np.isneginf(m), 0.0, m)
        p = np.exp(s - m_ref[:, None])
        denom = p.sum(axis=1)
        o[b, rows, h] = (p @ vv) / np.where(denom > 0, denom, 1)[:, None]
        with np.errstate(divide="ignore"):
            lse[b, h, rows] = m_ref + np.log(denom)
    return o, lse


def _blocks(q, k, v, qpos, mask, keys=None):
    """Yield (b, kv head, query head, row slice, allowed, k, v in float64) over every batch,
    kv head, batch of query rows (bounded score memory) and query head of that kv head: the
    one loop nest of both references."""
    B, nr, H, _ = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    step = max(1, REF_ELEMS // max(1, N))
    keys = np.arange(N) if keys is None else np.asarray(keys, dtype=np.int64)
    for b in range(B):
        for hk in range(Hkv):
            kk = np.asarray(k[b, :, hk], dtype=np.float64)
            vv = np.asarray(v[b, :, hk], dtype=np.float64)
            for r0 in range(0, nr, step):
                rows = slice(r0, min(nr, r0 + step))
                allowed = mask.allowed(np.asarray(qpos[rows])[:, None], keys[None, :])
                for h in range(hk * G, (hk + 1) * G):
                    yield b, hk, h, rows, allowed, kk, vv


def errors(o, lse, o_ref, lse_ref):
    """(max relative error of o, of lse), and whether empty rows match exactly.

    o's error is max|o - o_ref| / max|o_ref| over all checked values; lse's is
    max |lse - lse_ref| / max(1, |lse_ref|) over finite rows. Empty rows (lse_ref = -inf)
    must have lse = -inf and o = 0; NaN anywhere counts as infinite error.
    """
    o = np.asarray(o, dtype=np.float64)
    lse = np.asarray(lse, dtype=np.float64)
    empty = np.isneginf(lse_ref)
    empty_ok = bool(np.all(np.isneginf(lse[empty])))
    if np.isnan(o).any() or np.isnan(lse).any():
        return np.inf, np.inf, empty_ok
    o_err = float(np.max(np.abs(o - o_ref), initial=0.0) / max(np.max(np.abs(o_ref), initial=0.0), 1e-30))
    fin = ~empty
    lse_err = float(np.max(np.abs(lse[fin] - lse_ref[fin]) / np.maximum(1.0, np.abs(lse_ref[fin])), initial=0.0))
    return o_err, lse_err, empty_ok


def unit_roundoff(dtype):
    """2^-(mantissa bits + 1) of a float dtype: float16 2^-11, bfloat16 2^-8."""
    import ml_dtypes  # finfo that knows bfloat16
    return 2.0 ** -(ml_dtypes.finfo(np.dtype(dtype)).nmant + 1)


def tolerance(dtype):
    """Acceptable relative error of o (stored in the input dtype) and of lse (float32).

    Half-precision inputs: 8 unit roundoffs of the dtype (float16 3.9e-3, bfloat16 3.1e-2),
    the rounding of o on output plus the kernels' half-precision P; float32: 1e-4."""
    dtype = np.dtype(dtype)
    return (8 * unit_roundoff(dtype) if dtype.itemsize == 2 else 1e-4), 1e-4


def reference_backward(q, k, v, do, qpos, mask, scale):
    """Exact gradients (dq, dk, dv) of sum(o * do) in float64, dense (DESIGN section 5).

    q, do: (B, nq, H, D) at positions qpos; k, v: (B, N, Hkv, D), the whole sequence. Only
    the given query rows contribute to dk, dv (pass all rows for the full gradient). Returns
    float64 arrays shaped like q, k, v. Rows without edges contribute nothing.
    """
    B, nr, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    dq = np.zeros((B, nr, H, D))
    dk = np.zeros((B, N, Hkv, D))
    dv = np.zeros((B, N, Hkv, D))
    for b, hk, h, rows, allowed, kk, vv in _blocks(q, k, v, qpos, mask):
        qq = np.asarray(q[b, rows, h], dtype=np.float64)
        gg = np.asarray(do[b, rows, h], dtype=np.float64)
        s = np.where(allowed, scale * (qq @ kk.T), -np.inf)
        m = s.max(axis=1, initial=-np.inf)
        p = np.exp(s - np.where(np.isneginf(m), 0.0, m)[:, None])
        denom = p.sum(axis=1)
        p /= np.where(denom > 0, denom, 1)[:, None]
        ds = p * (gg @ vv.T - (gg * (p @ vv)).sum(axis=1)[:, None])
        dv[b, :, hk] += p.T @ gg
        dq[b, rows, h] = scale * ds @ kk
        dk[b, :, hk] += scale * ds.T @ qq
    return dq, dk, dv


def grad_error(x, x_ref):
    """max |x - x_ref| / max |x_ref| (inf if x has NaN): the error measure of dq, dk, dv."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        return np.inf
    return float(np.max(np.abs(x - x_ref), initial=0.0) / max(np.max(np.abs(x_ref), initial=0.0), 1e-30))


def grad_tolerance(dtype):
    """Acceptable grad_error of dq, dk, dv stored in the input dtype (float32 accumulation):
    10 unit roundoffs for half precision (float16 4.9e-3, bfloat16 3.9e-2), else 1e-4."""
    dtype = np.dtype(dtype)
    return 10 * unit_roundoff(dtype) if dtype.itemsize == 2 else 1e-4
