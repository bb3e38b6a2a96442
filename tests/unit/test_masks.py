import numpy as np
import pytest

from hpcattn.errors import HpcattnError
from hpcattn.masks import parse
from helpers import naive_mask as naive_graph


def naive(spec, i, j):
    """Straight from the table in DESIGN.md section 3, one pair at a time (implicit terms)."""
    return naive_graph(spec, i, j, None, None)


SPECS = ["full", "causal", "window:0", "window:5", "causal+window:5", "dilated:3:4", "block:7",
         "global:3", "window:4+global:2", "causal+global:3", "causal+block:5+window:2",
         "dilated:2:3+causal", "block:1"]


@pytest.mark.parametrize("spec", SPECS)
def test_allowed_matches_the_definition(spec):
    n = 40
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    want = np.array([[naive(spec, a, b) for b in range(n)] for a in range(n)])
    assert (parse(spec).allowed(i, j) == want).all()


@pytest.mark.parametrize("spec", SPECS)
def test_spans_hold_every_edge_of_the_tile(spec):
    mask, n, rng = parse(spec), 60, np.random.default_rng(0)
    for _ in range(50):
        qlo = int(rng.integers(0, n))
        qhi = int(rng.integers(qlo, n))
        k0 = int(rng.integers(0, n))
        k1 = int(rng.integers(k0, n + 1))
        spans = mask.spans(qlo, qhi, k0, k1)
        inside = np.zeros(n, bool)
        for a, b in spans:
            assert k0 <= a < b <= k1
            inside[a:b] = True
        assert all(x[1] < y[0] for x, y in zip(spans, spans[1:])), "spans must be sorted, disjoint"
        i, j = np.meshgrid(np.arange(qlo, qhi + 1), np.arange(k0, k1), indexing="ij")
        reached = mask.allowed(i, j).any(axis=0)
        assert not (reached & ~inside[k0:k1]).any()


@pytest.mark.parametrize("bad, words", [
    ("", "empty"), ("windw:256", "unknown term 'windw:256'"), ("window", "takes 1"),
    ("window:abc", "integers"), ("window:-1", "window:-1"), ("dilated:4:0", "dilated:4:0"),
    ("block:0", "block:0"), ("window:256+", "unknown term ''"), ("causal:1", "unknown term"),
    ("window:99999999999999999999999", "2**62")])
def test_bad_specs_name_the_problem(bad, words):
    with pytest.raises(HpcattnError, match=None) as e:
        parse(bad)
    assert words in str(e.value)


def test_causal_alone_is_lower_triangle_and_dense_only_for_full():
    assert parse("causal").allowed(3, 4) == False  # noqa: E712
    assert parse("full").dense and not parse("causal").dense and not parse("window:3").dense
