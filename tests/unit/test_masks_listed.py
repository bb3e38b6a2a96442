"""Mask terms random and csr, Mask.columns, CSR validation."""
import numpy as np
import pytest

from hpcattn.errors import HpcattnError
from helpers import naive_mask as naive, naive_random
from hpcattn.masks import check_csr, parse, random_keys

def random_csr(rng, n, density):
    dense = rng.random((n, n)) < density
    return dense, check_csr(np.concatenate([[0], np.cumsum(dense.sum(1))]), np.nonzero(dense)[1], n, 0, n)


SPECS = ["random:3", "random:4:99", "random:50:1", "csr", "causal+random:5:2", "causal+csr",
         "window:2+global:2+random:3:7", "csr+window:1", "dilated:2:3+random:2+csr",
         "block:5+causal+random:1", "random:0", "window:3", "global:2+causal"]


@pytest.mark.parametrize("spec", SPECS)
def test_allowed_and_columns_match_the_definition(spec):
    n = 37
    dense, csr = random_csr(np.random.default_rng(3), n, 0.1)
    mask = parse(spec, n_keys=n, csr=csr)
    want = np.array([[naive(spec, a, b, n, dense) for b in range(n)] for a in range(n)])
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    assert (mask.allowed(i, j) == want).all()
    for k0, k1 in ((0, n), (5, 23), (30, 31), (10, 10)):
        qpos = np.array([36, 0, 7, 7, 20])  # any order, repeats allowed
        indptr, cols = mask.columns(qpos, k0, k1)
        assert indptr.dtype == np.int64 and cols.dtype == np.int64 and len(indptr) == len(qpos) + 1
        for r, p in enumerate(qpos):
            assert (cols[indptr[r]:indptr[r + 1]] == np.flatnonzero(want[p, k0:k1]) + k0).all()


@pytest.mark.parametrize("spec", SPECS)
def test_spans_hold_every_edge(spec):
    n = 37
    _, csr = random_csr(np.random.default_rng(4), n, 0.2)
    mask = parse(spec, n_keys=n, csr=csr)
    for qlo, qhi, k0, k1 in ((0, 36, 0, 37), (3, 9, 2, 30), (20, 20, 0, 37)):
        inside = np.zeros(n, bool)
        for a, b in mask.spans(qlo, qhi, k0, k1):
            inside[a:b] = True
        i, j = np.meshgrid(np.arange(qlo, qhi + 1), np.arange(k0, k1), indexing="ij")
        assert not (mask.allowed(i, j).any(axis=0) & ~inside[k0:k1]).any()


def test_random_keys_follow_the_documented_algorithm_exactly():
    for seed, r, n in ((0, 8, 1000), (12345, 5, 7), (2**63 + 5, 3, 2**40), (1, 10, 10), (1, 20, 10)):
        rows = np.array([0, 1, 2, 999, 2**31 + 7])
        got = random_keys(seed, rows, r, n)
        assert [list(x) for x in got] == [naive_random(seed, int(i), r, n) for i in rows]


def test_random_is_independent_of_how_rows_and_keys_are_split():
    n, r = 5000, 16
    mask = parse("random:16:42", n_keys=n)
    whole_ptr, whole = mask.columns(np.arange(n), 0, n)
    assert (np.diff(whole_ptr) == r).all()
    rows = whole.reshape(n, r)
    assert (np.diff(rows, axis=1) > 0).all() and rows.min() >= 0 and rows.max() < n
    for parts in (2, 3, 7):  # rows and keys cut as P ranks would cut them
        cuts = np.linspace(0, n, parts + 1).astype(int)
        pieces = [[mask.columns(np.arange(a, b), c, d) for c, d in zip(cuts[:-1], cuts[1:])]
                  for a, b in zip(cuts[:-1], cuts[1:])]
        for (a, b), row_pieces in zip(zip(cuts[:-1], cuts[1:]), pieces):
            joined = [np.concatenate([ix[ip[t]:ip[t + 1]] for ip, ix in row_pieces]) for t in range(b - a)]
            assert all((x == y).all() for x, y in zip(joined, rows[a:b]))
    # roughly uniform: every decile of [0, n) gets about a tenth of the draws
    counts = np.bincount(whole * 10 // n, minlength=10)
    assert (abs(counts - n * r / 10) < 0.05 * n * r / 10).all()
    assert not (parse("random:16:43", n_keys=n).columns(np.arange(n), 0, n)[1] == whole).all()


@pytest.mark.parametrize("indptr, indices, words", [
    ([0, 2, 3], [1, 0, 2], "unsorted column 0 in row 0"),
    ([0, 2, 4], [0, 1, 2, 2], "duplicate column 2 in row 1"),
    ([0, 1, 2], [0, 3], "out of range: 3 in row 1"),
    ([0, 1, 2], [-1, 0], "out of range: -1 in row 0"),
    ([0, 2, 1], [0, 1], "never decrease"),
    ([1, 2, 3], [0, 1], "start at 0"),
    ([0, 1, 3], [0, 1], "ends at 3"),
    ([0, 1], [0], "must have 3 entries"),
    (np.array([0.0, 1, 2]), [0, 1], "integers"),
    ([0, 1, 2], np.array([0.5, 1]), "integers"),
    ([[0, 1, 2]], [0, 1], "1-D")])
def test_csr_validation_names_the_problem(indptr, indices, words):
    with pytest.raises(HpcattnError, match=words.replace("(", r"\(")):
        check_csr(indptr, indices, 3, 0, 2)


def test_csr_rows_of_a_slice_and_row_bounds():
    _, full = random_csr(np.random.default_rng(5), 20, 0.3)
    lo, hi = 6, 11
    part = check_csr(full.indptr[lo:hi + 2], full.indices[full.indptr[lo]:full.indptr[hi + 1]], 20, row0=lo)
    a, b = parse("csr", csr=full), parse("csr", csr=part)
    qpos = np.arange(lo, hi + 1)
    assert all((x == y).all() for x, y in zip(a.columns(qpos, 0, 20), b.columns(qpos, 0, 20)))
    with pytest.raises(HpcattnError, match="holds rows 6..11"):
        b.columns(np.array([12]), 0, 20)


def test_unbound_terms_and_bad_specs_say_what_is_missing():
    with pytest.raises(HpcattnError, match="number of keys"):
        parse("random:3").allowed(1, 2)
    with pytest.raises(HpcattnError, match="explicit edges"):
        parse("csr").columns(np.arange(3), 0, 3)
    assert parse("window:3+random:2+csr").needs == {"n_keys", "csr"}
    assert parse("window:3+random:2", n_keys=9).needs == set()
    for bad, words in (("random", "takes 1 or 2"), ("random:1:2:3", "takes 1 or 2"), ("csr:4", "takes 0"),
                       ("random:-1", "random:-1"), ("random:x", "integers")):
        with pytest.raises(HpcattnError, match=words):
            parse(bad)
