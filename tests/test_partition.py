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
