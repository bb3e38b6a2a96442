"""The public API on CuPy arrays at one rank: the direct path (the tensor-core kernel reads the
caller's (B, N, H, D) arrays and writes o in their dtype), float16/bfloat16/float32, positions
derived on the device (no copy per call), and hpcattn.torch on CUDA tensors. Skips (saying why)
without CuPy or a CUDA device."""
import numpy as np
import pytest
from mpi4py import MPI

from gpu_helpers import cupy_or_skip

cp = cupy_or_skip()

import hpcattn  # noqa: E402
from hpcattn.gpu import backward as gpu_backward, encode  # noqa: E402
from hpcattn.masks import parse  # noqa: E402
from hpcattn.reference import errors, grad_error, grad_tolerance, reference, reference_backward, tolerance  # noqa: E402

import ml_dtypes  # noqa: E402,F401 (NumPy then knows "bfloat16")


def arrays(rng, shapes, dtype):
    host = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
    return host, [cp.asarray(h) for h in host]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("spec", ["window:256", "causal", "dilated:3:5+global:2", "block:64+causal", "full",
                                  "window:20+random:8"])
def test_attention_on_device_arrays_matches_float64(rng, spec, D, dtype):
    B, N, H, Hkv = 2, 1000, 4, 2
    (q, k, v), (qd, kd, vd) = arrays(rng, [(B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, D)], dtype)
    stats = {}
    o, lse = hpcattn.attention(qd, kd, vd, mask=spec, comm=MPI.COMM_SELF, stats=stats)
    assert isinstance(o, cp.ndarray) and o.dtype == qd.dtype and o.shape == q.shape and o.flags.c_contiguous
    assert lse.shape == (B, H, N) and lse.dtype == cp.float32
    mask = parse(spec).bind(n_keys=N) if "random" in spec else parse(spec)
    o_ref, lse_ref = reference(q, k, v, np.arange(N), mask, 1 / np.sqrt(D))
    o_err, lse_err, empty_ok = errors(o.get().astype(np.float32), lse.get(), o_ref, lse_ref)
    assert empty_ok and o_err <= tolerance(dtype)[0] and lse_err <= 1e-4, (o_err, lse_err)
    assert stats["edges"] == mask.allowed(np.arange(N)[:, None], np.arange(N)[None, :]).sum()


