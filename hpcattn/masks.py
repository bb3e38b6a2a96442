"""Attention masks as graphs: parse a mask spec and evaluate its edges on the fly.

SPEC = TERM ('+' TERM)*. Every term except `causal` adds edges (union); `causal` keeps only
j <= i of that union (alone it means j <= i). Implicit terms store nothing: a kernel asks for
the key spans a tile of queries may reach (`spans`), the exact edges inside them (`allowed`),
or the explicit columns of some query rows (`columns`, CSR over those rows).

Every term class derives from `Term` and answers for itself what the rest of the package asks
(the variants, out-of-core runs, the CPU plan, the GPU encoder and bench test no classes):
`reach()` and `width()` (how far a row's keys lie; None when unbounded), `global_rows()`,
`listed` (edges given as explicit columns by `columns`: random, csr), `gathered` (the CPU
kernel gathers the edges row by row: the listed terms and dilated), `band`, `dense`,
`needs()`/`bind()` (data beyond the spec), `device_words()` (kernels/mask.cuh) and
`flex_mod(torch, n)` (FlexAttention). `Mask` aggregates them: `dense`, `needs`, `reach()`,
`global_rows()`, `row_breaks()`, `subset(predicate)`.

Two terms need data beyond the spec; `parse(spec, n_keys=N, csr=...)` or `Mask.bind` gives it:
- `random:R[:SEED]` needs N, the number of keys (positions are drawn from [0, N)).
- `csr` needs the explicit edges: a `CsrRows` (rows row0 .. row0+len(indptr)-2 of the file's
  `mask/indptr`, `mask/indices`), checked by `check_csr` before any index is used.

Random edges (the exact algorithm, so other kernels, e.g. CUDA, can reproduce it bit for bit).
All arithmetic is on unsigned 64-bit integers, wrapping modulo 2**64:

    mix(z):  z += 0x9E3779B97F4A7C15
             z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
             z = (z ^ (z >> 27)) * 0x94D049BB133111EB
             return z ^ (z >> 31)                     # splitmix64's output function
    u(seed, i, d) = mix(mix(mix(seed) ^ i) ^ d)        # i: query position, d: draw 0..R'-1

With R' = min(R, N), row i takes R' distinct keys by Robert Floyd's sampling, one draw per d:
    for d in 0 .. R'-1:  m = N - R' + d;  t = u(seed, i, d) % (m + 1)
                         key = t if t is not yet taken by this row else m
The keys depend on (SEED, i, N) alone: not on ranks, tiles or the key block being computed.
Every R'-subset of [0, N) is equally likely (Floyd's theorem, up to the modulo bias < 2**-40).
"""
from dataclasses import dataclass, field

import numpy as np

from .errors import HpcattnError

BIG = 1 << 62  # "no bound" for key ranges


class Term:
    """What a mask term answers about itself; the defaults describe an unbounded implicit term
    with no GPU encoding and no FlexAttention form. Subclasses are frozen dataclasses.

    Edges: `allowed(i, j)`, `spans(qlo, qhi)`, and either `progressions(i)` (implicit terms) or
    `columns(qpos, k0, k1)` (listed terms). Facts the rest of the package asks for:
    """
    dense = False     # every pair (i, j) is an edge (full)
    listed = False    # edges are explicit columns per row, from `columns` (random, csr)
    gathered = False  # the CPU kernel gathers its edges row by row (listed terms and dilated)
    band = None       # W when the edges are exactly the band |i - j| <= W (the CPU band kernel)
    drawn = False     # the GPU draws its columns itself (random: kernels/attend_rows.cu)

    def reach(self):
        """How far from its own position a row's keys can lie (global rows and keys aside, see
        `global_rows`), or None when unbounded (full, random, csr)."""
        return None

    def width(self):
        """Consecutive key positions that hold all of one row's keys (global keys aside), or
        None when unbounded."""
        return None

    def global_rows(self):
        """G when query rows below G reach every key (global:G), else 0."""
        return 0

    def needs(self):
        """What `bind` must still supply: a subset of {'n_keys', 'csr'}."""
        return set()

    def bind(self, n_keys=None, csr=None):
        """This term with the data it needs (the number of keys, explicit edges) bound."""
        return self

    def device_words(self):
        """(kind, a, b): the term's encoding for kernels/mask.cuh, or None when the GPU kernels
        have no implicit form for it (listed terms go to attend_rows instead)."""
        return None

    def flex_mod(self, torch, n):
        """A function (qi, kj) -> bool tensor of this term's edges for FlexAttention's mask_mod
        over n positions, or None when it has no closed form."""
        return None


