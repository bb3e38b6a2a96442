"""The local kernel: attention of a rank's query rows over one contiguous block of keys.

Knows nothing of MPI. Layout (head-major, grouped-query):
  q (B, Hkv, G, nq, D), k and v (B, Hkv, nk, D); query head h = hkv * G + g.

Work is proportional to the mask's edges and nothing is stored for implicit masks. The edge
set is cut into three disjoint pieces, one code path per idea (not per mask):
- band: the union of `window` terms (|i - j| <= W, with causal j <= i). On an AVX-512 or
  AVX2 CPU the compiled band kernel (kernels/gather.c: blocks of 16 rows, register-tiled
  FMAs, no BLAS); otherwise query tiles of T rows over spans of T + 2W keys, all interior tiles
  of a group in one batched BLAS call on strided views of K/V, masked by one additive bias
  shared by every tile (the band is shift-invariant).
- tiles: `full`, `block`, `global` minus the band: query tiles over the mask's key spans,
  tiles grown until their score block is large (a global-column strip is one BLAS call),
  masked elementwise only where a block is not entirely inside the mask. A tile of few rows
  (decode) over keys that every row reaches streams them through `_dense` instead.
- gather: `dilated`, `random`, `csr` minus the two pieces above: the rows' explicit columns
  (Mask.columns), then the compiled kernel (cpu/cgather.py, kernels/gather.c) for float32,
  else K/V rows gathered by NumPy with a segment-wise softmax by ufunc.reduceat.
The pieces' partials of a row are combined with the shared merge. Rows are processed in
chunks, so float16 inputs are converted to float32 a chunk at a time (never a whole shard)
and temporaries stay O(chunk + its edges). The chunks (and a decode's key blocks) follow from
the shape alone and every BLAS call runs on one thread, so the bits do not depend on the
thread count.
"""
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import as_strided
from threadpoolctl import ThreadpoolController

from . import cgather, jit
from ..arrays import aligned_copy, array_module, as_float32
from ..masks import Full, Mask, Window
from ..merge import empty_state, merge

Q_TILE = 256            # query rows per tile of the tiles piece (before growing)
SCORE_ELEMS = 1 << 21   # float32 scores held at once per block or tile group: 8 MiB
BAND_ELEMS = 1 << 18    # float32 scores per group of band tiles (1 MiB: stays in L2)
BAND_TILE = 128         # most query rows per band tile
ROW_ELEMS = 1 << 19     # output elements (rows x heads x D) per row chunk: 2 MiB
EDGE_ELEMS = 1 << 21    # gathered elements (edges x heads x D) per gather chunk
MIN_ROWS = 512          # fewest query rows per chunk handed to a worker thread
ROW_CHUNKS = 16         # row chunks a call is cut into when ROW_ELEMS allows more rows
KEY_BLOCK = 1 << 15     # keys per work item when a call's rows make one chunk (decode)
DECODE_ROWS = 64        # query rows per tile at most for the dense decode path (_dense)
DECODE_ELEMS = 1 << 18  # float32 scores per key chunk of that path: 1 MiB, kept in L2
LAG = float(1 << 24)    # largest chunk row sum that path accepts over its lagging reference


