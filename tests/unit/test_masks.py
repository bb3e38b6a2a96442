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


# The term protocol (masks.Term): what each term answers about itself, and the mask's aggregates.

@pytest.mark.parametrize("spec, reach, width, g, listed, gathered, band, dense, words", [
    ("full", None, None, 0, False, False, None, True, (0, 0, 0)),
    ("window:5", 5, 11, 0, False, False, 5, False, (1, 5, 0)),
    ("dilated:4:3", 12, 25, 0, False, True, None, False, (2, 12, 3)),
    ("block:16", 16, 16, 0, False, False, None, False, (3, 16, 0)),
    ("global:3", 0, 0, 3, False, False, None, False, (4, 3, 0)),
    ("random:4:7", None, None, 0, True, True, None, False, None),
    ("csr", None, None, 0, True, True, None, False, None)])
def test_each_term_answers_for_itself(spec, reach, width, g, listed, gathered, band, dense, words):
    (t,) = parse(spec).terms
    assert (t.reach(), t.width(), t.global_rows()) == (reach, width, g)
    assert (t.listed, t.gathered, t.band, t.dense) == (listed, gathered, band, dense)
    assert t.device_words() == words
    assert t.listed == hasattr(t, "columns")  # listed terms give their columns, the others progressions
    assert t.listed or hasattr(t, "progressions")


def test_terms_name_the_data_they_need_and_bind_it():
    from hpcattn.masks import check_csr
    m = parse("window:3+random:2+csr")
    assert [t.needs() for t in m.terms] == [set(), {"n_keys"}, {"csr"}]
    csr = check_csr([0, 1], [0], 1)
    bound = m.bind(n_keys=9, csr=csr)
    assert bound.needs == set() and bound.terms[1].n == 9 and bound.terms[2].data is csr
    assert bound.terms[0] is m.terms[0]


@pytest.mark.parametrize("spec, reach, g", [
    ("window:5+global:3", 5, 3), ("causal+dilated:2:3+block:4", 6, 0), ("global:2+global:7", 0, 7),
    ("causal", None, 0), ("window:3+random:2", None, 0), ("full+global:2", None, 2)])
def test_mask_aggregates_reach_and_global_rows(spec, reach, g):
    m = parse(spec)
    assert (m.reach(), m.global_rows()) == (reach, g)
    assert m.row_breaks() == sorted({t.global_rows() for t in m.terms} - {0})


def test_subset_takes_a_predicate_or_term_classes():
    from hpcattn.masks import Random
    m = parse("causal+window:3+random:2+dilated:1:2")
    assert m.subset(lambda t: t.listed).terms == m.subset(Random).terms == (m.terms[1],)
    assert m.subset(lambda t: t.gathered, exclude=True).terms == (m.terms[0],)
    assert m.subset(lambda t: t.dense) is None and m.subset(Random).causal


def test_only_random_columns_are_drawn_on_the_device():
    assert [t.drawn for t in parse("random:2+csr+window:1+dilated:1:2").terms] == [True, False, False, False]


class _Tensor(np.ndarray):
    def abs(self):
        return np.abs(self)


class _NumpyTorch:
    """The part of torch that flex_mod uses, on NumPy (torch is not needed for the tests)."""
    from_numpy = staticmethod(lambda a: np.asarray(a).view(_Tensor))


def test_flex_mods_are_the_edges():
    from hpcattn.commands.bench import _mask_mod
    n, torch = 24, _NumpyTorch
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    qi, kj = torch.from_numpy(i.reshape(-1)), torch.from_numpy(j.reshape(-1))
    for spec in ["full", "causal+window:2", "dilated:2:3+block:5", "global:2", "random:3:1", "causal"]:
        mask = parse(spec, n_keys=n)
        got = np.asarray(_mask_mod(mask, n, torch)(0, 0, qi, kj)).reshape(n, n)
        assert (got == mask.allowed(i, j)).all(), spec
    assert _mask_mod(parse("csr"), n, torch) is None


