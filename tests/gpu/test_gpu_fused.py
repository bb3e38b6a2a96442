"""The one-pass Hopper backward (gpu.backward's kernel_kind "fused": kernels/attend_bwd_fused.cu,
dq from the key-major pass, key blocks adding into each dq tile in ascending order; "fused-bulk":
its form adding by bulk reductions into dq tiles; "fused-fixed": into fixed-point dq tiles, in
any order) against float64 over two key blocks, as a ring's hops add them, and rerun bit for
bit. Its own file, so that a kernel that stops (its waits trap after 10 minutes) does not take
the main GPU suite with it. Skips (saying why) without CuPy, a CUDA device or Hopper."""
import math

import numpy as np
import pytest

from gpu_helpers import cupy_or_skip, full_backward, grad_err

cp = cupy_or_skip()

from hpcattn.gpu import backward  # noqa: E402
from hpcattn.masks import parse  # noqa: E402
from test_gpu_kernels import BWD_TOL, inputs, need, one, two_block_backward  # noqa: E402


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
