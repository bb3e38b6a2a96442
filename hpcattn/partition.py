"""How a sequence is cut over ranks: pure functions, no MPI."""
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
