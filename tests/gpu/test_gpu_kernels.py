"""GPU backend, one process: the CUDA kernels against the float64 reference for every mask,
dtype (float32, float16, bfloat16), head dim bucket and GQA, forward and backward; the fused
merge; every variant through the API; a whole `hpcattn run` on the GPU. Skips (saying why)
without CuPy or a CUDA device."""
import math

import numpy as np
import pytest
from mpi4py import MPI

from gpu_helpers import bf16_bits, cupy_or_skip, full_backward, grad_err, local_reference, rel_err

cp = cupy_or_skip()

import hpcattn  # noqa: E402
from hpcattn import masks  # noqa: E402
from hpcattn.gpu import forward, listed, loader, shapes  # noqa: E402
from hpcattn.gpu.backward import backward as gpu_backward  # noqa: E402
from hpcattn.masks import parse  # noqa: E402
from hpcattn.merge import merge  # noqa: E402
from hpcattn.reference import errors, grad_error, reference, reference_backward, tolerance  # noqa: E402
from hpcattn.dist.variants import VARIANTS  # noqa: E402

MASKS = ["full", "causal", "window:7", "causal+window:33", "dilated:3:5", "causal+dilated:2:4",
         "block:50", "block:16+causal", "global:4+window:2", "causal+global:5", "window:0",
         "global:3+block:20+window:5+causal"]
# inputs are exact in float32, so the CUDA-core kernel only rounds its float32 sums; the
# tensor-core kernel also rounds the probabilities P to the input type before P V
TOL = {"simt": 2e-5, ("mma", "float16"): 4e-3, ("mma", "bfloat16"): 3e-2, ("wgmma", "float16"): 4e-3,
       ("wgmma", "bfloat16"): 3e-2}


def need(kind):
    """Skips a Hopper-kernel case (saying why) on a device that cannot run it."""
    if kind in ("wgmma", "fused") and not loader.wgmma_available():
        pytest.skip(f"the wgmma kernel needs compute capability 9.0; this device is "
                    f"{cp.cuda.Device().compute_capability} ({loader.COMPILED_BY.get('attend_wgmma.cu', '')})")


def one(rng, shape, dtype):
    """(float32 host values the kernel sees, device array of `dtype`; bfloat16 as uint16 bits)."""
    return in_dtype(rng.standard_normal(shape).astype(np.float32), dtype)


def in_dtype(a, dtype):
    """float32 a rounded to `dtype`: (its float32 host values, the device array; bfloat16 as
    uint16 bits)."""
    if dtype == "bfloat16":
        bits, vals = bf16_bits(a)
        return vals, cp.asarray(bits)
    h = a.astype(dtype)
    return h.astype(np.float32), cp.asarray(h)


def inputs(rng, shape_q, shape_k, dtype):
    """Host values and device arrays of q, k, v."""
    host, dev = zip(*(one(rng, s, dtype) for s in (shape_q, shape_k, shape_k)))
    return list(host), list(dev)


def assert_matches_reference(o, lse, edges, o_ref, lse_ref, tol, mask, qpos, k0, nk):
    """forward.attend's (o, lse) on the device against the float64 reference: float32 of the right
    shapes, rows without edges (0, -inf), every element finite, relative error within tol, lse
    within 1e-4, and the edges of keys k0 .. k0 + nk - 1 counted exactly."""
    o, lse = o.get(), lse.get()
    assert o.dtype == lse.dtype == np.float32 and o.shape == o_ref.shape and lse.shape == o_ref.shape[:-1]
    empty = np.isneginf(lse_ref)
    assert np.array_equal(np.isneginf(lse), empty) and (o[empty] == 0).all() and np.isfinite(o).all()
    assert rel_err(o, o_ref) <= tol, rel_err(o, o_ref)
    assert np.max(np.abs(lse[~empty] - lse_ref[~empty]) / np.maximum(1, np.abs(lse_ref[~empty])), initial=0) <= 1e-4
    assert edges == int(mask.allowed(qpos[:, None], np.arange(k0, k0 + nk)[None, :]).sum())


