"""How a sequence is cut over ranks: pure functions, no MPI."""
import functools

import numpy as np


def even_offsets(n, parts):
    """Offsets (parts+1,) of an even contiguous split of n items; sizes differ by at most one.

    The first n % parts shards get the extra item. parts > n gives empty trailing shards.
    """
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    base, extra = divmod(int(n), int(parts))
    sizes = np.full(parts, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def even_shard(n, parts, rank):
    """(start, stop) of rank's shard in the even split of n items over parts."""
    off = even_offsets(n, parts)
    return int(off[rank]), int(off[rank + 1])


def zigzag_segments(n, parts, rank):
    """The two (start, stop) ranges rank owns in the zigzag layout of n items: the sequence is
    cut evenly into 2*parts chunks and rank r owns chunks r and 2*parts-1-r, so that under a
    causal mask every rank gets (nearly) the same work. Ranges are in ascending order."""
    off = even_offsets(n, 2 * parts)
    a, b = rank, 2 * parts - 1 - rank
    return [(int(off[a]), int(off[a + 1])), (int(off[b]), int(off[b + 1]))]


def segments(n, parts, rank, layout="contiguous"):
    """The ranges of n items that rank owns under `layout` ('contiguous' or 'zigzag')."""
    if layout == "zigzag":
        return zigzag_segments(n, parts, rank)
    if layout != "contiguous":
        raise ValueError(f"unknown layout {layout!r}")
    return [even_shard(n, parts, rank)]


def positions(segs):
    """The item indices covered by a list of (start, stop) ranges, in order (int64, read-only).

    Cached by the ranges themselves: a caller that passes the same layout again (every call
    of the public API on the same shapes) gets the same array, built once, and device copies
    keyed on it are reused."""
    return _positions(tuple((int(a), int(b)) for a, b in segs))


@functools.lru_cache(maxsize=8)  # each entry is 8 bytes per row: keep few
def _positions(segs):
    pos = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in segs] or [np.zeros(0, np.int64)])
    pos.flags.writeable = False
    return pos


def causal_edges(segs):
    """Causal (j <= i) pairs of the query positions in segs over a whole sequence of keys:
    sum of (i + 1), in closed form. The work a rank does under `causal` self-attention."""
    return sum((b - a) * (a + b + 1) // 2 for a, b in segs)
