"""The fixed-point scales of the one-pass backward's "fused-fixed" dq tiles (gpu.backward's
tile_scales, NumPy standing in for CuPy): for each 64-row tile the largest power of two under
which its rows' bound stays within 2^29, no partial sum of its dq (any range of keys, as a ring's
key block sees them) beyond 2^29 in float64, and bfloat16 read from its bit patterns as its
values."""
import math

import ml_dtypes
import numpy as np
import pytest

from hpcattn.gpu import backward


@pytest.fixture
def scales(monkeypatch):
    monkeypatch.setattr(backward, "cupy", lambda: np)
    return backward.tile_scales


def problem(rng, B, Hkv, G, nq, nk, D, spread):
    """q, k, v, do with row and key scales spread by `spread`, and float64's P, delta, dS."""
    q = rng.standard_normal((B, Hkv, G, nq, D)) * rng.uniform(1, spread, (B, Hkv, G, nq, 1))
    k, v = (rng.standard_normal((B, Hkv, nk, D)) * rng.uniform(1 / spread, 1, (B, Hkv, nk, 1)) for _ in range(2))
    do = rng.standard_normal((B, Hkv, G, nq, D)) * rng.uniform(1 / spread, 1, (B, Hkv, G, nq, 1))
    scale = 1 / math.sqrt(D)
    s = np.einsum("bhgqd,bhkd->bhgqk", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    delta = (do * np.einsum("bhgqk,bhkd->bhgqd", p, v)).sum(-1)
    ds = p * (np.einsum("bhgqd,bhkd->bhgqk", do, v) - delta[..., None])
    return k, v, do, delta, ds, scale


@pytest.mark.parametrize("B,Hkv,G,nq,nk,D,spread,tight", [(1, 2, 2, 150, 300, 64, 50, True),
                                                          (2, 1, 3, 64, 97, 128, 4, True),
                                                          (1, 1, 1, 1, 5, 64, 1000, False)])
def test_no_partial_dq_sum_reaches_the_fixed_point_range(scales, B, Hkv, G, nq, nk, D, spread, tight):
    """tight: the whole dq also reaches 2^17 units (a saturated softmax, the last case, has a dq
    far below any bound of this kind: there the units are absolute, not relative, accuracy)."""
    rng = np.random.default_rng(nq + nk)
    k, v, do, delta, ds, scale = problem(rng, B, Hkv, G, nq, nk, D, spread)
    k, v, do = (x.astype(np.float16) for x in (k, v, do))
    t = scales(k, v, do, delta.astype(np.float32), scale)
    nt = -(-nq // 64)
    assert t.shape == (B * Hkv * G * nt,) and t.dtype == np.float32
    mant, _ = np.frexp(t)
    assert (mant == 0.5).all()  # powers of two: dividing them out is exact
    per_row = np.repeat(t.reshape(B, Hkv, G, nt), 64, axis=-1)[..., :nq]
    # the largest power of two under which the rows' bound stays within 2^29
    k64, v64, do64 = (x.astype(np.float64) for x in (k, v, do))
    b = scale * (np.linalg.norm(do64, axis=-1) * np.linalg.norm(v64, axis=-1).max(-1)[:, :, None, None]
                 + np.abs(delta)) * np.abs(k64).max(axis=(2, 3))[:, :, None, None]
    tiles = np.zeros((B, Hkv, G, nt * 64))
    tiles[..., :nq] = b * per_row
    top = tiles.reshape(B, Hkv, G, nt, 64).max(-1)  # per tile (float32 sums there: 1e-5 of slack)
    assert (top <= 2.0 ** 29 * (1 + 1e-5)).all() and (top > 2.0 ** 28 * (1 - 1e-5)).all()
    for lo, hi in ((0, nk), (0, nk // 3), (nk // 3, nk), (nk // 2, nk // 2 + 1)):
        dq = scale * np.einsum("bhgqk,bhkd->bhgqd", ds[..., lo:hi], k[:, :, lo:hi])
        assert (np.abs(dq).max(-1) * per_row).max() <= 2.0 ** 29
    whole = scale * np.einsum("bhgqk,bhkd->bhgqd", ds, k)
    assert (np.abs(whole).max(-1) * per_row).max() >= 2.0 ** 17 or not tight


def test_bfloat16_bit_patterns_give_the_scales_of_their_values(scales):
    rng = np.random.default_rng(3)
    k, v, do, delta, _, scale = problem(rng, 1, 2, 2, 100, 130, 64, 10)
    bf = [x.astype(ml_dtypes.bfloat16) for x in (k, v, do)]
    want = scales(*(x.astype(np.float32) for x in bf), delta.astype(np.float32), scale)
    assert np.array_equal(scales(*(x.view(np.uint16) for x in bf), delta.astype(np.float32), scale), want)