@pytest.mark.parametrize("spec", MASKS)
@pytest.mark.parametrize("B,Hkv,G,nq,nk,D,dtype,kind", [(1, 1, 1, 300, 300, 64, "float32", "simt"),
                                                         (2, 2, 2, 130, 257, 48, "float16", "simt"),
                                                         (2, 2, 2, 130, 257, 64, "float16", "simt"),
                                                         (2, 2, 2, 130, 257, 64, "float16", "mma"),
                                                         (1, 2, 3, 77, 200, 128, "bfloat16", "mma"),
                                                         (1, 1, 1, 200, 333, 32, "bfloat16", "mma"),
                                                         (1, 1, 2, 150, 150, 96, "float16", "mma"),
                                                         (2, 2, 2, 130, 257, 64, "float16", "wgmma"),
                                                         (1, 2, 3, 77, 200, 128, "bfloat16", "wgmma"),
                                                         (1, 1, 2, 300, 333, 64, "bfloat16", "wgmma"),
                                                         (1, 1, 1, 200, 333, 128, "float16", "wgmma"),
                                                         (1, 2, 3, 77, 200, 128, "bfloat16", "simt"),
                                                         (1, 1, 2, 40, 90, 200, "float16", "simt")])
def test_local_kernel_matches_reference_and_counts_edges(rng, spec, B, Hkv, G, nq, nk, D, dtype, kind):
    need(kind)
    mask = parse(spec)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (B, Hkv, G, nq, D), (B, Hkv, nk, D), dtype)
    k0 = 37  # a key block that does not start at 0, queries spread around and past it
    qpos = np.sort(rng.choice(np.arange(0, k0 + nk + 20), size=nq, replace=False)).astype(np.int64)
    scale = 1 / math.sqrt(D)
    o, lse, edges = forward.attend(qd, qpos, kd, vd, k0, mask, scale, bf16=dtype == "bfloat16", kernel_kind=kind)
    o_ref, lse_ref = local_reference(qh, kh, vh, qpos, k0, mask, scale)
    assert_matches_reference(o, lse, edges, o_ref, lse_ref, TOL.get(kind, TOL.get((kind, dtype))), mask, qpos, k0, nk)


@pytest.mark.parametrize("spec", ["window:40", "causal+window:100", "global:3+window:20", "block:64+causal"])
@pytest.mark.parametrize("D,dtype", [(64, "float16"), (128, "bfloat16")])
def test_wgmma_rows_whose_positions_are_runs_or_not(rng, spec, D, dtype):
    """The Hopper kernel works a 64-row group's positions out from its lowest one when the group
    is a run (row r at lo + r): here runs, a run reversed (the same lowest and highest position,
    not a run), a run with one row moved, sorted samples and an uneven last group, in one call;
    exact against float64, edges counted."""
    need("wgmma")
    mask, nk, k0 = parse(spec), 1500, 0
    qpos = np.concatenate([np.arange(0, 192), np.arange(700, 636, -1), np.arange(400, 464),
                           np.r_[np.arange(900, 963), 1200], np.sort(rng.choice(1500, 150, replace=False))])
    nq = len(qpos)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, 2, 1, nq, D), (1, 2, nk, D), dtype)
    scale = 1 / math.sqrt(D)
    o, lse, edges = forward.attend(qd, qpos, kd, vd, k0, mask, scale, bf16=dtype == "bfloat16", kernel_kind="wgmma")
    o_ref, lse_ref = local_reference(qh, kh, vh, qpos, k0, mask, scale)
    assert_matches_reference(o, lse, edges, o_ref, lse_ref, TOL[("wgmma", dtype)], mask, qpos, k0, nk)


@pytest.mark.parametrize("spec", ["causal+window:100", "block:64+causal", "full"])
@pytest.mark.parametrize("kind", ["mma", "wgmma"])
def test_forward_rows_in_one_run_take_no_positions_array(rng, spec, kind):
    """Rows at positions q0 .. q0 + nq - 1 (a contiguous shard's): the tensor-core forward takes
    the run's start instead of its positions, exact against float64, with the same edges as with
    the positions on the device (searched as any positions are) and, where one kernel takes both
    (not attend_fwd_dense, whose sums run in another order), the same bits."""
    need(kind)
    mask, D, dtype, nq, nk, k0 = parse(spec), 64, "float16", 333, 600, 40
    qpos = np.arange(150, 150 + nq, dtype=np.int64)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, 2, 2, nq, D), (1, 2, nk, D), dtype)
    scale = 1 / math.sqrt(D)
    o, lse, edges = forward.attend(qd, qpos, kd, vd, k0, mask, scale, kernel_kind=kind)
    o_ref, lse_ref = local_reference(qh, kh, vh, qpos, k0, mask, scale)
    assert_matches_reference(o, lse, edges, o_ref, lse_ref, TOL[(kind, dtype)], mask, qpos, k0, nk)
    o2, lse2, edges2 = forward.attend(qd, cp.asarray(qpos), kd, vd, k0, mask, scale, kernel_kind=kind)
    assert edges2 == edges
    if not forward.hopper_form(kind, mask, D, True):  # else attend_fwd_dense, whose sums run in another order
        assert bool(cp.array_equal(o, o2)) and bool(cp.array_equal(lse, lse2))


