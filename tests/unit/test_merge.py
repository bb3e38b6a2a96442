import numpy as np

from hpcattn.merge import empty_state, merge


def partial(s, v):
    m = s.max(axis=-1)
    p = np.exp(s - m[..., None])
    return (p @ v) / p.sum(-1)[..., None], m + np.log(p.sum(-1))


def test_merge_of_two_halves_equals_softmax_over_all(rng):
    s = rng.standard_normal((3, 10)) * 5
    v = rng.standard_normal((10, 4))
    o, lse = merge(*partial(s[:, :4], v[:4]), *partial(s[:, 4:], v[4:]))
    o_all, lse_all = partial(s, v)
    np.testing.assert_allclose(o, o_all, rtol=1e-12)
    np.testing.assert_allclose(lse, lse_all, rtol=1e-12)


def test_merge_is_commutative_and_associative(rng):
    parts = [partial(rng.standard_normal((2, 5)), rng.standard_normal((5, 3))) for _ in range(3)]
    a, b, c = parts
    left = merge(*merge(*a, *b), *c)
    right = merge(*a, *merge(*b, *c))
    swapped = merge(*merge(*b, *a), *c)
    for x, y in ((left, right), (left, swapped)):
        np.testing.assert_allclose(x[0], y[0], rtol=1e-12)
        np.testing.assert_allclose(x[1], y[1], rtol=1e-12)


def test_empty_with_empty_gives_zero_and_minus_inf_without_nan():
    o, lse = empty_state(np, (2, 3), 4)
    with np.errstate(all="raise"):
        mo, ml = merge(o, lse, o, lse)
    assert (mo == 0).all() and np.isneginf(ml).all()


def test_empty_is_the_identity(rng):
    o, lse = partial(rng.standard_normal((4, 6)), rng.standard_normal((6, 2)))
    eo, el = empty_state(np, (4,), 2)
    mo, ml = merge(eo, el, o.astype(np.float32), lse.astype(np.float32))
    np.testing.assert_allclose(mo, o, rtol=1e-6)
    np.testing.assert_allclose(ml, lse, rtol=1e-6)