@dataclass(frozen=True)
class Full(Term):
    dense = True

    def device_words(self):
        return (0, 0, 0)

    def flex_mod(self, torch, n):
        return lambda qi, kj: qi >= 0

    def allowed(self, i, j):
        return np.ones(np.broadcast_shapes(np.shape(i), np.shape(j)), dtype=bool)

    def spans(self, qlo, qhi):
        return [(None, None)]

    def progressions(self, i):
        return [(np.zeros_like(i), np.full_like(i, BIG), 1)]


@dataclass(frozen=True)
class Window(Term):
    w: int

    @property
    def band(self):
        return self.w

    def reach(self):
        return self.w

    def width(self):
        return 2 * self.w + 1

    def device_words(self):
        return (1, self.w, 0)

    def flex_mod(self, torch, n):
        return lambda qi, kj, w=self.w: (qi - kj).abs() <= w

    def allowed(self, i, j):
        return np.abs(i - j) <= self.w

    def spans(self, qlo, qhi):
        return [(qlo - self.w, qhi + self.w + 1)]

    def progressions(self, i):
        return [(i - self.w, i + self.w + 1, 1)]


@dataclass(frozen=True)
class Dilated(Term):
    w: int
    r: int
    gathered = True

    def reach(self):
        return self.w * self.r

    def width(self):
        return 2 * self.w * self.r + 1

    def device_words(self):
        return (2, min(self.w * self.r, 2**62), self.r)

    def flex_mod(self, torch, n):
        return lambda qi, kj, w=self.w * self.r, r=self.r: ((qi - kj).abs() <= w) & ((qi - kj) % r == 0)

    def allowed(self, i, j):
        d = i - j
        return (np.abs(d) <= self.w * self.r) & (d % self.r == 0)

    def spans(self, qlo, qhi):
        return [(qlo - self.w * self.r, qhi + self.w * self.r + 1)]

    def progressions(self, i):
        return [(i - self.w * self.r, i + self.w * self.r + 1, self.r)]