DENSE = ["full", "causal", "window:0", "window:7", "window:300", "causal+window:33"]


def launched(monkeypatch):
    """The kernel names forward's launches take from here on."""
    names, launch = [], forward.launch
    monkeypatch.setattr(forward, "launch", lambda name, *a, **kw: names.append(name) or launch(name, *a, **kw))
    return names


@pytest.mark.parametrize("spec", DENSE)
@pytest.mark.parametrize("B,Hkv,G,nq,nk,D,dtype,q0,k0", [(1, 1, 1, 300, 300, 64, "float16", 0, 0),
                                                         (2, 2, 2, 130, 257, 64, "bfloat16", 500, 37),
                                                         (1, 2, 4, 333, 200, 128, "float16", 150, 200),
                                                         (1, 1, 2, 1000, 1000, 128, "bfloat16", 1000, 0),
                                                         (1, 1, 1, 5, 700, 128, "float16", 690, 0)])
def test_dense_forward_matches_reference(rng, monkeypatch, spec, B, Hkv, G, nq, nk, D, dtype, q0, k0):
    """attend_fwd_dense, the Hopper forward for one full or window term over rows in one run
    (ring's and burst's diagonal and off-diagonal blocks): exact against float64 with the edges
    counted, for a diagonal block, rows past the keys, rows before them (no edges), GQA, uneven
    tiles and a few rows; the same bits on a rerun."""
    need("wgmma")
    mask, scale, bf = parse(spec), 1 / math.sqrt(D), dtype == "bfloat16"
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (B, Hkv, G, nq, D), (B, Hkv, nk, D), dtype)
    qpos = np.arange(q0, q0 + nq, dtype=np.int64)
    names = launched(monkeypatch)
    o, lse, edges = forward.attend(qd, qpos, kd, vd, k0, mask, scale, bf16=bf, kernel_kind="wgmma")
    assert [n.split("<")[0] for n in names] == ["attend_fwd_dense"]
    o_ref, lse_ref = local_reference(qh, kh, vh, qpos, k0, mask, scale)
    assert_matches_reference(o, lse, edges, o_ref, lse_ref, TOL[("wgmma", dtype)], mask, qpos, k0, nk)
    o2, lse2, edges2 = forward.attend(qd, qpos, kd, vd, k0, mask, scale, bf16=bf, kernel_kind="wgmma")
    assert edges2 == edges and bool(cp.array_equal(o, o2)) and bool(cp.array_equal(lse, lse2))


@pytest.mark.parametrize("ctas", [1, 3])
@pytest.mark.parametrize("D, dtype", [(64, "float16"), (128, "bfloat16")])
@pytest.mark.parametrize("spec", ["causal", "window:100", "full"])
def test_persistent_dense_blocks_walk_many_work_items(rng, monkeypatch, ctas, D, dtype, spec):
    """attend_fwd_dense with few blocks: many (rows, head) items each, so its K and V rings turn
    over across items, and items whose rows reach no key (rows past a causal block's keys by more
    than the window, or before them) in between; exact against float64."""
    need("wgmma")
    monkeypatch.setattr(forward, "WG_CTAS", ctas)
    mask, k0, nq, nk = parse(spec), 400, 1500, 700
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, 2, 2, nq, D), (1, 2, nk, D), dtype)
    qpos = np.arange(0, nq, dtype=np.int64)
    names = launched(monkeypatch)
    o, lse, edges = forward.attend(qd, qpos, kd, vd, k0, mask, 1 / math.sqrt(D), bf16=dtype == "bfloat16",
                                   kernel_kind="wgmma")
    assert [n.split("<")[0] for n in names] == ["attend_fwd_dense"]
    o_ref, lse_ref = local_reference(qh, kh, vh, qpos, k0, mask, 1 / math.sqrt(D))
    assert_matches_reference(o, lse, edges, o_ref, lse_ref, TOL[("wgmma", dtype)], mask, qpos, k0, nk)


@pytest.mark.parametrize("spec", ["causal", "window:300", "global:3+causal+window:40", "block:128"])
@pytest.mark.parametrize("B,Hkv,G,nq,D,dtype,kind", [(1, 1, 8, 16, 64, "float16", "wgmma"),
                                                      (2, 2, 3, 5, 128, "bfloat16", "wgmma"),
                                                      (2, 2, 2, 16, 64, "float16", "mma"),
                                                      (1, 1, 4, 3, 40, "float32", "simt")])