from dataclasses import dataclass  # noqa: E402

from hpcattn.masks import Mask, Term  # noqa: E402


@dataclass(frozen=True)
class Lag(Term):
    """A toy term defined here only: key i - k for query i (one diagonal below the main one)."""
    k: int

    def allowed(self, i, j):
        return j == i - self.k

    def spans(self, qlo, qhi):
        return [(qlo - self.k, qhi - self.k + 1)]

    def progressions(self, i):
        return [(i - self.k, i - self.k + 1, 1)]

    def reach(self):
        return self.k

    def width(self):
        return 1


def test_a_new_term_class_works_without_editing_other_modules(rng):
    from hpcattn.api import to_heads
    from hpcattn.commands.bench import _mask_mod
    from hpcattn.cpu import local
    from hpcattn.dist.variants import pick, reach_width, sparse
    from hpcattn.gpu import encode
    from hpcattn.io import outofcore
    from hpcattn.reference import errors, reference
    mask = Mask("lag:5+global:2", [Lag(5), parse("global:2").terms[0]], False)
    assert (mask.reach(), mask.global_rows(), mask.row_breaks()) == (5, 2, [2])
    assert outofcore.bounded(mask) and outofcore.halo(mask) == 5 and outofcore.global_rows(mask) == 2
    assert reach_width(mask) == 1 and pick(mask, 4000, 4000, 4) == "sparse"
    assert sparse.wide_rows(mask, np.arange(4)).tolist() == [True, True, False, False]
    assert sparse.reach(mask, np.arange(100, 110), 1000).tolist() == [[0, 2], [95, 105]]
    assert _mask_mod(mask, 8, None) is None  # no flex form declared: bench says so
    with pytest.raises(HpcattnError, match="no GPU kernel"):
        encode.mask_words(mask)
    plan = local.Plan(mask)  # a plain implicit term: the tiles piece
    assert plan.band is None and plan.gather is None and plan.tiles.terms == mask.terms
    n, D = 300, 8
    q, k, v = (rng.standard_normal((1, n, 1, D)).astype(np.float32) for _ in range(3))
    o, lse, edges = local.attend(to_heads(q, 1), np.arange(n), to_heads(k, 1)[:, :, 0],
                                 to_heads(v, 1)[:, :, 0], 0, mask, 0.3)
    o_ref, lse_ref = reference(q, k, v, np.arange(n), mask, 0.3)
    o_err, lse_err, empty_ok = errors(o.transpose(0, 3, 1, 2, 4).reshape(q.shape), lse.reshape(1, 1, n),
                                      o_ref, lse_ref)
    assert empty_ok and o_err < 1e-4 and lse_err < 1e-4
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    assert edges == mask.allowed(i, j).sum()


def test_a_term_not_deriving_from_term_takes_the_defaults():
    import pickle

    class Edges:  # only the edge methods
        def allowed(self, i, j):
            return i == j

        def spans(self, qlo, qhi):
            return [(qlo, qhi + 1)]

    class Listed(Edges):
        def columns(self, qpos, k0, k1):
            return np.arange(len(qpos) + 1), np.asarray(qpos)

        def reach(self):
            return 0

    m = Mask("test", [Edges(), Listed()], False)
    plain, listed = m.terms
    assert (plain.reach(), plain.global_rows(), plain.listed, plain.gathered, plain.band) == (None, 0, False, False, None)
    assert (listed.reach(), listed.listed, listed.gathered, listed.device_words()) == (0, True, True, None)
    assert m.reach() is None and m.global_rows() == 0 and not m.dense and m.needs == set()
    assert m.allowed(np.arange(3), np.arange(3)).all() and repr(plain).startswith("<")
    assert m.subset(lambda t: t.listed).terms == (listed,) and Mask("t", m.terms, False).terms == m.terms
    with pytest.raises(AttributeError):
        plain.no_such_fact
    assert pickle.loads(pickle.dumps(Mask("test", [parse("window:2").terms[0]], True))).terms[0].w == 2
