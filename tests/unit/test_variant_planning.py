"""No MPI: the sparse variant's planning (pure functions) and auto's rule."""
import numpy as np
import pytest

from hpcattn.masks import parse
from hpcattn.dist.variants import backward_bytes, pick, reach_width, sparse
from hpcattn.dist.variants.rings import Relay, RingPlan


def test_union_expand_and_requests():
    ivs = sparse.union([(5, 9), (0, 2), (2, 3), (8, 12), (20, 20), (15, 16)])
    assert ivs.tolist() == [[0, 3], [5, 12], [15, 16]]
    assert sparse.expand(ivs).tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 15]
    table = sparse.pieces([[(0, 4)], [(4, 10)], [(10, 16)]])
    reqs, counts = sparse.requests(ivs, table, 1, 3)
    assert reqs.tolist() == [[0, 3], [10, 12], [15, 16]] and counts.tolist() == [1, 0, 2]
    # zigzag: rank 0 holds [0, 4) and [12, 16); requests come owner by owner, each in order
    table = sparse.pieces([[(0, 4), (12, 16)], [(4, 8), (8, 12)]])
    assert table.tolist() == [[0, 4, 0, 0], [4, 8, 1, 0], [8, 12, 1, 4], [12, 16, 0, 4]]
    reqs, counts = sparse.requests(ivs, table, 1, 2)
    assert reqs.tolist() == [[0, 3], [15, 16]] and counts.tolist() == [2, 0]
    assert sparse.local_rows(np.array([[1, 3], [13, 15]]), table, 0).tolist() == [1, 2, 5, 6]
    with pytest.raises(RuntimeError, match="does not hold"):
        sparse.local_rows(np.array([[3, 5]]), table, 0)
    assert sparse.segments(np.array([3, 4, 5, 9, 10, 20])) == [(0, 3), (3, 5), (5, 6)]


@pytest.mark.parametrize("spec", ["window:9", "causal+window:30", "block:64", "dilated:3:5",
                                  "global:7+window:2", "causal+global:3+block:10", "causal"])
@pytest.mark.parametrize("lo, hi", [(0, 40), (300, 900), (950, 1000)])
def test_reach_holds_exactly_the_keys_the_rows_reach(spec, lo, hi):
    """For consecutive rows (a shard), the planned intervals are exactly the keys with an edge."""
    mask, n = parse(spec), 1000
    qpos = np.arange(lo, hi)
    wide = sparse.wide_rows(mask, qpos)
    if wide is not None:
        qpos = qpos[~wide]
    planned = np.zeros(n, dtype=bool)
    planned[sparse.expand(sparse.reach(mask, qpos, n))] = True
    dense = mask.allowed(qpos[:, None], np.arange(n)[None, :]).any(axis=0)
    assert (planned == dense).all()


def test_wide_rows_are_the_ones_reaching_everything():
    assert sparse.wide_rows(parse("window:3"), np.arange(5)) is None
    assert sparse.wide_rows(parse("causal+global:3"), np.arange(5)) is None
    assert sparse.wide_rows(parse("global:3+window:1"), np.arange(5)).tolist() == [1, 1, 1, 0, 0]
    assert sparse.wide_rows(parse("full"), np.arange(2)).all()


def test_auto_rule():
    n = 1 << 20
    assert pick(parse("causal"), 16, n, 4) == "tree"            # decode: few queries
    assert pick(parse("window:256"), n, n, 4) == "sparse"        # bounded reach
    assert pick(parse("window:256+global:8"), n, n, 4) == "sparse"
    assert pick(parse("causal"), n, n, 4) == "burst"              # unbounded reach
    assert pick(parse("window:300000"), n, n, 4) == "burst"       # reach wider than a shard
    assert pick(parse("window:256"), n, n, 1) == "ring"           # one rank: nothing travels
    assert reach_width(parse("block:64+dilated:2:3")) == 64 and reach_width(parse("full")) is None
    assert pick(parse("full"), n // 32 + 1, n, 4) == "burst" and pick(parse("full"), n // 32, n, 4) == "tree"


def test_auto_backward_takes_ring_when_burst_would_move_more():
    """Backward: burst moves the query side (G heads per kv head), ring the key side."""
    n = 1 << 14
    mha, gqa = (1, 4, 1, 64, 4, 4), (1, 2, 4, 64, 4, 4)   # B, Hkv, G, D, q_size, kv_size
    ring_b, burst_b = backward_bytes(n, n, 4, *mha)
    assert ring_b == 3 * 4 * n * 64 * 16 and burst_b == 3 * (4 * n * (64 * 12 + 8) + 8 * n)
    assert round(burst_b / ring_b, 3) == 0.760
    ring_b, burst_b = backward_bytes(n, n, 4, *gqa)
    assert round(burst_b / ring_b, 3) == 3.035                  # the 3.035 ratio in BENCHMARKS.md
    assert pick(parse("causal"), n, n, 4, mha) == "burst"
    assert pick(parse("causal"), n, n, 4, gqa) == "ring"
    assert pick(parse("causal"), n, n, 4, (1, 2, 2, 64, 2, 2)) == "ring"    # G = 2: 1.5x
    assert pick(parse("causal"), n, 8 * n, 4, (1, 1, 4, 64, 4, 4)) == "burst"  # fewer queries
    assert pick(parse("causal"), 16, n, 4, gqa) == "tree"      # unchanged: decode, sparse, one rank
    assert pick(parse("window:256"), n, n, 4, gqa) == "sparse"
    assert pick(parse("causal"), n, n, 1, gqa) == "ring"


@pytest.mark.parametrize("P, parts, incoming", [(1, 0, 0), (2, 1, 0), (3, 2, 1), (5, 2, 1)])
def test_relay_allocates_only_the_buffers_its_hops_use(P, parts, incoming):
    """P - 1 relay steps: two parts alternate (one when there is one step); the receive of the
    previous holder's sum exists from three ranks on (steps 2 .. P-1) and takes the home
    receive too."""
    relay = Relay(None, RingPlan(0, [0] * P), lambda owner: [(1, 2, 8 + owner, 4)] * 2)
    assert (relay._parts.copies, relay._incoming.copies) == (parts, incoming)
