"""The one-pass Hopper backward (gpu.backward's kernel_kind "fused": kernels/attend_bwd_fused.cu,
dq from the key-major pass, key blocks adding into each dq tile in ascending order; "fused-bulk":
its form adding by bulk reductions into dq tiles; "fused-fixed": into fixed-point dq tiles, in
any order) against float64 over two key blocks, as a ring's hops add them, and rerun bit for
bit. Its own file, so that a kernel that stops (its waits trap after 10 minutes) does not take
the main GPU suite with it. Skips (saying why) without CuPy, a CUDA device or Hopper."""
import math

import numpy as np
import pytest

from gpu_helpers import bf16_bits, cupy_or_skip, full_backward, grad_err

cp = cupy_or_skip()

from hpcattn.gpu import backward  # noqa: E402
from hpcattn.gpu.forward import row_strides  # noqa: E402
from hpcattn.masks import parse  # noqa: E402
from test_gpu_kernels import BWD_TOL, in_dtype, inputs, need, one, two_block_backward  # noqa: E402


@pytest.mark.parametrize("kind", backward.FUSED)
@pytest.mark.parametrize("spec", ["window:40", "causal", "causal+window:70", "block:50", "global:3+window:20",
                                  "dilated:3:5", "full"])
@pytest.mark.parametrize("Hkv,G,nq,nk,D,dtype,order", [(2, 1, 300, 333, 64, "float16", "none"),
                                                       (1, 2, 190, 530, 128, "bfloat16", "gaps"),
                                                       (2, 2, 333, 150, 64, "bfloat16", "shuffled"),
                                                       (1, 4, 130, 130, 64, "float16", "none"),
                                                       (2, 1, 260, 700, 128, "float16", "gaps")])
def test_fused_hopper_backward_matches_float64_and_reruns_bit_for_bit(rng, kind, spec, Hkv, G, nq, nk, D, dtype,
                                                                       order):
    """Queries at 0 .. nq - 1, at sorted positions with gaps, or shuffled (every tile walked);
    keys past the queries' reach (key blocks and tiles with no edge); edges exact; a rerun bit
    for bit."""
    need("wgmma")
    mask = parse(spec)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, Hkv, G, nq, D), (1, Hkv, nk, D), dtype)
    doh, dod = one(rng, (1, Hkv, G, nq, D), dtype)
    qpos = np.arange(nq) if order == "none" else np.sort(rng.choice(max(nq, nk) + 100, nq, replace=False))
    qpos = (rng.permutation(qpos) if order == "shuffled" else qpos).astype(np.int64)
    scale = 1 / math.sqrt(D)
    o, lse, delta, dq, dk, dv, (mag_q, mag_k) = full_backward(qh, kh, vh, doh, qpos, mask, scale)
    got = two_block_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, dtype, kind, nk // 3)
    for name, g, ref, mag in zip(("dq", "dk", "dv"), got, (dq, dk, dv), (mag_q, mag_k, abs(dv))):
        assert np.isfinite(g).all() and grad_err(g, ref, mag) <= BWD_TOL["wgmma", dtype], (name, grad_err(g, ref, mag))
    assert got[3] == int(mask.allowed(qpos[:, None], np.arange(nk)[None, :]).sum())
    again = two_block_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, dtype, kind, nk // 3)
    assert all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(got[:3], again[:3]))


@pytest.mark.parametrize("kind", ["wgmma", "fused-fixed"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_small_rows_beside_large_ones_keep_their_own_accuracy(rng, kind, dtype):
    """dO rows 2^10 apart in size, alternating within every 64-row tile: each row's dq within the
    tolerance of its own size (fused-fixed's units follow each row's bound)."""
    need("wgmma")
    nq = nk = 300
    Hkv, G, D, mask, scale = 2, 2, 128, parse("causal"), 1 / math.sqrt(128)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, Hkv, G, nq, D), (1, Hkv, nk, D), dtype)
    a = rng.standard_normal((1, Hkv, G, nq, D)).astype(np.float32)
    doh, dod = in_dtype(a * np.where(np.arange(nq) % 2, np.float32(2.0 ** -10), np.float32(1))[:, None], dtype)
    qpos = np.arange(nq, dtype=np.int64)
    o, lse, delta, dq, dk, dv, (mag_q, _) = full_backward(qh, kh, vh, doh, qpos, mask, scale)
    got = two_block_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, dtype, kind, nk // 3)[0]
    for i in (0, 1):  # the large rows, the small ones
        rows = np.s_[..., i::2, :]
        assert grad_err(got[rows], dq[rows], mag_q[rows]) <= BWD_TOL["wgmma", dtype], (i, kind)