def threads():
    """Worker threads of the kernel: HPCATTN_THREADS, else the cores this process may use."""
    env = os.environ.get("HPCATTN_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))


def attend(q, qpos, k, v, k0, mask, scale, out=None):
    """(o, lse, edges) of every query row of q over the keys k0 .. k0+nk-1 that the mask allows.

    o: (B, Hkv, G, nq, D) float32 normalised (or written into `out`, any float dtype, which is
    returned: lets float16 runs keep float16 outputs; `out` may be q itself, since each row
    chunk of q is read before its rows of o are written); lse: (B, Hkv, G, nq) float32, -inf where
    a row has no edge in this block. `edges` counts the (query, key) pairs visited (per head).
    The mask must be bound (Mask.bind) when it has random or csr terms.
    """
    xp = array_module(q)
    if xp is not np:  # device arrays: the CUDA kernels in kernels/ (gpu/forward.py)
        from ..gpu import forward
        if out is not None:  # qpos None: row r at position r; edges a device count
            return forward.attend_out(q, qpos, k, v, k0, mask, scale, out)
        return forward.attend(q, qpos, k, v, k0, mask, scale)
    B, Hkv, G, nq, D = q.shape
    nk = k.shape[2]
    o = xp.zeros((B, Hkv, G, nq, D), dtype=xp.float32) if out is None else out
    lse = xp.full((B, Hkv, G, nq), -xp.inf, dtype=xp.float32)
    edges = 0
    if nq == 0 or nk == 0:
        o[...] = 0
        return o, lse, edges
    plan = _plan(mask)
    if plan.gather is not None and cgather.available(q.dtype):
        # the compiled gather reads random K/V rows: on cache-line boundaries each row is the
        # fewest lines (20% faster measured); a misaligned block is copied once per call here
        k, v = aligned_copy(k), aligned_copy(v)
    qpos = np.asarray(qpos, dtype=np.int64)
    # The work is cut by the shape alone, never by the thread count, so any number of threads
    # gives the same bits: row chunks, or, when the rows make one chunk (decode), KEY_BLOCK key
    # blocks whose partials merge in key order. One BLAS thread per worker: BLAS's own threads
    # are slow on the kernel's many small products, and their count would change the bits.
    step = max(1, min(ROW_ELEMS // (B * Hkv * G * D), max(MIN_ROWS, -(-nq // ROW_CHUNKS))))

    def chunk(r0):
        r1 = min(nq, r0 + step)
        po, pl, n = plan.rows(np, q[:, :, :, r0:r1], qpos[r0:r1], k, v, k0, scale)
        o[:, :, :, r0:r1], lse[:, :, :, r0:r1] = po, pl
        return n

    def block(c0):
        c1 = min(nk, c0 + KEY_BLOCK)
        return plan.rows(np, q, qpos, k[:, :, c0:c1], v[:, :, c0:c1], k0 + c0, scale)

    workers = threads()
    with _blas().limit(limits=1, user_api="blas"):
        if nq > step or nk <= KEY_BLOCK:
            run = map if workers == 1 or nq <= step else _pool(workers).map
            return o, lse, sum(run(chunk, range(0, nq, step)))
        run = map if workers == 1 else _pool(workers).map
        o[...], lse[...], edges = _fold(np, run(block, range(0, nk, KEY_BLOCK)), (B, Hkv, G, nq), D)
        return o, lse, edges


def _fold(xp, parts, shape, D):
    """(o, lse, edges) of partials (o, lse, edges) of the same rows over disjoint keys, merged
    in order (a part without edges is skipped: its state is the merge identity)."""
    o = lse = None
    edges = 0
    for po, pl, e in parts:
        if e:
            o, lse = (po, pl) if o is None else merge(o, lse, po, pl)
        edges += e
    return (*(empty_state(xp, shape, D) if o is None else (o, lse)), edges)


_SHARED = {}


def _blas():
    """The process's BLAS thread controller (inspecting the loaded libraries once)."""
    if "blas" not in _SHARED:
        _SHARED["blas"] = ThreadpoolController()
    return _SHARED["blas"]


def _pool(workers):
    """A thread pool kept for the process (starting threads per call costs milliseconds)."""
    if _SHARED.get("pool", (0,))[0] != workers:
        _SHARED["pool"] = (workers, ThreadPoolExecutor(workers, thread_name_prefix="hpcattn"))
    return _SHARED["pool"][1]


@functools.lru_cache(maxsize=64)
def _plan(mask):
    """The Plan of a mask, made once per Mask object (a repeated call passes the same one)."""
    return Plan(mask)


class Plan:
    """The mask cut into the kernel's three disjoint pieces (see the module docstring)."""

    def __init__(self, mask):
        if any(t.dense for t in mask.terms):
            self.band, self.tiles, self.gather = None, Mask(mask.spec, [Full()], mask.causal), None
            self.implicit = self.tiles
            return
        wins = [t.band for t in mask.terms if t.band is not None]
        self.band = Mask(mask.spec, [Window(max(wins))], mask.causal) if wins else None
        self.tiles = mask.subset(lambda t: t.gathered or t.band is not None, exclude=True)
        self.implicit = mask.subset(lambda t: t.gathered, exclude=True)  # band + tiles
        self.gather = mask.subset(lambda t: t.gathered)

    def rows(self, xp, q, pos, k, v, k0, scale):
        """(o, lse, edges) of one chunk of query rows: the pieces, merged."""
        B, Hkv, G, n, D = q.shape
        return _fold(xp, (fn(xp, q, pos, k, v, k0, piece, exclude, scale) for piece, fn, exclude in
                          ((self.band, _band, None), (self.tiles, _tiles, self.band),
                           (self.gather, _gather, self.implicit)) if piece is not None),
                     (B, Hkv, G, n), D)


def _softmax_block(xp, s, vb, m_finite):
    """Given scores s (..., rows, keys) already masked with -inf, return (o, lse) of the rows."""
    m = s.max(axis=-1)
    m_ref = m if m_finite else xp.where(xp.isneginf(m), 0, m)
    s -= m_ref[..., None]
    xp.exp(s, out=s)
    denom = s.sum(axis=-1)
    o = xp.matmul(s, vb)
    o /= (denom if m_finite else xp.where(denom > 0, denom, 1))[..., None]
    with np.errstate(divide="ignore"):
        lse = m_ref + xp.log(denom)
    return o, lse


_BIAS = {}


def _band_bias(xp, T, W, causal):
    """Additive mask of an interior band tile, keys-major: (L keys, T rows), key c of the span
    p0 - W + c; with the key ranges [c0, c1) that hold a masked entry (the rest is all zero)."""
    key = (T, W, causal, xp.__name__)
    if key not in _BIAS:
        r = np.arange(T)[None, :]
        c = np.arange(T + (W if causal else 2 * W))[:, None]
        d = c - W - r  # j - i
        ok = (np.abs(d) <= W) & ((d <= 0) if causal else True)
        hit = ~ok.all(axis=1)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], hit.view(np.int8), [0]])))
        parts = [(int(c0), int(c1)) for c0, c1 in zip(edges[::2], edges[1::2])]
        _BIAS[key] = (xp.asarray(np.where(ok, 0, -np.inf).astype(np.float32)), parts, int(ok.sum()))
    return _BIAS[key]


