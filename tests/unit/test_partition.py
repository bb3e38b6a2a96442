import numpy as np
import pytest

from hpcattn.partition import even_offsets, even_shard


@pytest.mark.parametrize("n", [0, 1, 3, 7, 100, 1001])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_even_split_covers_in_order_and_sizes_differ_by_at_most_one(n, parts):
    off = even_offsets(n, parts)
    sizes = np.diff(off)
    assert off[0] == 0 and off[-1] == n and len(off) == parts + 1
    assert (sizes >= 0).all() and sizes.max() - sizes.min() <= 1
    assert [even_shard(n, parts, r) for r in range(parts)] == list(zip(off[:-1], off[1:]))


def test_more_parts_than_items_leaves_empty_shards():
    assert np.diff(even_offsets(3, 5)).tolist() == [1, 1, 1, 0, 0]


def test_zero_parts_is_an_error():
    with pytest.raises(ValueError):
        even_offsets(5, 0)


@pytest.mark.parametrize("n", [0, 1, 5, 8, 101, 1000])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_zigzag_covers_every_item_once_and_rank_owns_chunks_r_and_mirror(n, parts):
    from hpcattn.partition import positions, zigzag_segments
    segs = [zigzag_segments(n, parts, r) for r in range(parts)]
    allpos = np.sort(np.concatenate([positions(s) for s in segs]))
    assert allpos.tolist() == list(range(n))
    chunks = even_offsets(n, 2 * parts)
    for r, ((a, b), (c, d)) in enumerate(segs):
        assert (a, b) == (chunks[r], chunks[r + 1])
        assert (c, d) == (chunks[2 * parts - 1 - r], chunks[2 * parts - r])


@pytest.mark.parametrize("n, parts", [(4096, 2), (4096, 3), (4096, 4), (100_003, 4), (1000, 8)])
def test_zigzag_balances_causal_work_within_5_percent(n, parts):
    from hpcattn.partition import causal_edges, zigzag_segments
    work = np.array([causal_edges(zigzag_segments(n, parts, r)) for r in range(parts)])
    assert work.sum() == n * (n + 1) // 2
    assert work.max() <= 1.05 * work.mean()
    contiguous = np.array([causal_edges([even_shard(n, parts, r)]) for r in range(parts)])
    assert contiguous.max() > 1.3 * contiguous.mean()  # what zigzag fixes