def test_few_query_rows_split_the_keys_and_merge(rng, monkeypatch, spec, B, Hkv, G, nq, D, dtype, kind):
    """Decode (flash-decoding): with few query rows the keys split into chunks, each a launch
    on its own stream, partials folded by the one merge; exact, every chunk's edges counted,
    rows without edges (0, -inf)."""
    need(kind)
    monkeypatch.setattr(forward, "SPLIT_KEYS", 50)
    mask, nk, k0 = parse(spec), 1000, 10
    assert forward._key_chunks(cp, nq, B * Hkv * G, nk) > 1
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (B, Hkv, G, nq, D), (B, Hkv, nk, D), dtype)
    qpos = np.concatenate([[3], np.sort(rng.choice(np.arange(k0, k0 + nk + 5), nq - 1, replace=False))]).astype(np.int64)
    scale = 1 / math.sqrt(D)
    o, lse, edges = forward.attend(qd, qpos, kd, vd, k0, mask, scale, bf16=dtype == "bfloat16", kernel_kind=kind)
    o_ref, lse_ref = local_reference(qh, kh, vh, qpos, k0, mask, scale)
    assert_matches_reference(o, lse, edges, o_ref, lse_ref, TOL.get(kind, TOL.get((kind, dtype))), mask, qpos, k0, nk)


@pytest.mark.parametrize("r, seed, n", [(5, 7, 5000), (40, 0, 100), (10, 3, 7), (1, 2**62 - 1, 10**12)])
def test_device_random_columns_are_masks_random_keys(rng, r, seed, n):
    qpos = np.sort(rng.choice(min(n, 5000), size=min(n, 300), replace=False)).astype(np.int64)
    term = parse(f"random:{r}:{seed}", n_keys=n).terms[0]
    cols, width = listed.random_columns(term, qpos)
    got = np.sort(cols.get().reshape(len(qpos), width), axis=1)
    assert np.array_equal(got, masks.random_keys(seed, qpos, r, n))


def listed_mask(spec, rng, n):
    """spec bound to n keys and, for csr, to a random explicit edge list over n rows."""
    csr = None
    if "csr" in spec:
        counts = rng.integers(0, 12, size=n)
        indices = np.concatenate([np.sort(rng.choice(n, size=c, replace=False)) for c in counts])
        csr = masks.check_csr(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                              indices.astype(np.int64), n)
    return parse(spec, n_keys=n, csr=csr)


@pytest.mark.parametrize("spec", ["random:5:3", "causal+random:9", "window:4+random:6:1", "csr",
                                  "causal+csr+window:2", "global:2+csr", "random:3+csr+block:8"])
@pytest.mark.parametrize("dtype, kind", [("float32", "simt"), ("float16", "mma"), ("bfloat16", "simt"),
                                         ("bfloat16", "wgmma")])
def test_listed_terms_match_reference(rng, spec, dtype, kind):
    need(kind)
    n, k0, nk, D = 320, 50, 200, 64
    mask = listed_mask(spec, rng, n)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, 2, 2, n, D), (1, 2, nk, D), dtype)
    qpos = np.arange(n, dtype=np.int64)
    o, lse, edges = forward.attend(qd, qpos, kd, vd, k0, mask, 0.125, bf16=dtype == "bfloat16", kernel_kind=kind)
    o_ref, lse_ref = local_reference(qh, kh, vh, qpos, k0, mask, 0.125)
    o, lse = o.get(), lse.get()
    assert np.array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    assert rel_err(o, o_ref) <= TOL.get(kind, TOL.get((kind, dtype)))
    assert edges == int(mask.allowed(qpos[:, None], np.arange(k0, k0 + nk)[None, :]).sum())