def _band(xp, q, pos, k, v, k0, band, exclude, scale):
    """The band piece: the compiled band kernel where its blocked loops run (see
    cgather.band_available; float16 rows over contiguous keys widened a chunk at a time), else
    batched interior tiles with a shared bias, ragged tiles via _tiles."""
    B, Hkv, G, n, D = q.shape
    nk = k.shape[2]
    W, causal = band.terms[0].w, band.causal
    if xp is np and k.dtype == v.dtype == q.dtype and cgather.band_available(q.dtype, D):
        # each row's keys [p - W, p + W] (causal: [p - W, p]) within the block, local indices
        lo = np.clip(pos - W, k0, k0 + nk) - k0
        hi = np.clip(pos + (1 if causal else W + 1), k0, k0 + nk) - k0
        a, b = int(np.minimum(lo, hi).min()), int(hi.max())  # the keys the chunk's rows reach
        if q.dtype == np.float32 or b - a <= 4 * (n + 2 * W + 16):
            k, v, lo, hi = k[:, :, a:b], v[:, :, a:b], lo - a, hi - a  # any copy O(chunk)
            if q.dtype != np.float32:  # float16: only these keys widened
                k, v = as_float32(k), as_float32(v)
            o, lse, _ = cgather.band_rows(q, k, v, lo, hi, scale)
            return o, lse, int(np.maximum(hi - lo, 0).sum())
    T = int(min(BAND_TILE, max(16, W // 4)))  # tile rows: span T + 2W keeps >= 2/3 of work useful
    L = T + (W if causal else 2 * W)
    o, lse = empty_state(xp, (B, Hkv, G, n), D)
    edges = 0
    runs = np.flatnonzero(np.diff(pos) != 1) + 1
    ragged = []  # row ranges [a, b) not covered by interior tiles
    for a, b in zip(np.concatenate([[0], runs]), np.concatenate([runs, [n]])):
        a, b = int(a), int(b)
        p0 = int(pos[a])
        # interior tile t covers rows a + t*T ..; its span starts at p0 + t*T - W
        t_lo = max(0, -(-(k0 - p0 + W) // T))
        t_hi = min((b - a) // T, (k0 + nk - L - p0 + W) // T + 1)
        if t_hi <= t_lo:
            ragged.append((a, b))
            continue
        ragged += [(a, a + t_lo * T), (a + t_hi * T, b)]
        bias = _band_bias(xp, T, W, causal)
        g_max = max(1, BAND_ELEMS // (B * Hkv * G * T * L))
        # |k|^2 and |v|^2 of each key row of the run's interior spans (for c and the no-shift
        # test; einsum: a max over each row's D entries is 8x slower)
        lo, hi = p0 + t_lo * T - W - k0, p0 + (t_hi - 1) * T - W - k0 + L
        kn, vn = (xp.einsum("...d,...d->...", x[:, :, lo:hi], x[:, :, lo:hi], dtype=xp.float32)
                  for x in (k, v))
        for t0 in range(t_lo, t_hi, g_max):
            t1 = min(t_hi, t0 + g_max)
            g = t1 - t0
            s0 = p0 + t0 * T - W - k0  # local key row where tile t0's span starts
            rows = (g - 1) * T + L
            kf = k[:, :, s0:s0 + rows].astype(xp.float32, copy=False)
            vf = v[:, :, s0:s0 + rows].astype(xp.float32, copy=False)

            def tiles(x):  # overlapping (g, L) windows of the slab, T rows apart: no copy
                return as_strided(x, (B, Hkv, g, L, x.shape[-1]), (x.strides[0], x.strides[1],
                                  T * x.strides[2], x.strides[2], x.strides[3]))
            kb, vb = tiles(kf), tiles(vf)
            r0, r1 = a + t0 * T, a + t1 * T
            qb = (q[:, :, :, r0:r1].reshape(B, Hkv, G, g, T, D).transpose(0, 1, 3, 2, 4, 5)
                  .reshape(B, Hkv, g, G * T, D).astype(xp.float32)) * np.float32(scale)
            c = float(xp.sqrt(xp.einsum("...d,...d->...", qb, qb).max())
                      * xp.sqrt(kn[:, :, s0 - lo:s0 - lo + rows].max()))
            vmax = max(1.0, float(xp.sqrt(vn[:, :, s0 - lo:s0 - lo + rows].max())))
            ob, lb = _band_softmax(xp, qb, kb, vb, c, vmax, bias, G, T, L)
            o[:, :, :, r0:r1] = ob.reshape(B, Hkv, g, G, T, D).transpose(0, 1, 3, 2, 4, 5).reshape(B, Hkv, G, g * T, D)
            lse[:, :, :, r0:r1] = lb.reshape(B, Hkv, g, G, T).transpose(0, 1, 3, 2, 4).reshape(B, Hkv, G, g * T)
            edges += g * bias[2]
    for a, b in ragged:
        if b > a:
            po, pl, e = _tiles(xp, q[:, :, :, a:b], pos[a:b], k, v, k0, band, None, scale)
            o[:, :, :, a:b], lse[:, :, :, a:b] = po, pl
            edges += e
    return o, lse, edges


def _ones(xp, n):
    """A float32 vector of n ones (cached): row sums as a BLAS matrix-vector product."""
    key = ("ones", n, xp.__name__)
    if key not in _BIAS:
        _BIAS[key] = xp.ones(n, dtype=xp.float32)
    return _BIAS[key]


UNDERFLOW = 1e-25  # a row sum below this (row max < bound - 57) takes the exact path
NO_SHIFT = 40.0    # bound c up to which exp(score) is taken without subtracting c
SAFE = 1e30        # largest exp-weighted sum of |V| (and of exp) allowed without the shift


def _band_softmax(xp, qb, kb, vb, c, vmax, bias, G, T, L):
    """(o, lse) of a group of interior band tiles: two BLAS products and one elementwise pass.

    Scores are computed keys-major, S^T = K Q^T per tile (L x G*T; OpenBLAS runs this shape about
    1.3x faster than Q K^T with a transposed K view), so the mask touches only the key ranges
    of S^T that hold masked entries, and the row sums are one BLAS product with a ones vector
    (5x faster than a NumPy sum over S^T's rows). No row-max pass: c >= every score of the
    group (Cauchy-Schwarz: max|q| * max|k|, scale folded into q) keeps exp from overflowing.
    When c is small (c <= NO_SHIFT and exp(c) * L * max|v|_2 <= SAFE: ordinary inputs) exp(s) is
    taken as is: every term lies in [exp(-c), exp(c)], so neither the sums nor P V can
    overflow or underflow; otherwise c is subtracted inside the bias add, and if a row sum then
    underflows (row max far below c) the group is recomputed with exact row maxima.
    """
    B, Hkv, g = qb.shape[:3]
    full, parts, _ = bias
    st = xp.matmul(kb, qb.swapaxes(-1, -2))  # (B, Hkv, g, L, G*T)
    s6 = st.reshape(B, Hkv, g, L, G, T)
    if np.isfinite(c) and c <= NO_SHIFT and np.exp(c) * L * vmax <= SAFE:
        shift = 0.0
        for c0, c1 in parts:
            s6[:, :, :, c0:c1] += full[c0:c1, None, :]
    elif np.isfinite(c):
        shift = c
        s6 += full[:, None, :] - np.float32(c)
    else:
        shift = None
    if shift is not None:
        xp.exp(st, out=st)
        den = xp.matmul(_ones(xp, L), st)
        if float(den.min()) >= UNDERFLOW:
            ov = xp.matmul(st.swapaxes(-1, -2), vb)
            ov /= den[..., None]
            return ov, np.float32(shift) + xp.log(den)
    s = xp.matmul(qb, kb.swapaxes(-1, -2))
    s.reshape(B, Hkv, g, G, T, L)[...] += full.T
    return _softmax_block(xp, s, vb, True)


def _all_full(mask):
    return all(t.dense for t in mask.terms)


def _tiles(xp, q, pos, k, v, k0, mask, exclude, scale):
    """Query tiles over the mask's key spans (minus `exclude`'s edges), grown while narrow."""
    B, Hkv, G, n, D = q.shape
    nk = k.shape[2]
    o, lse = empty_state(xp, (B, Hkv, G, n), D)
    edges = 0
    heads = B * Hkv * G
    t0 = 0
    breaks = mask.row_breaks()
    while t0 < n:
        t1 = min(n, t0 + Q_TILE)
        for g in breaks:  # end the tile where its rows change side of a break
            side = pos[t0:t1] < g
            if side[0] != side[-1]:
                t1 = t0 + int(np.argmax(side != side[0]))
        spans = mask.spans(int(pos[t0:t1].min()), int(pos[t0:t1].max()), k0, k0 + nk)
        width = sum(b - a for a, b in spans)
        if t1 < n and width * heads * (t1 - t0) * 4 < SCORE_ELEMS:  # narrow: grow the tile
            t1 = min(n, t0 + max(Q_TILE, SCORE_ELEMS // max(1, width * heads)))
            for g in breaks:
                side = pos[t0:t1] < g
                if side[0] != side[-1]:
                    t1 = t0 + int(np.argmax(side != side[0]))
            spans = mask.spans(int(pos[t0:t1].min()), int(pos[t0:t1].max()), k0, k0 + nk)
        tp = pos[t0:t1]
        qt = q[:, :, :, t0:t1].astype(xp.float32) * np.float32(scale)
        k_chunk = max(64, SCORE_ELEMS // max(1, heads * (t1 - t0)))
        to, tl = o[:, :, :, t0:t1], lse[:, :, :, t0:t1]
        for a, b in spans:
            if t1 - t0 <= DECODE_ROWS and exclude is None and (mask.dense or _all_full(mask)):
                d = min(b, int(tp.min()) + 1) if mask.causal else b  # keys every row reaches
                if d > a:  # few rows over many dense keys (decode): the streaming path
                    po, pl = _dense(qt, k[:, :, a - k0:d - k0], v[:, :, a - k0:d - k0])
                    edges += (t1 - t0) * (d - a)
                    to, tl = merge(to, tl, po, pl)
                    a = d
            for c0 in range(a, b, k_chunk):
                c1 = min(b, c0 + k_chunk)
                po, pl, e = _block(xp, qt, tp, k[:, :, c0 - k0:c1 - k0], v[:, :, c0 - k0:c1 - k0],
                                   c0, mask, exclude)
                if e:
                    edges += e
                    to, tl = merge(to, tl, po, pl)
        o[:, :, :, t0:t1], lse[:, :, :, t0:t1] = to, tl
        t0 = t1
    return o, lse, edges


def _dense(qt, kb, vb):
    """(o, lse) of a few pre-scaled float32 query rows qt (B, Hkv, G, tq, D) over keys kb, vb
    (B, Hkv, nk, D) that every row reaches: the decode shape, where per-key costs dominate.

    Per key chunk (sized so the scores stay in cache): the chunk is widened to float32 once into
    reused buffers (jit.widen), then all G heads and tq rows of a kv head take one product for
    the scores and one for the values, with one exp pass between. Each row's softmax reference m
    lags: the first chunk's row maxima, raised only when a chunk's row sum exceeds LAG (that
    chunk is then redone with its maxima). So m is subtracted inside the score product (Q
    carries -m in an extra column, K a column of ones) and the row sums come out of the value
    product (V carries a column of ones): no max, subtract or sum pass per chunk. Scores are
    in base 2 (Q times log2 e), since NumPy's exp2 costs half its exp.
    """
    B, Hkv, G, tq, D = qt.shape
    nk, R = kb.shape[2], G * tq
    c = min(nk, max(256, DECODE_ELEMS // (B * Hkv * R)))
    qa = np.zeros((B, Hkv, R, D + 1), np.float32)
    qa[..., :D] = qt.reshape(B, Hkv, R, D) * np.float32(np.log2(np.e))
    ka, va = np.ones((B, Hkv, c, D + 1), np.float32), np.ones((B, Hkv, c, D + 1), np.float32)
    s = np.empty((B, Hkv, R, c), np.float32)
    acc = np.zeros((B, Hkv, R, D + 1), np.float32)  # [sum p v, sum p] per row
    m = None
    for c0 in range(0, nk, c):
        w = min(c, nk - c0)
        kc, vc = ka[:, :, :w], va[:, :, :w]
        jit.widen(kb[:, :, c0:c0 + w], kc[..., :D])
        jit.widen(vb[:, :, c0:c0 + w], vc[..., :D])
        out = s if w == c else None
        sc = np.matmul(qa, kc.swapaxes(-1, -2), out=out)  # (scores - m) in base 2
        if m is None:  # first chunk: the reference is its row maxima
            m = sc.max(axis=-1)
            sc -= m[..., None]
            qa[..., D] = -m
        np.exp2(sc, out=sc)
        part = np.matmul(sc, vc)
        if not part[..., D].max() <= LAG:  # a row rose far above its reference (or NaN): redo
            sc = np.matmul(qa, kc.swapaxes(-1, -2), out=out)
            top = np.maximum(sc.max(axis=-1), 0)
            sc -= top[..., None]
            np.exp2(sc, out=sc)
            part = np.matmul(sc, vc)
            acc *= np.exp2(-top)[..., None]
            m = m + top
            qa[..., D] = -m
        acc += part
    den = acc[..., D]  # >= 1: each row's reference key counts 2^0
    o = acc[..., :D] / den[..., None]
    lse = (m + np.log2(den)) * np.float32(np.log(2))
    return o.reshape(B, Hkv, G, tq, D), lse.reshape(B, Hkv, G, tq)


def _block(xp, qt, pos, kb, vb, c0, mask, exclude):
    """Dense softmax partial of a (pre-scaled) query tile over one key block."""
    B, Hkv, G, tq, D = qt.shape
    nk = kb.shape[2]
    full = exclude is None and (mask.dense or (_all_full(mask) and c0 + nk - 1 <= pos.min()))
    if full:
        n, allowed = tq * nk, None
    else:
        cols = np.arange(c0, c0 + nk)
        allowed = mask.allowed(pos[:, None], cols[None, :])
        if exclude is not None:
            allowed &= ~exclude.allowed(pos[:, None], cols[None, :])
        n = int(allowed.sum())
        if n == 0:
            return None, None, 0
    kb = kb.astype(xp.float32, copy=False)
    vb = vb.astype(xp.float32, copy=False)
    s = xp.matmul(qt.reshape(B, Hkv, G * tq, D), kb.swapaxes(-1, -2)).reshape(B, Hkv, G, tq, nk)
    if allowed is not None:
        s[..., ~xp.asarray(allowed)] = -xp.inf
    o, lse = _softmax_block(xp, s, vb[:, :, None], full)
    return o, lse.astype(xp.float32, copy=False), n


def _gather(xp, q, pos, k, v, k0, mask, exclude, scale):
    """Listed edges (minus `exclude`'s): gathered K/V rows, segment-wise softmax per row."""
    B, Hkv, G, n, D = q.shape
    nk = k.shape[2]
    indptr, cols = mask.columns(pos, k0, k0 + nk)
    rows = None
    if exclude is not None and len(cols):
        rows = np.repeat(np.arange(n), np.diff(indptr))
        keep = ~exclude.allowed(pos[rows], cols)
        rows, cols = rows[keep], cols[keep]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    edges = len(cols)
    if edges == 0:
        return (*empty_state(xp, (B, Hkv, G, n), D), 0)
    if k0:
        cols = cols - k0
    if xp is np and cgather.available(q.dtype):  # kernels/gather.c; NumPy below otherwise
        return (*cgather.gather_rows(q, k, v, indptr, cols, scale), edges)
    if rows is None:
        rows = np.repeat(np.arange(n), np.diff(indptr))
    o, lse = empty_state(xp, (B, Hkv, G, n), D)
    step = max(1, EDGE_ELEMS // (B * Hkv * G * D))
    e0 = 0
    while e0 < edges:
        e1 = min(edges, e0 + step)
        if e1 < edges:  # end the chunk at a row boundary (a row longer than a chunk is one chunk)
            cut = np.searchsorted(rows, rows[e1], side="left")
            e1 = cut if cut > e0 else int(np.searchsorted(rows, rows[e0], side="right"))
        r, c = rows[e0:e1], cols[e0:e1]
        starts = np.concatenate([[0], np.flatnonzero(r[1:] != r[:-1]) + 1])
        counts = np.diff(np.concatenate([starts, [len(r)]]))
        urows = xp.asarray(r[starts])
        kg = k[:, :, c].astype(xp.float32, copy=False)
        qg = q[:, :, :, r].astype(xp.float32, copy=False)
        s = xp.einsum("bhged,bhed->bhge", qg, kg)
        s *= np.float32(scale)
        m = xp.maximum.reduceat(s, starts, axis=-1)
        s -= xp.repeat(m, counts, axis=-1)
        xp.exp(s, out=s)
        denom = xp.add.reduceat(s, starts, axis=-1)
        vg = v[:, :, c].astype(xp.float32, copy=False)
        num = xp.add.reduceat(s[..., None] * vg[:, :, None], starts, axis=-2)
        o[:, :, :, urows] = num / denom[..., None]
        lse[:, :, :, urows] = m + xp.log(denom)
        e0 = e1
    return o, lse, edges