def test_positions_are_not_copied_to_the_device_per_call(rng, monkeypatch):
    """Default positions are derived on the device (never copied); a device q_positions array
    is checked and used in place once, then reused."""
    made = []
    real = encode.positions
    monkeypatch.setattr(encode, "positions", lambda p: (made.append(len(p)), real(p))[1])
    (_, k, v), (qd, kd, vd) = arrays(rng, [(1, 4096, 8, 64), (1, 4096, 8, 64), (1, 4096, 8, 64)], "float16")
    for _ in range(2):
        hpcattn.attention(qd, kd, vd, mask="window:256", comm=MPI.COMM_SELF)
    assert made == []
    qpos = cp.arange(4080, 4096, dtype=cp.int64)
    for _ in range(2):
        hpcattn.attention(qd[:, :16], kd, vd, mask="causal", comm=MPI.COMM_SELF, q_positions=qpos)
    assert made == [16]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_repeated_calls_reuse_one_launch(rng, monkeypatch, dtype):
    """A call with the shapes, strides and arguments of an earlier one takes that call's cached
    launch (no argument checks, no positions): the same bits as the first, and new values of
    the same shapes (or strided q of another shape, their own entry) still match float64."""
    from hpcattn import api
    (q, k, v), (qd, kd, vd) = arrays(rng, [(1, 2048, 8, 64), (1, 2048, 4, 64), (1, 2048, 4, 64)], dtype)
    api._launches.clear()
    first, again = {}, {}
    o1, lse1 = hpcattn.attention(qd, kd, vd, mask="window:100", comm=MPI.COMM_SELF, stats=first)
    assert len(api._launches) == 1
    checked, real = [], api._shard
    monkeypatch.setattr(api, "_shard", lambda *a, **kw: (checked.append(1), real(*a, **kw))[1])
    o2, lse2 = hpcattn.attention(qd, kd, vd, mask="window:100", comm=MPI.COMM_SELF, stats=again)
    assert checked == [] and len(api._launches) == 1
    assert (o1 == o2).all() and (lse1 == lse2).all() and o2.flags.c_contiguous and lse2.shape == (1, 8, 2048)
    assert again["edges"] == first["edges"] and again["variant"] == first["variant"]
    mask = parse("window:100")
    (q2, wide), (q2d, wided) = arrays(rng, [(1, 2048, 8, 64), (1, 2048, 16, 64)], dtype)
    for qh, qx in ((q2, q2d), (wide[:, :, 4:12], wided[:, :, 4:12])):  # new values; a strided view
        o, lse = hpcattn.attention(qx, kd, vd, mask="window:100", comm=MPI.COMM_SELF)
        o_ref, lse_ref = reference(qh, k, v, np.arange(2048), mask, 1 / 8)
        o_err, lse_err, empty_ok = errors(o.get().astype(np.float32), lse.get(), o_ref, lse_ref)
        assert empty_ok and o_err <= tolerance(dtype)[0] and lse_err <= 1e-4, (o_err, lse_err)
    assert checked == [1] and len(api._launches) == 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_repeated_backward_calls_reuse_one_launch(rng, monkeypatch, dtype):
    """attention_backward with the shapes, strides and arguments of an earlier call takes that
    call's cached launches (no argument checks): the same bits as the first; new values still
    match float64, and so do a strided q and do of the same shape (gradients laid out unlike
    them: not cached, the float32 accumulators' path)."""
    from hpcattn import api
    N, H, Hkv, D, spec = 1500, 8, 4, 64, "causal+window:200"
    (q, k, v, do), dev = arrays(rng, [(1, N, H, D), (1, N, Hkv, D), (1, N, Hkv, D), (1, N, H, D)], dtype)
    (wq, wdo, do2), (wqd, wdod, do2d) = arrays(rng, [(1, N, 2 * H, D), (1, N, 2 * H, D), (1, N, H, D)], dtype)
    later = [(q, do2, dev[0], do2d), (wq[:, :, ::2], wdo[:, :, 1::2], wqd[:, :, ::2], wdod[:, :, 1::2])]
    o, lse = hpcattn.attention(*dev[:3], mask=spec, comm=MPI.COMM_SELF)
    outs = [hpcattn.attention(qx, *dev[1:3], mask=spec, comm=MPI.COMM_SELF) for _, _, qx, _ in later]
    api._launches.clear()
    first, again = {}, {}
    g1 = hpcattn.attention_backward(*dev[:3], o, lse, dev[3], mask=spec, comm=MPI.COMM_SELF, stats=first)

    def cached():
        return sum("backward" in key for key in api._launches)
    assert cached() == 1
    checked, real = [], api._shard
    monkeypatch.setattr(api, "_shard", lambda *a, **kw: (checked.append(1), real(*a, **kw))[1])
    g2 = hpcattn.attention_backward(*dev[:3], o, lse, dev[3], mask=spec, comm=MPI.COMM_SELF, stats=again)
    assert checked == [] and cached() == 1
    assert all(np.array_equal(a.get().view(np.uint16), b.get().view(np.uint16)) for a, b in zip(g1, g2))
    assert again["edges"] == first["edges"] > 0 and again["variant"] == first["variant"]
    for (qh, doh, qx, dox), (o, lse) in zip(later, outs):
        grads = hpcattn.attention_backward(qx, *dev[1:3], o, lse, dox, mask=spec, comm=MPI.COMM_SELF)
        want = reference_backward(qh, k, v, doh, np.arange(N), parse(spec), 1 / np.sqrt(D))
        for g, w in zip(grads, want):
            assert grad_error(g.get().astype(np.float32), w) <= grad_tolerance(dtype), grad_error(g.get(), w)
    assert checked == [1] and cached() == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("D", [64, 128, 48])