@pytest.mark.parametrize("kind", ["mma", "wgmma"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("spec", ["causal+window:40", "window:256", "dilated:3:5+global:2"])
def test_lean_forward_is_the_tensor_core_forward_rounded(rng, dtype, spec, kind):
    """attend_lean (positions q0 + r derived on the device, o in the input dtype) gives the
    float32 tensor-core result of the same kernel rounded to the input dtype, the same lse and
    the same edges."""
    need(kind)
    mask, nq, nk, q0 = parse(spec), 300, 400, 37
    _, (qd, kd, vd) = inputs(rng, (1, 2, 2, nq, 64), (1, 2, nk, 64), dtype)
    bf = dtype == "bfloat16"
    o, lse, edges = forward.attend(qd, np.arange(q0, q0 + nq, dtype=np.int64), kd, vd, 0, mask, 0.125, bf16=bf,
                                   kernel_kind=kind)
    lo, ll, le = forward.attend_lean(qd, q0, kd, vd, 0, mask, 0.125, bf16=bf, kernel_kind=kind)
    assert lo.dtype == qd.dtype and int(le) == edges and np.array_equal(ll.get(), lse.get())
    want = bf16_bits(o.get())[0] if bf else o.get().astype(np.float16)
    assert np.array_equal(lo.get(), want)
    lo, ll, le = forward.attend_lean(qd, q0, kd, vd, 0, mask, 0.125, bf16=bf, out=qd, kernel_kind=kind)  # o over q
    assert lo is qd and int(le) == edges and np.array_equal(qd.get(), want)


@pytest.mark.parametrize("ctas", [1, 3])
@pytest.mark.parametrize("D, dtype", [(64, "float16"), (128, "bfloat16")])
@pytest.mark.parametrize("spec", ["causal+window:100", "global:3+window:40", "block:64+causal", "full"])
def test_persistent_wgmma_blocks_walk_many_work_items(rng, monkeypatch, ctas, D, dtype, spec):
    """Few blocks, many (rows, head) items each: the loader's double-buffered set-up, the ring's
    phases across items and items without keys (q positions past the keys) all stay exact."""
    need("wgmma")
    monkeypatch.setattr(forward, "WG_CTAS", ctas)
    mask, k0, nq, nk = parse(spec), 20, 900, 700
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, 2, 2, nq, D), (1, 2, nk, D), dtype)
    qpos = np.sort(rng.choice(np.arange(0, k0 + nk + 400), size=nq, replace=False)).astype(np.int64)
    o, lse, edges = forward.attend(qd, qpos, kd, vd, k0, mask, 1 / math.sqrt(D), bf16=dtype == "bfloat16",
                                   kernel_kind="wgmma")
    o_ref, lse_ref = local_reference(qh, kh, vh, qpos, k0, mask, 1 / math.sqrt(D))
    assert_matches_reference(o, lse, edges, o_ref, lse_ref, TOL[("wgmma", dtype)], mask, qpos, k0, nk)


def test_sm90a_cubin_is_cached_on_disk_and_reused(tmp_path, monkeypatch):
    """A second process (here: a second module) loads the cubin the first compiled, and a
    kernels/ source change (another key) compiles anew."""
    need("wgmma")
    from cupy.cuda import nvrtc
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    code, names = (loader.KERNEL_DIR / "attend_wgmma.cu").read_text(), [shapes.wg_name("__half", 64, "float")]
    options = loader.options()
    first = loader.Sm90aModule(code, names, options)
    cached = sorted(p.suffix for p in tmp_path.iterdir())
    assert cached == [".cubin", ".json"]

    def no_compile(*a):
        raise AssertionError("compiled although cached")
    monkeypatch.setattr(nvrtc, "compileProgram", no_compile)
    again = loader.Sm90aModule(code, names, options)
    assert again._lowered == first._lowered
    with pytest.raises(AssertionError, match="compiled although cached"):
        loader.Sm90aModule(code + "\n// another version\n", names, options)


def test_wgmma_kind_is_refused_clearly_where_it_cannot_run(rng):
    _, (qd, kd, vd) = inputs(rng, (1, 1, 1, 10, 32), (1, 1, 10, 32), "float16")  # D = 32: not a Hopper shape
    with pytest.raises(hpcattn.HpcattnError, match="Hopper kernel takes"):
        forward.attend(qd, np.arange(10), kd, vd, 0, parse("full"), 0.1, kernel_kind="wgmma")


def test_decode_rows_without_edges_and_empty_blocks(rng):
    mask = parse("window:0")
    q = cp.asarray(rng.standard_normal((1, 1, 1, 5, 32)).astype(np.float32))
    k = cp.asarray(rng.standard_normal((1, 1, 100, 32)).astype(np.float32))
    o, lse, edges = forward.attend(q, np.array([5, 100, 150, 199, 200]), k, k, 100, mask, 0.1)
    lse = lse.get()
    assert edges == 3 and np.isneginf(lse[..., [0, 4]]).all() and (o.get()[..., [0, 4], :] == 0).all()
    o, lse, edges = forward.attend(q, np.arange(5), k[:, :, :0], k[:, :, :0], 0, mask, 0.1)
    assert edges == 0 and np.isneginf(lse.get()).all() and not o.get().any()