@dataclass(frozen=True)
class Block(Term):
    s: int

    def reach(self):
        return self.s

    def width(self):
        return self.s

    def device_words(self):
        return (3, self.s, 0)

    def flex_mod(self, torch, n):
        return lambda qi, kj, s=self.s: qi // s == kj // s

    def allowed(self, i, j):
        return (i // self.s) == (j // self.s)

    def spans(self, qlo, qhi):
        return [(qlo // self.s * self.s, (qhi // self.s + 1) * self.s)]

    def progressions(self, i):
        lo = i // self.s * self.s
        return [(lo, lo + self.s, 1)]


@dataclass(frozen=True)
class Global(Term):
    g: int

    def reach(self):
        return 0

    def width(self):
        return 0

    def global_rows(self):
        return self.g

    def device_words(self):
        return (4, self.g, 0)

    def flex_mod(self, torch, n):
        return lambda qi, kj, g=self.g: (qi < g) | (kj < g)

    def allowed(self, i, j):
        return (i < self.g) | (j < self.g)

    def spans(self, qlo, qhi):
        return [(None, None)] if qlo < self.g else [(0, self.g)]

    def progressions(self, i):
        return [(np.zeros_like(i), np.where(i < self.g, BIG, self.g), 1)]


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix64(z):
    """splitmix64's output function on uint64 arrays (wrapping)."""
    z = np.asarray(z, dtype=np.uint64) + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def random_keys(seed, i, r, n):
    """(len(i), min(r, n)) int64: row i's random keys, sorted; the algorithm of the docstring."""
    i = np.asarray(i, dtype=np.int64).ravel()
    r = min(r, n)
    out = np.empty((i.size, r), dtype=np.int64)
    # "taken?" by comparing with the row's earlier draws (r^2 work per row), or, when r^2 > n,
    # by a bitmap of [0, n) per row for a block of rows (n work per row)
    block = i.size if r * r <= n else max(1, (1 << 24) // max(n, 1))
    with np.errstate(over="ignore"):
        for a in range(0, i.size, max(block, 1)):
            b = min(i.size, a + block)
            base = mix64(mix64(np.uint64(seed % 2**64)) ^ i[a:b].astype(np.uint64))
            seen = np.zeros((b - a, n), dtype=bool) if r * r > n else None
            for d in range(r):
                m = n - r + d
                t = (mix64(base ^ np.uint64(d)) % np.uint64(m + 1)).astype(np.int64)
                if seen is None:
                    taken = (out[a:b, :d] == t[:, None]).any(axis=1)
                else:
                    taken = seen[np.arange(b - a), t]
                pick = np.where(taken, m, t)
                out[a:b, d] = pick
                if seen is not None:
                    seen[np.arange(b - a), pick] = True
    out.sort(axis=1)
    return out


@dataclass(frozen=True)
class Random(Term):
    r: int
    seed: int = 0
    n: int = None  # number of keys, bound by Mask.bind
    listed = gathered = drawn = True

    def needs(self):
        return {"n_keys"} if self.n is None else set()

    def bind(self, n_keys=None, csr=None):
        return Random(self.r, self.seed, n_keys) if n_keys is not None else self

    def flex_mod(self, torch, n):
        keys = random_keys(self.seed, np.arange(n), self.r, n)
        cols = [torch.from_numpy(np.ascontiguousarray(keys[:, d])) for d in range(keys.shape[1])]

        def rnd(qi, kj):  # one 1-D lookup per draw (what flex's vmap accepts)
            hit = cols[0][qi] == kj
            for c in cols[1:]:
                hit = hit | (c[qi] == kj)
            return hit
        return rnd

    def _need(self):
        if self.n is None:
            raise HpcattnError("mask term random needs the number of keys: bind it "
                               "(parse(spec, n_keys=N) or Mask.bind(n_keys=N))")

    def allowed(self, i, j):
        self._need()
        i, j = np.broadcast_arrays(np.asarray(i), np.asarray(j))
        rows, inv = np.unique(i, return_inverse=True)
        keys = random_keys(self.seed, rows, self.r, self.n)[inv.reshape(i.shape)]
        out = np.zeros(i.shape, dtype=bool)
        for d in range(keys.shape[-1]):
            out |= keys[..., d] == j
        return out

    def spans(self, qlo, qhi):
        return [(None, None)]

    def columns(self, qpos, k0, k1):
        self._need()
        keys = random_keys(self.seed, qpos, self.r, self.n)
        keep = (keys >= k0) & (keys < k1)
        return np.concatenate([[0], np.cumsum(keep.sum(axis=1))]), keys[keep]


@dataclass(frozen=True, eq=False)
class CsrRows:
    """Rows row0 .. row0+len(indptr)-2 of an explicit edge list (rows = query positions).

    indptr is local (indptr[0] may be non-zero: it is the file's offset; indices holds exactly
    the entries indptr[0] .. indptr[-1]). Build it through `check_csr`, which validates."""
    indptr: np.ndarray
    indices: np.ndarray
    row0: int
    n_keys: int
    codes: np.ndarray = field(default=None, repr=False)  # row * n_keys + col, sorted

    @property
    def n_rows(self):
        return len(self.indptr) - 1


def check_csr(indptr, indices, n_keys, row0=0, n_rows_total=None, where="mask"):
    """Validate CSR rows and return a CsrRows; HpcattnError names the first problem.

    Checks: integer dtypes, indptr 1-D, non-decreasing, consistent with len(indices) (and of
    length n_rows_total+1 when given), every index in [0, n_keys), strictly increasing within
    each row (sorted, no duplicates). Vectorised: O(nnz)."""
    indptr, indices = np.asarray(indptr), np.asarray(indices)
    for name, a in (("indptr", indptr), ("indices", indices)):
        if a.dtype.kind not in "iu":
            raise HpcattnError(f"{where}/{name} must hold integers, got dtype {a.dtype}")
        if a.ndim != 1:
            raise HpcattnError(f"{where}/{name} must be 1-D, got shape {a.shape}")
    if n_rows_total is not None and len(indptr) != n_rows_total + 1:
        raise HpcattnError(f"{where}/indptr must have {n_rows_total + 1} entries (one per query "
                           f"position + 1), got {len(indptr)}")
    if len(indptr) < 1:
        raise HpcattnError(f"{where}/indptr is empty")
    indptr, indices = indptr.astype(np.int64), indices.astype(np.int64)
    steps = np.diff(indptr)
    if (steps < 0).any() or (row0 == 0 and indptr[0] != 0):
        bad = int(np.argmax(steps < 0)) if (steps < 0).any() else -1
        raise HpcattnError(f"{where}/indptr must start at 0 and never decrease"
                           + (f" (row {row0 + bad})" if bad >= 0 else f" (starts at {indptr[0]})"))
    if indptr[-1] - indptr[0] != len(indices):
        raise HpcattnError(f"{where}/indptr ends at {indptr[-1]} but {where}/indices "
                           f"has {len(indices) + indptr[0]} entries")
    if len(indices):
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n_keys:
            bad = int(np.argmax((indices < 0) | (indices >= n_keys)))
            row = row0 + int(np.searchsorted(indptr - indptr[0], bad, side="right")) - 1
            raise HpcattnError(f"{where}/indices out of range: {int(indices[bad])} in row {row} "
                               f"(keys are 0..{n_keys - 1})")
        starts = np.zeros(len(indices), dtype=bool)
        starts[(indptr[:-1] - indptr[0])[steps > 0]] = True
        bad = ~starts[1:] & (indices[1:] <= indices[:-1])
        if bad.any():
            e = int(np.argmax(bad)) + 1
            row = row0 + int(np.searchsorted(indptr - indptr[0], e, side="right")) - 1
            word = "duplicate" if indices[e] == indices[e - 1] else "unsorted"
            raise HpcattnError(f"{where}/indices: {word} column {int(indices[e])} in row {row} "
                               "(each row must be strictly increasing)")
    rows = np.repeat(np.arange(row0, row0 + len(steps), dtype=np.int64), steps)
    return CsrRows(indptr, indices, int(row0), int(n_keys), rows * n_keys + indices)


@dataclass(frozen=True, eq=False)
class Csr(Term):
    data: CsrRows = None
    listed = gathered = True

    def needs(self):
        return {"csr"} if self.data is None else set()

    def bind(self, n_keys=None, csr=None):
        return Csr(csr) if csr is not None else self

    def _rows(self, i):
        if self.data is None:
            raise HpcattnError("mask term csr needs the explicit edges: bind them "
                               "(parse(spec, csr=check_csr(...)) or Mask.bind(csr=...))")
        d = self.data
        i = np.asarray(i)
        if i.size and (i.min() < d.row0 or i.max() >= d.row0 + d.n_rows):
            raise HpcattnError(f"csr mask holds rows {d.row0}..{d.row0 + d.n_rows - 1}, "
                               f"asked for rows {i.min()}..{i.max()}")
        return d

    def allowed(self, i, j):
        i, j = np.broadcast_arrays(np.asarray(i), np.asarray(j))
        d = self._rows(i)
        ok = (j >= 0) & (j < d.n_keys)
        code = i.astype(np.int64) * d.n_keys + np.clip(j, 0, d.n_keys - 1)
        at = np.searchsorted(d.codes, code)
        hit = d.codes[np.minimum(at, len(d.codes) - 1)] == code if len(d.codes) else np.zeros(i.shape, bool)
        return ok & hit

    def spans(self, qlo, qhi):
        return [(None, None)]

    def columns(self, qpos, k0, k1):
        d = self._rows(qpos)
        base = d.indptr[0]
        if len(qpos) and k0 <= 0 and k1 >= d.n_keys and (np.diff(qpos) == 1).all():
            a, b = qpos[0] - d.row0, qpos[-1] - d.row0 + 1  # consecutive rows, all keys: slices
            return d.indptr[a:b + 1] - d.indptr[a], d.indices[d.indptr[a] - base:d.indptr[b] - base]
        lo, hi = d.indptr[qpos - d.row0] - base, d.indptr[qpos - d.row0 + 1] - base
        idx = ranges(lo, hi)
        cols = d.indices[idx]
        keep = (cols >= k0) & (cols < k1)
        rows = np.repeat(np.arange(len(qpos)), hi - lo)
        counts = np.bincount(rows[keep], minlength=len(qpos))
        return np.concatenate([[0], np.cumsum(counts)]), cols[keep]


def ranges(lo, hi, step=1):
    """Concatenation of arange(lo[r], hi[r], step) over rows r, vectorised (hi <= lo: empty)."""
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    counts = np.maximum(0, (hi - lo + step - 1) // step)
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.repeat(lo - starts * step, counts) + step * np.arange(total, dtype=np.int64)


_TERMS = {"full": (Full, (0,)), "window": (Window, (1,)), "dilated": (Dilated, (2,)),
          "block": (Block, (1,)), "global": (Global, (1,)), "random": (Random, (1, 2)),
          "csr": (Csr, (0,))}
_MINIMUM = {"window": (0,), "dilated": (0, 1), "block": (1,), "global": (1,), "random": (0, 0)}
KNOWN = ("full", "causal", "window:W", "dilated:W:R", "block:S", "global:G", "random:R[:SEED]", "csr")


class _Adopted:
    """A term object that does not derive from Term (only its edge methods, say): its own
    attributes where it has them, else Term's defaults (listed and gathered: has `columns`)."""

    def __init__(self, term):
        self.term = term

    def __repr__(self):
        return repr(self.term)

    def __getattr__(self, name):
        if name.startswith("__") or name == "term":  # (copy and pickle look before __init__)
            raise AttributeError(name)
        if hasattr(self.term, name):
            return getattr(self.term, name)
        if name in ("listed", "gathered"):
            return hasattr(self.term, "columns")
        default = getattr(Term, name)  # AttributeError for what the protocol does not define
        return default.__get__(self) if callable(default) else default


class Mask:
    """A parsed mask: the union of `terms`, restricted to j <= i when `causal`. Terms should
    derive from Term; other objects with the edge methods are adopted with Term's defaults."""

    def __init__(self, spec, terms, causal):
        self.spec, self.causal = spec, causal
        self.terms = tuple(t if isinstance(t, (Term, _Adopted)) else _Adopted(t) for t in terms)

    def __repr__(self):
        return f"Mask({self.spec!r})"

    @property
    def dense(self):
        """True when every pair is an edge (no elementwise test needed)."""
        return not self.causal and any(t.dense for t in self.terms)

    @property
    def needs(self):
        """What bind() must supply: a subset of {'n_keys', 'csr'} not yet bound."""
        return set().union(*(t.needs() for t in self.terms))

    def bind(self, n_keys=None, csr=None):
        """A copy with random terms bound to n_keys and csr terms to `csr` (a CsrRows)."""
        return Mask(self.spec, [t.bind(n_keys, csr) for t in self.terms], self.causal)

    def reach(self):
        """How far from its own position any row's keys can lie (global rows and keys aside),
        or None when some term is unbounded."""
        reaches = [t.reach() for t in self.terms]
        return None if None in reaches else max(reaches)

    def global_rows(self):
        """G of the widest global term (query rows below it reach every key), else 0."""
        return max((t.global_rows() for t in self.terms), default=0)

    def subset(self, which, exclude=False):
        """A Mask of the terms that qualify (or, with exclude, do not), with the same causal
        restriction; None when none does. `which`: a predicate on terms, or term classes."""
        test = (lambda t: isinstance(t, which)) if isinstance(which, (type, tuple)) else which
        terms = [t for t in self.terms if bool(test(t)) != exclude]
        return Mask(self.spec, terms, self.causal) if terms else None

    def allowed(self, i, j):
        """Boolean edge test, broadcasting query positions i against key positions j."""
        i, j = np.asarray(i), np.asarray(j)
        out = self.terms[0].allowed(i, j)
        for t in self.terms[1:]:
            out = out | t.allowed(i, j)
        if self.causal:
            out = out & (j <= i)
        return out

    def spans(self, qlo, qhi, k0, k1):
        """Sorted disjoint key intervals [a, b) within [k0, k1) holding every edge of any
        query position in [qlo, qhi]. Keys outside them are never edges of those queries.
        Exact hulls for window/dilated/block/global; the whole range for random and csr."""
        hi_cap = min(k1, qhi + 1) if self.causal else k1
        ivs = []
        for t in self.terms:
            for a, b in t.spans(qlo, qhi):
                a = k0 if a is None else max(a, k0)
                b = hi_cap if b is None else min(b, hi_cap)
                if a < b:
                    ivs.append((a, b))
        ivs.sort()
        merged = []
        for a, b in ivs:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def columns(self, qpos, k0, k1):
        """Explicit edges of the query positions qpos (n,) among keys [k0, k1), as CSR over
        those rows: (indptr (n+1,) int64, indices int64 sorted and unique within each row).
        Work and memory O(n + edges); for the sparse distribution and the gather kernel."""
        qpos = np.asarray(qpos, dtype=np.int64)
        n = len(qpos)
        if len(self.terms) == 1 and self.terms[0].listed and not self.causal:
            return self.terms[0].columns(qpos, k0, k1)
        parts = []  # (counts per row, columns): each sorted and unique within a row
        for t in self.terms:
            if t.listed:
                ip, ix = t.columns(qpos, k0, k1)
                parts.append((np.diff(ip), ix))
                continue
            for lo, hi, step in t.progressions(qpos):
                lo, hi = np.broadcast_to(lo, qpos.shape), np.broadcast_to(hi, qpos.shape)
                lo = np.where(lo < k0, lo + (k0 - lo + step - 1) // step * step, lo)
                hi = np.minimum(hi, k1)
                if self.causal:
                    hi = np.minimum(hi, qpos + 1)
                parts.append((np.maximum(0, (hi - lo + step - 1) // step), ranges(lo, hi, step)))
        rows = [np.repeat(np.arange(n), c) for c, _ in parts]
        rows, cols = np.concatenate(rows or [[]]).astype(np.int64), np.concatenate(
            [ix for _, ix in parts] or [[]]).astype(np.int64)
        if self.causal:
            keep = cols <= qpos[rows]
            rows, cols = rows[keep], cols[keep]
        if len(parts) > 1:  # union: sort (row, col) codes and drop repeats
            width = max(1, k1 - k0)
            code = np.sort(rows * width + (cols - k0))
            code = code[np.concatenate([[True], code[1:] != code[:-1]])] if len(code) else code
            rows, cols = code // width, code % width + k0
        return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64), cols

    def row_breaks(self):
        """Query positions where some term's key spans change abruptly (global rows end);
        tiles cut there stay narrow."""
        return sorted({g for g in (t.global_rows() for t in self.terms) if g})


def parse(spec, n_keys=None, csr=None):
    """Parse a mask spec into a Mask (bound to n_keys / csr when given); HpcattnError names
    the offending term."""
    if not isinstance(spec, str) or not spec.strip():
        raise HpcattnError(f"empty mask spec {spec!r}; expected TERM('+'TERM)*, terms: {', '.join(KNOWN)}")
    terms, causal = [], False
    for raw in spec.split("+"):
        word, *args = raw.strip().split(":")
        if word == "causal" and not args:
            causal = True
            continue
        if word not in _TERMS:
            raise HpcattnError(f"bad mask spec {spec!r}: unknown term {raw.strip()!r} "
                               f"(known: {', '.join(KNOWN)})")
        cls, nargs = _TERMS[word]
        if len(args) not in nargs:
            raise HpcattnError(f"bad mask spec {spec!r}: term {word!r} takes "
                               f"{' or '.join(map(str, nargs))} integer argument(s), got {raw.strip()!r}")
        if not all(a.isascii() and a.isdigit() for a in args):  # int() would take " 5", "1_0", "٣"
            raise HpcattnError(f"bad mask spec {spec!r}: arguments of {word!r} must be integers "
                               f"written 0-9, got {raw.strip()!r}")
        vals = [int(a) if len(a) < 20 else 2**62 for a in args]  # 20+ digits: out of range below
        for v, lo in zip(vals, _MINIMUM.get(word, ())):
            if not lo <= v < 2**62:
                raise HpcattnError(f"bad mask spec {spec!r}: {raw.strip()!r} needs arguments in [{lo}, 2**62)")
        terms.append(cls(*vals))
    if not terms:
        terms = [Full()]
    return Mask(spec, terms, causal).bind(n_keys, csr)