@pytest.mark.parametrize("spec", ["causal+window:64", "full", "dilated:3:5+global:2", "block:64+causal"])
def test_backward_on_device_arrays(rng, spec, D, dtype):
    """attention_backward on the caller's (B, N, H, D) CuPy arrays: half precision with D in
    BWD_DIMS runs the tensor-core kernels, which read the arrays in place and write the
    gradients in their dtype; the rest goes through float32 accumulators and a cast."""
    B, N, H, Hkv = 2, 500, 4, 2
    (q, k, v, do), dev = arrays(rng, [(B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, D), (B, N, H, D)], dtype)
    o, lse = hpcattn.attention(*dev[:3], mask=spec, comm=MPI.COMM_SELF)
    stats = {}
    grads = hpcattn.attention_backward(*dev[:3], o, lse, dev[3], mask=spec, comm=MPI.COMM_SELF, stats=stats)
    want = reference_backward(q, k, v, do, np.arange(N), parse(spec), 1 / np.sqrt(D))
    for g, w, x in zip(grads, want, dev):
        assert g.dtype == x.dtype and g.shape == x.shape and g.flags.c_contiguous
        assert grad_error(g.get().astype(np.float32), w) <= grad_tolerance(dtype), grad_error(g.get(), w)
    assert stats["edges"] == parse(spec).allowed(np.arange(N)[:, None], np.arange(N)[None, :]).sum()


