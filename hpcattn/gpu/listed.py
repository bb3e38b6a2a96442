"""Listed mask terms (random, csr) on the GPU: their columns (random drawn on the device, csr
listed and bounds-checked on the host) and kernels/attend_rows.cu over them."""
import numpy as np

from ..errors import HpcattnError
from .encode import device_copy, device_mask, device_positions
from .loader import cupy, kernel
from .shapes import ROW_WARPS


def random_columns(term, qpos):
    """(device int64 (nq*r) columns, r) of a random term's rows, drawn on the device exactly
    as masks.random_keys draws them (kernels/attend_rows.cu: random_columns)."""
    cp = cupy()
    if getattr(term, "n", None) is None:
        term.columns(qpos, 0, 0)  # raises the term's own "bind the number of keys" error
    r, nq = min(term.r, term.n), len(qpos)
    out = cp.empty(nq * r, dtype=cp.int64)
    if nq and r:
        kernel("random_columns")(((nq + 127) // 128,), (128,),
                                 (np.uint64(term.seed % 2**64), device_positions(qpos),
                                  np.int32(nq), np.int64(r), np.int64(term.n), out))
    return out, r


def host_columns(term, qpos, k0, k1):
    """A listed term's (indptr, columns) for this key block, bounds-checked on the host."""
    if not hasattr(term, "columns"):
        raise HpcattnError("this version of hpcattn.masks cannot list the union of several random/csr terms")
    indptr, cols = (np.asarray(a, dtype=np.int64) for a in term.columns(qpos, k0, k1))
    nq = len(qpos)
    if (indptr.shape != (nq + 1,) or indptr[0] != 0 or indptr[-1] != cols.size
            or (np.diff(indptr) < 0).any() or (cols.size and (cols.min() < k0 or cols.max() >= k1))):
        raise HpcattnError(f"mask term {type(term).__name__} gave malformed columns for keys [{k0}, {k1})")
    return indptr, cols


def attend_listed(cp, q, qpos, k, v, k0, mask, term, scale, ctype, dmax):
    """(o, lse, edges) of a listed term's edges (random drawn on the device, csr listed on the
    host) by attend_rows, the mask's implicit terms and causal flag applied on top."""
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    if getattr(term, "drawn", False):  # the device draws the columns (random)
        cols, width = device_copy(("random", term), qpos, lambda p: random_columns(term, p)[0]), \
            min(term.r, term.n or 0)
        indptr = cp.zeros(1, dtype=cp.int64)
        if width == 0:
            cols = None
    else:
        indptr, cols = (cp.asarray(a) for a in host_columns(term, qpos, k0, k0 + nk))
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
        (cp.ascontiguousarray(q), device_positions(qpos), cp.ascontiguousarray(k),
         cp.ascontiguousarray(v), indptr, cols, np.int64(width), o, lse, edges,
         device_mask(mask), np.int32(nq), np.int32(nk), np.int32(D), np.int32(G),
         np.int64(k0), np.float32(scale)))
    return o, lse, int(edges.get()[0])