def test_large_logits_stay_finite(rng):
    q = cp.asarray((rng.standard_normal((1, 1, 1, 200, 16)) * 30).astype(np.float32))
    o, lse, _ = forward.attend(q, np.arange(200), q[:, :, 0], q[:, :, 0], 0, parse("causal"), 0.25)
    assert cp.isfinite(o).all() and cp.isfinite(lse).all()


BWD_TOL = {"simt": 2e-4, ("mma", "float16"): 4e-3, ("mma", "bfloat16"): 3e-2, ("wgmma", "float16"): 4e-3,
           ("wgmma", "bfloat16"): 3e-2}


def two_block_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, dtype, kind, cut):
    """gpu_backward over the key blocks [0, cut) and [cut, nk), dq accumulated across them as a
    ring's hops do: (dq, dk, dv) on the host and the edges counted."""
    gq, edges = cp.zeros(qd.shape, cp.float32), 0
    gk, gv = cp.zeros(kd.shape, cp.float32), cp.zeros(kd.shape, cp.float32)
    for a, b in ((0, cut), (cut, kd.shape[2])):
        _, dk_b, dv_b, e = gpu_backward(qd, qpos, cp.ascontiguousarray(kd[:, :, a:b]),
                                        cp.ascontiguousarray(vd[:, :, a:b]), a, mask, scale, dod,
                                        cp.asarray(lse, dtype=cp.float32), cp.asarray(delta, dtype=cp.float32),
                                        dq=gq, bf16=dtype == "bfloat16", kernel_kind=kind)
        gk[:, :, a:b], gv[:, :, a:b], edges = dk_b, dv_b, edges + e
    return gq.get(), gk.get(), gv.get(), edges


@pytest.mark.parametrize("spec", MASKS)
@pytest.mark.parametrize("Hkv,G,nq,nk,D,dtype,kind", [(1, 1, 150, 150, 64, "float32", "simt"),
                                                      (2, 2, 97, 97, 48, "float16", "simt"),
                                                      (1, 3, 70, 70, 128, "bfloat16", "simt"),
                                                      (2, 2, 97, 97, 64, "float16", "mma"),
                                                      (1, 3, 70, 70, 128, "bfloat16", "mma"),
                                                      (1, 2, 300, 300, 64, "bfloat16", "mma"),
                                                      (1, 1, 260, 333, 32, "float16", "mma"),
                                                      (2, 1, 150, 200, 96, "float16", "mma"),
                                                      (1, 4, 130, 130, 128, "float16", "mma"),
                                                      (2, 2, 97, 97, 64, "float16", "wgmma"),
                                                      (1, 3, 200, 170, 128, "bfloat16", "wgmma"),
                                                      (1, 4, 130, 130, 64, "bfloat16", "wgmma"),
                                                      (1, 1, 260, 333, 128, "float16", "wgmma")])
def test_backward_matches_float64_gradients(rng, spec, Hkv, G, nq, nk, D, dtype, kind):
    """The backward kernels against float64 over two key blocks; queries at 0 .. nq - 1 of nk keys."""
    need(kind)
    mask = parse(spec)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, Hkv, G, nq, D), (1, Hkv, nk, D), dtype)
    doh, dod = one(rng, (1, Hkv, G, nq, D), dtype)
    qpos, scale = np.arange(nq, dtype=np.int64), 1 / math.sqrt(D)
    o, lse, delta, dq, dk, dv, (mag_q, mag_k) = full_backward(qh, kh, vh, doh, qpos, mask, scale)
    got = two_block_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, dtype, kind, nk // 3)
    tol = BWD_TOL.get(kind, BWD_TOL.get((kind, dtype)))
    # dv = P^T dO has no cancellation: its own size is the scale
    for name, g, ref, mag in zip(("dq", "dk", "dv"), got, (dq, dk, dv), (mag_q, mag_k, abs(dv))):
        assert np.isfinite(g).all() and grad_err(g, ref, mag) <= tol, (name, grad_err(g, ref, mag))
    assert got[3] == int(mask.allowed(qpos[:, None], np.arange(nk)[None, :]).sum())