@pytest.mark.parametrize("kind", ["wgmma", "fused-fixed"])
def test_long_rows_keep_their_accuracy(rng, kind):
    """Causal N = 4096, float16: the later rows' dq (thousands of keys, much cancellation) as
    close to float64 as the two passes' float32 sums bring them (median of each row's largest
    error over its largest |dq|: 2.1e-4 in a float64 emulation of the float32 sums, the fixed
    form's alike). fused-fixed's bound on a row's dq is loose by about sqrt(N) there, so units of
    2^-21 of it (9997d5b's) gave 2.6-2.9e-3 in that emulation."""
    need("wgmma")
    N, D, mask, scale = 4096, 128, parse("causal"), 1 / math.sqrt(128)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, 1, 1, N, D), (1, 1, N, D), "float16")
    doh, dod = one(rng, (1, 1, 1, N, D), "float16")
    qpos = np.arange(N, dtype=np.int64)
    o, lse, delta, dq, dk, dv, _ = full_backward(qh, kh, vh, doh, qpos, mask, scale)
    got = two_block_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, "float16", kind, N // 3)[0]
    ref = dq[0, 0, 0, N // 2:]
    rows = np.abs(got[0, 0, 0, N // 2:] - ref).max(-1) / np.abs(ref).max(-1)
    assert np.median(rows) <= 6e-4, np.median(rows)


def scales_problem(rng, B, Hkv, G, nq, nk, D, spread):
    """k, v, do (float64) with row and key scales spread by `spread`, and float64's delta, dS."""
    q = rng.standard_normal((B, Hkv, G, nq, D)) * rng.uniform(1, spread, (B, Hkv, G, nq, 1))
    k, v = (rng.standard_normal((B, Hkv, nk, D)) * rng.uniform(1 / spread, 1, (B, Hkv, nk, 1)) for _ in range(2))
    do = rng.standard_normal((B, Hkv, G, nq, D)) * rng.uniform(1 / spread, 1, (B, Hkv, G, nq, 1))
    s = np.einsum("bhgqd,bhkd->bhgqk", q, k) / math.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    delta = (do * np.einsum("bhgqk,bhkd->bhgqd", p, v)).sum(-1)
    return k, v, do, delta, p * (np.einsum("bhgqd,bhkd->bhgqk", do, v) - delta[..., None])


def device_scales(k, v, do, delta, scale, dtype):
    """RowScales on the device copies of k, v and do in `dtype` (dO in the caller's (B, N, H, D)
    layout, read strided; bfloat16 as its bit patterns), and the values it read, in float64."""
    B, Hkv, G, nq, D = do.shape
    if dtype == "bfloat16":
        (kb, k), (vb, v), (db, d) = (bf16_bits(x) for x in (k, v, do.transpose(0, 3, 1, 2, 4)))
        kd, vd, dd = (cp.asarray(x) for x in (kb, vb, db))
    else:
        k, v, d = (x.astype(np.float16) for x in (k, v, do.transpose(0, 3, 1, 2, 4)))
        kd, vd, dd = (cp.asarray(x) for x in (k, v, d))
    ctype = "__nv_bfloat16" if dtype == "bfloat16" else "__half"
    dd = dd.transpose(0, 2, 3, 1, 4)
    t = backward.RowScales(ctype, do.shape, k.shape[2], row_strides(dd), row_strides(kd), scale)(
        kd, vd, dd, cp.asarray(delta, dtype=cp.float32))
    return t.get(), [x.astype(np.float64) for x in (k, v, d.transpose(0, 2, 3, 1, 4))]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("B,Hkv,G,nq,nk,D,spread,tight", [(1, 2, 2, 150, 300, 64, 50, True),
                                                          (2, 1, 3, 64, 97, 128, 4, True),
                                                          (2, 2, 1, 200, 1000, 64, 3, True),
                                                          (1, 1, 1, 1, 5, 64, 1000, False)])
def test_row_scales_bound_every_partial_dq_sum_by_the_fixed_point_range(B, Hkv, G, nq, nk, D, spread, tight,
                                                                         dtype):
    """"fused-fixed"'s scales (gpu.backward.RowScales: two kernels reading K, V and dO in
    place) for each query row: a power of two, the largest under which its row's bound stays
    within 2^30 (as float64 finds it; 1 for the rows that pad the last 64-row tile), and no
    partial sum of its dq (any range of keys, as a ring's key block sees them) beyond 2^30 in
    float64. tight: some row's whole dq also reaches 2^18 units (a saturated softmax, the last case, has a dq far below any bound of this kind: there
    the units are absolute, not relative, accuracy)."""
    rng = np.random.default_rng(nq + nk)
    k, v, do, delta, ds = scales_problem(rng, B, Hkv, G, nq, nk, D, spread)
    scale = 1 / math.sqrt(D)
    t, (k, v, do) = device_scales(k, v, do, delta, scale, dtype)
    nt = -(-nq // 64)
    assert t.shape == (B * Hkv * G * nt * 64,) and t.dtype == np.float32
    b = scale * (np.linalg.norm(do, axis=-1) * np.linalg.norm(v, axis=-1).max(-1)[:, :, None, None]
                 + np.abs(delta.astype(np.float32))) * np.abs(k).max(axis=(2, 3))[:, :, None, None]
    want = np.ones((B, Hkv, G, nt * 64))
    want[..., :nq] = 2.0 ** np.floor(np.log2(2.0 ** 30 / b))
    assert np.array_equal(t, want.ravel())
    per_row = t.reshape(B, Hkv, G, nt * 64)[..., :nq]
    for lo, hi in ((0, nk), (0, nk // 3), (nk // 3, nk), (nk // 2, nk // 2 + 1)):
        dq = scale * np.einsum("bhgqk,bhkd->bhgqd", ds[..., lo:hi], k[:, :, lo:hi])
        assert (np.abs(dq).max(-1) * per_row).max() <= 2.0 ** 30
    whole = scale * np.einsum("bhgqk,bhkd->bhgqd", ds, k)
    assert (np.abs(whole).max(-1) * per_row).max() >= 2.0 ** 18 or not tight