@pytest.mark.parametrize("kind", ["wgmma", *gpu_backward.FUSED])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
def test_hopper_backward_reads_the_callers_layout(rng, D, dtype, kind):
    """The Hopper backward (backward_out's kernel_kind "wgmma": two passes; "fused": one, dq
    through float32 sums and store_rows; "fused-bulk", "fused-fixed": through dq tiles and
    tile_rows_out) on the caller's (B, N, H, D) arrays seen head-major, as attention_backward
    passes them: float64's gradients, in place, the same bits on a rerun."""
    from hpcattn.api import heads
    from hpcattn.gpu import backward, loader
    if not loader.wgmma_available():
        pytest.skip(f"the Hopper kernels need compute capability 9.0; this is {cp.cuda.Device().compute_capability}")
    B, N, H, Hkv, spec = 2, 700, 4, 2, "causal+window:100"
    (q, k, v, do), dev = arrays(rng, [(B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, D), (B, N, H, D)], dtype)
    o, lse = hpcattn.attention(*dev[:3], mask=spec, comm=MPI.COMM_SELF)
    qh, kh, vh = heads(dev[0], Hkv), heads(dev[1], Hkv)[:, :, 0], heads(dev[2], Hkv)[:, :, 0]

    def run():
        grads = tuple(cp.full(x.shape, 0xFFFF, cp.uint16).view(x.dtype) for x in dev[:3])  # NaN: all written
        out = (heads(grads[0], Hkv),) + tuple(heads(g, Hkv)[:, :, 0] for g in grads[1:])
        edges = backward.backward_out(qh, None, kh, vh, parse(spec), 1 / np.sqrt(D), heads(o, Hkv),
                                      lse.reshape(B, Hkv, H // Hkv, N), heads(dev[3], Hkv), out, kernel_kind=kind)
        return [g.get() for g in grads], int(edges)

    (grads, edges), (again, _) = run(), run()
    want = reference_backward(q, k, v, do, np.arange(N), parse(spec), 1 / np.sqrt(D))
    for g, w, a in zip(grads, want, again):
        assert grad_error(g.astype(np.float32), w) <= grad_tolerance(dtype), grad_error(g, w)
        assert np.array_equal(g.view(np.uint16), a.view(np.uint16))
    assert edges == parse(spec).allowed(np.arange(N)[:, None], np.arange(N)[None, :]).sum()


@pytest.mark.parametrize("kind", ["wgmma", *gpu_backward.FUSED])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_api_runs_each_hopper_backward_as_its_default(rng, monkeypatch, dtype, kind):
    """attention_backward with "auto" meaning each Hopper backward (a candidate default): its
    cached launch gets the caller's (B, N, H, D) arrays themselves, not head-major views;
    float64's gradients, the same bits from the cache."""
    from hpcattn import api
    from hpcattn.gpu import loader
    if not loader.wgmma_available():
        pytest.skip(f"the Hopper kernels need compute capability 9.0; this is {cp.cuda.Device().compute_capability}")
    monkeypatch.setattr(gpu_backward, "HOPPER_AUTO", kind)
    monkeypatch.setattr(api, "_launches", {})
    B, N, H, Hkv, D, spec = 2, 650, 4, 2, 128, "causal"
    (q, k, v, do), dev = arrays(rng, [(B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, D), (B, N, H, D)], dtype)
    o, lse = hpcattn.attention(*dev[:3], mask=spec, comm=MPI.COMM_SELF)
    g1, g2 = (hpcattn.attention_backward(*dev[:3], o, lse, dev[3], mask=spec, comm=MPI.COMM_SELF) for _ in range(2))
    assert sum("backward" in key for key in api._launches) == 1
    want = reference_backward(q, k, v, do, np.arange(N), parse(spec), 1 / np.sqrt(D))
    for a, b, w in zip(g1, g2, want):
        assert grad_error(a.get().astype(np.float32), w) <= grad_tolerance(dtype), grad_error(a.get(), w)
        assert np.array_equal(a.get().view(np.uint16), b.get().view(np.uint16))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_keys_no_query_reaches_get_zero_gradients(rng, dtype):
    """Queries at positions 600 .. 699 of 1000 keys under causal+window:50: keys 0 .. 549 and
    700 .. 999 have no edge, and their dk, dv (written, not added, at one rank) must be zeros."""
    B, N, nq, H, D = 1, 1000, 100, 2, 64
    (q, k, v, do), dev = arrays(rng, [(B, nq, H, D), (B, N, H, D), (B, N, H, D), (B, nq, H, D)], dtype)
    qpos = np.arange(600, 700)
    o, lse = hpcattn.attention(*dev[:3], mask="causal+window:50", comm=MPI.COMM_SELF, q_positions=qpos)
    grads = hpcattn.attention_backward(*dev[:3], o, lse, dev[3], mask="causal+window:50", comm=MPI.COMM_SELF,
                                       q_positions=qpos)
    want = reference_backward(q, k, v, do, qpos, parse("causal+window:50"), 1 / np.sqrt(D))
    for g, w in zip(grads, want):
        assert grad_error(g.get().astype(np.float32), w) <= grad_tolerance(dtype)
    for g in grads[1:]:
        assert not g.get()[:, :550].astype(np.float32).any() and not g.get()[:, 700:].astype(np.float32).any()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_cuda_tensors_train_through_hpcattn(dtype):
    torch = pytest.importorskip("torch")
    import hpcattn.torch as ht
    from helpers import rel, sdpa
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(3)
    B, N, H, Hkv, D = 1, 700, 4, 2, 64
    q, k, v = (torch.randn(s, generator=g).to(dt).cuda().requires_grad_()
               for s in ((B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, D)))
    o = ht.attention(q, k, v, mask="causal+window:100", comm=MPI.COMM_SELF)
    assert o.is_cuda and o.dtype == dt
    do = torch.randn(o.shape, generator=g).to(dt).cuda()
    (o.float() * do.float()).sum().backward()
    ref = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    o_ref = sdpa(*ref, "causal+window:100", np.arange(N), N)
    (o_ref * do.cpu().double()).sum().backward()
    assert rel(o.cpu(), o_ref) <= tolerance(dtype)[0]
    for x, x_ref in zip((q, k, v), ref):
        assert x.grad.is_cuda and x.grad.dtype == dt and rel(x.grad.cpu(), x_ref.grad) <= grad_tolerance(dtype)