@pytest.mark.parametrize("spec", ["causal+window:40", "global:3+block:20+window:5+causal", "dilated:3:5", "full"])
@pytest.mark.parametrize("order", ["sorted", "runs", "shuffled", "run"])
@pytest.mark.parametrize("kind", ["mma", "wgmma"])
def test_tensor_core_backward_rows_at_any_positions(rng, spec, order, kind):
    """Query rows at positions that are no run: sorted with gaps (searched by position), two
    runs (zigzag), shuffled (every query tile walked); or one run at an offset, which the
    kernels take as its start alone (the same bits as with its positions on the device);
    against float64 and rerun bit for bit."""
    need(kind)
    nk, nq, D, dtype = 700, 230, 64, "float16"
    if order == "run":
        qpos = np.arange(150, 150 + nq, dtype=np.int64)
    elif order == "runs":
        qpos = np.concatenate([np.arange(20, 135), np.arange(500, 615)]).astype(np.int64)
    else:
        qpos = np.sort(rng.choice(nk, nq, replace=False)).astype(np.int64)
        if order == "shuffled":
            qpos = rng.permutation(qpos)
    mask = parse(spec)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, 2, 2, nq, D), (1, 2, nk, D), dtype)
    doh, dod = one(rng, (1, 2, 2, nq, D), dtype)
    o, lse, delta, dq, dk, dv, (mag_q, mag_k) = full_backward(qh, kh, vh, doh, qpos, mask, 0.125)
    got = two_block_backward(qd, qpos, kd, vd, dod, lse, delta, mask, 0.125, dtype, kind, 333)
    for name, g, ref, mag in zip(("dq", "dk", "dv"), got, (dq, dk, dv), (mag_q, mag_k, abs(dv))):
        assert grad_err(g, ref, mag) <= BWD_TOL[kind, dtype], (name, grad_err(g, ref, mag))
    assert got[3] == int(mask.allowed(qpos[:, None], np.arange(nk)[None, :]).sum())
    again = two_block_backward(qd, qpos, kd, vd, dod, lse, delta, mask, 0.125, dtype, kind, 333)
    assert all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(got[:3], again[:3]))
    if order == "run":
        searched = two_block_backward(qd, cp.asarray(qpos), kd, vd, dod, lse, delta, mask, 0.125, dtype, kind, 333)
        assert all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(got[:3], searched[:3]))


@pytest.mark.parametrize("spec", ["window:40", "causal", "causal+window:70", "block:50", "global:3+window:20",
                                  "dilated:3:5"])
@pytest.mark.parametrize("G,nq,nk,D,dtype", [(1, 300, 333, 64, "float16"), (2, 190, 530, 128, "bfloat16"),
                                             (2, 333, 150, 64, "bfloat16"), (1, 260, 700, 128, "float16")])
def test_hopper_backward_with_idle_key_blocks_and_query_tiles(rng, spec, G, nq, nk, D, dtype):
    """attend_bwd_kv_wg and attend_bwd_q_wg over two key blocks with keys past the queries' reach
    (key blocks and query tiles with no edge, consumer warpgroups that skip stages) against
    float64, edges exact, and a rerun bit for bit."""
    need("wgmma")
    mask = parse(spec)
    (qh, kh, vh), (qd, kd, vd) = inputs(rng, (1, 2, G, nq, D), (1, 2, nk, D), dtype)
    doh, dod = one(rng, (1, 2, G, nq, D), dtype)
    qpos, scale = np.arange(nq, dtype=np.int64), 1 / math.sqrt(D)
    o, lse, delta, dq, dk, dv, (mag_q, mag_k) = full_backward(qh, kh, vh, doh, qpos, mask, scale)
    got = two_block_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, dtype, "wgmma", nk // 3)
    for name, g, ref, mag in zip(("dq", "dk", "dv"), got, (dq, dk, dv), (mag_q, mag_k, abs(dv))):
        assert np.isfinite(g).all() and grad_err(g, ref, mag) <= BWD_TOL["wgmma", dtype], (name, grad_err(g, ref, mag))
    assert got[3] == int(mask.allowed(qpos[:, None], np.arange(nk)[None, :]).sum())
    again = two_block_backward(qd, qpos, kd, vd, dod, lse, delta, mask, scale, dtype, "wgmma", nk // 3)
    assert all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(got[:3], again[:3]))


def test_tensor_core_backward_is_refused_where_it_cannot_run(rng):
    q = cp.zeros((1, 1, 1, 8, 48), cp.float16)
    with pytest.raises(hpcattn.HpcattnError, match="tensor-core backward"):
        gpu_backward(q, np.arange(8), q[:, :, 0], q[:, :, 0], 0, parse("full"), 1.0, q,
                     cp.zeros((1, 1, 1, 8), cp.float32), cp.zeros((1, 1, 1, 8), cp.float32), kernel_kind="mma")


