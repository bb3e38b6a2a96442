"""Attention masks as graphs: parse a mask spec and evaluate its edges on the fly.

SPEC = TERM ('+' TERM)*. Every term except `causal` adds edges (union); `causal` keeps only
j <= i of that union (alone it means j <= i). Terms store nothing: a kernel asks for the key
spans a tile of queries may reach (`spans`) and the exact edges inside them (`allowed`).
"""
from dataclasses import dataclass

import numpy as np

from .errors import HpcattnError


@dataclass(frozen=True)
class Full:
    def allowed(self, i, j):
        return np.ones(np.broadcast_shapes(np.shape(i), np.shape(j)), dtype=bool)

    def spans(self, qlo, qhi):
        return [(None, None)]


@dataclass(frozen=True)
class Window:
    w: int

    def allowed(self, i, j):
        return np.abs(i - j) <= self.w

    def spans(self, qlo, qhi):
        return [(qlo - self.w, qhi + self.w + 1)]


@dataclass(frozen=True)
class Dilated:
    w: int
    r: int

    def allowed(self, i, j):
        d = i - j
        return (np.abs(d) <= self.w * self.r) & (d % self.r == 0)

    def spans(self, qlo, qhi):
        return [(qlo - self.w * self.r, qhi + self.w * self.r + 1)]


@dataclass(frozen=True)
class Block:
    s: int

    def allowed(self, i, j):
        return (i // self.s) == (j // self.s)

    def spans(self, qlo, qhi):
        return [(qlo // self.s * self.s, (qhi // self.s + 1) * self.s)]


@dataclass(frozen=True)
class Global:
    g: int

    def allowed(self, i, j):
        return (i < self.g) | (j < self.g)

    def spans(self, qlo, qhi):
        return [(None, None)] if qlo < self.g else [(0, self.g)]


_TERMS = {"full": (Full, 0), "window": (Window, 1), "dilated": (Dilated, 2),
          "block": (Block, 1), "global": (Global, 1)}
_MINIMUM = {"window": (0,), "dilated": (0, 1), "block": (1,), "global": (1,)}
KNOWN = ("full", "causal", "window:W", "dilated:W:R", "block:S", "global:G")


class Mask:
    """A parsed mask: the union of `terms`, restricted to j <= i when `causal`."""

    def __init__(self, spec, terms, causal):
        self.spec, self.terms, self.causal = spec, tuple(terms), causal

    def __repr__(self):
        return f"Mask({self.spec!r})"

    @property
    def dense(self):
        """True when every pair is an edge (no elementwise test needed)."""
        return not self.causal and any(isinstance(t, Full) for t in self.terms)

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
        query position in [qlo, qhi]. Keys outside them are never edges of those queries."""
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


def parse(spec):
    """Parse a mask spec into a Mask; HpcattnError names the offending term."""
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
        if len(args) != nargs:
            raise HpcattnError(f"bad mask spec {spec!r}: term {word!r} takes {nargs} integer "
                               f"argument(s), got {raw.strip()!r}")
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
    return Mask(spec, terms, causal)
