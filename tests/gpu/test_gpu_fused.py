"""The experimental one-pass Hopper backward (kernels/attend_bwd_fused.cu: dq from the key-major
pass, key blocks adding in order), not used by any entry point yet: against float64 and rerun
bit for bit. Its own file, so that a kernel that stops (its waits trap after 10 minutes) does not
take the main GPU suite with it. Skips (saying why) without CuPy, a CUDA device or Hopper."""
import math

import numpy as np
import pytest

from gpu_helpers import cupy_or_skip, full_backward, grad_err

cp = cupy_or_skip()

from hpcattn.gpu import forward, loader, shapes  # noqa: E402
from hpcattn.masks import parse  # noqa: E402
from test_gpu_kernels import BWD_TOL, inputs, need, one  # noqa: E402


def fused_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, dtype):
    """attend_bwd_fused_wg (ORDERED, float32 sums) over all keys, launched as attend_bwd_kv_wg is:
    (dq, dk, dv) on the host and query head 0's edges."""
    from hpcattn.gpu.encode import device_mask, device_positions
    B, Hkv, G, nq, D = qd.shape
    nk = kd.shape[2]
    ct = shapes.CTYPES[dtype]
    dpos, unsorted = device_positions(qpos), cp.zeros(1, dtype=cp.int32)
    loader.launch("rows_unsorted", (min(1024, -(-nq // 256)),), 0, (dpos, np.int32(nq), unsorted), threads=256)
    dq, edges = cp.zeros(qd.shape, cp.float32), cp.zeros(1, dtype=cp.uint64)
    dk, dv = cp.zeros(kd.shape, cp.float32), cp.zeros(kd.shape, cp.float32)
    turns = cp.zeros(B * Hkv * G * -(-nq // 64) * (D // 64), cp.int32)
    shape = shapes.BWD_FUSED_SHAPES[D]
    tail = (np.int32(nq), np.int32(nk), np.int32(G), np.int64(0), np.float32(scale), np.int64(0))
    tail += tuple(np.int64(x) for x in (*forward.row_strides(qd), *forward.row_strides(kd))) + (np.int32(Hkv * G),)
    loader.launch(shapes.bwd_fused_name(ct, D, "float", True), (-(-nk // (64 * shape[0])), B * Hkv),
                  shapes.bwd_fused_smem(D),
                  (qd, dpos, kd, vd, dod, cp.asarray(lse, dtype=cp.float32), cp.asarray(delta, dtype=cp.float32),
                   dk, dv, dq, edges, turns, device_mask(mask), unsorted) + tail,
                  threads=shapes.bwd_wg_threads(shape))
    return dq.get(), dk.get(), dv.get(), int(edges.get()[0])


@pytest.mark.parametrize("spec", ["window:40", "causal", "causal+window:70", "block:50", "global:3+window:20",
                                  "dilated:3:5"])
@pytest.mark.parametrize("G,nq,nk,D,dtype,order", [(1, 300, 333, 64, "float16", "none"),
                                                   (2, 190, 530, 128, "bfloat16", "gaps"),
                                                   (2, 333, 150, 64, "bfloat16", "shuffled"),
                                                   (1, 260, 700, 128, "float16", "gaps")])
def test_fused_hopper_backward_matches_float64_and_reruns_bit_for_bit(rng, spec, G, nq, nk, D, dtype, order):
    """attend_bwd_fused_wg (dq from the key-major pass, key blocks adding in order) against
    float64 with queries at 0 .. nq - 1, sorted positions with gaps, or shuffled ones; edges
    exact, and a rerun bit for bit."""
    need("wgmma")
    mask = parse(spec)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, 2, G, nq, D), (1, 2, nk, D), dtype)
    doh, dod = one(rng, (1, 2, G, nq, D), dtype)
    qpos = np.arange(nq) if order == "none" else np.sort(rng.choice(nk + 100, nq, replace=False))
    qpos = (rng.permutation(qpos) if order == "shuffled" else qpos).astype(np.int64)
    scale = 1 / math.sqrt(D)
    o, lse, delta, dq, dk, dv, (mag_q, mag_k) = full_backward(qh, kh, vh, doh, qpos, mask, scale)
    got = fused_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, dtype)
    for name, g, ref, mag in zip(("dq", "dk", "dv"), got, (dq, dk, dv), (mag_q, mag_k, abs(dv))):
        assert np.isfinite(g).all() and grad_err(g, ref, mag) <= BWD_TOL["wgmma", dtype], (name, grad_err(g, ref, mag))
    assert got[3] == int(mask.allowed(qpos[:, None], np.arange(nk)[None, :]).sum())
    again = fused_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, dtype)
    assert all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(got[:3], again[:3]))