def test_fused_merge_matches_the_numpy_merge(rng):
    o_a, o_b = (rng.standard_normal((3, 50, 16)).astype(np.float32) for _ in range(2))
    l_a, l_b = (rng.standard_normal((3, 50)).astype(np.float32) for _ in range(2))
    l_a[0, :10] = -np.inf
    l_b[0, 5:15] = -np.inf
    o_ref, l_ref = merge(o_a, l_a, o_b, l_b)
    o, lse = merge(*map(cp.asarray, (o_a, l_a, o_b, l_b)))  # dispatches to kernels/merge.cu
    assert np.allclose(o.get(), o_ref, atol=1e-6) and np.allclose(lse.get(), l_ref, atol=1e-6)
    assert np.isneginf(lse.get()[0, 5:10]).all() and not o.get()[0, 5:10].any()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("spec", ["full", "causal", "causal+window:33", "dilated:3:5+global:2", "block:50"])
def test_every_variant_through_the_api_on_cupy(rng, variant, spec):
    N, H, Hkv, D = 257, 4, 2, 64
    q, k, v = (rng.standard_normal(s).astype("float16") for s in ((2, N, H, D), (2, N, Hkv, D), (2, N, Hkv, D)))
    stats = {}
    o, lse = hpcattn.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), mask=spec, comm=MPI.COMM_SELF,
                               variant=variant, stats=stats)
    assert isinstance(o, cp.ndarray) and o.dtype == cp.float16
    o_ref, lse_ref = reference(q, k, v, np.arange(N), parse(spec), 1 / math.sqrt(D))
    o_err, lse_err, empty_ok = errors(o.get(), lse.get(), o_ref, lse_ref)
    o_tol, lse_tol = tolerance("float16")
    assert empty_ok and o_err <= o_tol and lse_err <= lse_tol, (o_err, lse_err)
    assert stats["edges"] == parse(spec).allowed(np.arange(N)[:, None], np.arange(N)[None, :]).sum()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("spec", ["full", "causal", "causal+window:33", "dilated:3:5+global:2", "block:50"])
def test_every_variant_backward_through_the_api_on_cupy(rng, variant, spec):
    """attention_backward on device arrays: grad.backward runs kernels/attend.cu (accumulators
    that are strided views go through a copy) and every variant keeps its arrays on the GPU."""
    N, H, Hkv, D = 257, 4, 2, 64
    q, do = (rng.standard_normal((2, N, H, D)).astype("float32") for _ in range(2))
    k, v = (rng.standard_normal((2, N, Hkv, D)).astype("float32") for _ in range(2))
    o, lse = hpcattn.attention(q, k, v, mask=spec, comm=MPI.COMM_SELF)
    stats = {}
    got = hpcattn.attention_backward(*map(cp.asarray, (q, k, v, o, lse, do)), mask=spec, comm=MPI.COMM_SELF,
                                     variant=variant, stats=stats)
    want = reference_backward(q, k, v, do, np.arange(N), parse(spec), 1 / math.sqrt(D))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert isinstance(g, cp.ndarray) and g.dtype == cp.float32, name
        assert grad_error(g.get(), w) <= 1e-4, (name, grad_error(g.get(), w))
    assert stats["edges"] == parse(spec).allowed(np.arange(N)[:, None], np.arange(N)[None, :]).sum()


def test_run_on_the_gpu_writes_backend_and_transport(tmp_path, monkeypatch):
    import h5py
    from hpcattn import Comm
    from hpcattn.commands.gen import generate
    from hpcattn.commands.run import run
    monkeypatch.setenv("HPCATTN_BACKEND", "cupy")
    generate(tmp_path / "in.h5", 301, heads=2, kv_heads=1, head_dim=32, dtype="float16", seed=3)
    comm = Comm(MPI.COMM_SELF)
    _, attrs = run(str(tmp_path / "in.h5"), str(tmp_path / "out.h5"), "causal+window:50", comm)
    assert attrs["backend"] == "cupy" and attrs["transport"] in ("mpi", "host", "nccl")
    with h5py.File(tmp_path / "out.h5", "r") as f, h5py.File(tmp_path / "in.h5", "r") as g:
        assert f.attrs["complete"] == 1 and f.attrs["backend"] == "cupy"
        o_ref, lse_ref = reference(g["q"][...], g["k"][...], g["v"][...], np.arange(301),
                                   parse("causal+window:50"), f.attrs["scale"])
        o_err, lse_err, ok = errors(f["o"][...], f["lse"][...], o_ref, lse_ref)
    assert ok and o_err < 4e-3 and lse_err < 1e-4
    comm.free()
