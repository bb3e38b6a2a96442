"""The work-optimal local kernel against the float64 dense reference, and the compiled gather
(kernels/gather.c, loaded by hpcattn/cpu/cgather.py from hpcattn/cpu/_gather*.so) in every variant
this CPU runs."""
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

import hpcattn
from hpcattn.cpu import cgather, local
from hpcattn.api import to_heads
from hpcattn.arrays import aligned_copy, aligned_empty
from hpcattn.errors import HpcattnError
from hpcattn.masks import check_csr, parse
from hpcattn.reference import errors, reference, tolerance


class KeyRange:
    """The mask restricted to keys [k0, k1): what one attend call over a key block must give."""

    def __init__(self, mask, k0, k1):
        self.mask, self.k0, self.k1 = mask, k0, k1

    def allowed(self, i, j):
        return self.mask.allowed(i, j) & (j >= self.k0) & (j < self.k1)


def run_case(rng, spec, n, B=1, H=1, Hkv=1, D=16, dtype="float32", qpos=None, k0=0, k1=None,
             density=0.05):
    k1 = n if k1 is None else k1
    dense = rng.random((n, n)) < density
    csr = check_csr(np.concatenate([[0], np.cumsum(dense.sum(1))]), np.nonzero(dense)[1], n, 0, n)
    mask = parse(spec, n_keys=n, csr=csr)
    qpos = np.arange(n) if qpos is None else np.asarray(qpos)
    q = rng.standard_normal((B, len(qpos), H, D)).astype(dtype)
    k, v = (rng.standard_normal((B, n, Hkv, D)).astype(dtype) for _ in range(2))
    o, lse, edges = local.attend(to_heads(q, Hkv), qpos, to_heads(k[:, k0:k1], Hkv)[:, :, 0],
                                 to_heads(v[:, k0:k1], Hkv)[:, :, 0], k0, mask, 0.3)
    sub = KeyRange(mask, k0, k1)
    o_ref, lse_ref = reference(q, k, v, qpos, sub, 0.3)
    o = o.transpose(0, 3, 1, 2, 4).reshape(q.shape)
    o_err, lse_err, empty_ok = errors(o, lse.reshape(B, H, len(qpos)), o_ref, lse_ref)
    o_tol, lse_tol = tolerance(dtype)
    assert empty_ok and o_err <= o_tol and lse_err <= lse_tol, (o_err, lse_err)
    assert edges == sub.allowed(qpos[:, None], np.arange(n)[None, :]).sum()
    return lse_ref


SPECS = ["full", "causal", "window:0", "window:7", "causal+window:33", "window:300", "causal+window:130",
         "dilated:3:5", "causal+dilated:4:7", "block:50", "block:1", "global:4+window:2", "causal+global:5",
         "random:5:3", "causal+random:9", "csr", "causal+csr", "window:20+global:3+random:4",
         "causal+window:16+global:2+random:3", "csr+window:10+causal", "dilated:2:7+block:9+random:2",
         "window:5+window:40+dilated:3:9"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n, kwargs", [
    (300, {}),                                                          # fewer rows than a tile
    (1001, {}),                                                         # not a multiple of any tile
    (777, dict(B=2, H=4, Hkv=2, D=8, k0=100, k1=650)),                  # GQA, one key block of a ring hop
    (900, dict(qpos=[0, 3, 4, 5, 6, 400, 401, 898, 899], D=32)),        # scattered and decode rows
    (513, dict(H=2, Hkv=1, D=64, dtype="float16", k0=257, k1=513))])    # float16, block crosses windows
def test_kernel_matches_reference(rng, spec, n, kwargs):
    run_case(rng, spec, n, **kwargs)


def test_rows_without_edges_give_zero_and_minus_infinity(rng):
    # random:0 has no edge at all; dilated rows whose stride misses the key block have none
    lse_ref = run_case(rng, "random:0", 50)
    assert np.isneginf(lse_ref).all()
    lse_ref = run_case(rng, "dilated:2:10", 200, k0=103, k1=108, qpos=np.arange(90, 130))
    assert np.isneginf(lse_ref).any() and np.isfinite(lse_ref).any()
    lse_ref = run_case(rng, "csr", 60, density=0.01)
    assert np.isneginf(lse_ref).any()


def test_out_buffer_keeps_the_input_dtype_and_threads_agree(rng, monkeypatch):
    n, D = 5000, 32
    mask = parse("window:64+global:3+random:4", n_keys=n)
    q = rng.standard_normal((1, 1, 2, n, D)).astype("float16")
    k, v = (rng.standard_normal((1, 1, n, D)).astype("float16") for _ in range(2))
    o32, lse32, e32 = local.attend(q, np.arange(n), k, v, 0, mask, 0.2)
    out = np.full_like(q, np.nan)
    o16, lse16, e16 = local.attend(q, np.arange(n), k, v, 0, mask, 0.2, out=out)
    assert o16 is out and e16 == e32 and (lse16 == lse32).all()
    assert np.abs(o16.astype(np.float32) - o32).max() < 2e-3
    monkeypatch.setenv("HPCATTN_THREADS", "1")
    o1, lse1, e1 = local.attend(q, np.arange(n), k, v, 0, mask, 0.2)
    assert e1 == e32 and np.abs(o1 - o32).max() < 1e-5 and np.abs(lse1 - lse32).max() < 1e-5


def compiled_variants():
    """The compiled gather's variants this CPU runs (none when hpcattn/cpu/_gather*.so is not built)."""
    if cgather.LIB is None:
        return []
    best = cgather.VARIANTS[cgather.best()]
    return [name for name, level in cgather.VARIANTS.items() if level <= best]


needs_compiled = pytest.mark.skipif(
    cgather.LIB is None, reason="hpcattn/cpu/_gather*.so NOT BUILT (pip install builds it "
    "from kernels/gather.c): the compiled gather was NOT tested")


@needs_compiled
@pytest.mark.parametrize("variant", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("spec, density", [("csr", 0.04), ("csr", 0.3), ("causal+csr", 0.3),
                                           ("random:6:2+causal", 0), ("dilated:3:4+window:2", 0),
                                           ("window:3+global:2+random:5+csr", 0.04),
                                           ("global:3+random:40", 0)])
@pytest.mark.parametrize("D", [8, 24, 64, 80])
def test_compiled_gather_matches_the_reference(rng, variant, spec, density, D, monkeypatch):
    """kernels/gather.c, each variant this CPU runs (HPCATTN_GATHER forces it), against float64
    and against NumPy's gathers: B, Hkv, G > 1, rows of 0 to ~150 edges (groups of 16 cut
    anywhere), empty rows (the csr rows 7 and 300), D a multiple of 16 (the AVX-512 loops) or
    not (the portable loops, whatever the variant asked)."""
    if variant not in compiled_variants():
        pytest.skip(f"this CPU does not run the {variant} variant")
    n = 400
    dense = rng.random((n, n)) < density
    dense[7] = dense[300] = False
    csr = check_csr(np.concatenate([[0], np.cumsum(dense.sum(1))]), np.nonzero(dense)[1], n, 0, n)
    mask = parse(spec, n_keys=n, csr=csr)
    q = rng.standard_normal((2, 2, 3, n, D)).astype("float32")
    k, v = (rng.standard_normal((2, 2, n, D)).astype("float32") for _ in range(2))
    got = {}
    for flag in ("numpy", variant):
        monkeypatch.setenv("HPCATTN_GATHER", flag)
        got[flag] = local.attend(q, np.arange(n), k, v, 0, mask, 0.25)
    (o0, l0, e0), (o1, l1, e1) = got.values()
    assert e0 == e1 and not np.isnan(o1).any() and not np.isnan(l1).any()
    assert np.abs(o0 - o1).max() < 1e-5
    fin = np.isfinite(l0)
    assert (np.isneginf(l0) == np.isneginf(l1)).all() and np.abs(l0[fin] - l1[fin]).max() < 1e-5
    assert (o1[np.isneginf(l1)] == 0).all()
    B, Hkv, G = q.shape[:3]  # and the compiled result against float64
    o_ref, lse_ref = reference(q.transpose(0, 3, 1, 2, 4).reshape(B, n, Hkv * G, D), k.transpose(0, 2, 1, 3),
                               v.transpose(0, 2, 1, 3), np.arange(n), mask, 0.25)
    o_err, lse_err, empty_ok = errors(o1.transpose(0, 3, 1, 2, 4).reshape(B, n, Hkv * G, D),
                                      l1.reshape(B, Hkv * G, n), o_ref, lse_ref)
    assert empty_ok and (spec != "csr" or np.isneginf(lse_ref).any())
    assert o_err <= tolerance("float32")[0] and lse_err <= tolerance("float32")[1], (o_err, lse_err)


@needs_compiled
@pytest.mark.parametrize("variant", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("D", [16, 24, 64, 272])
def test_compiled_gather_runs_the_variant_asked(rng, variant, D, monkeypatch):
    """HPCATTN_GATHER picks the variant; AVX-512 takes D % 16 == 0 up to 256, other D run the
    portable loops (AVX2 where the CPU has it); a row without edges gives o = 0, lse = -inf."""
    if variant not in compiled_variants():
        pytest.skip(f"this CPU does not run the {variant} variant")
    monkeypatch.setenv("HPCATTN_GATHER", variant)
    n, nk = 5, 70
    indptr = np.array([0, 3, 3, 40, 41, 70])  # rows of 3, 0, 37, 1 and 29 edges
    cols = np.concatenate([[0, 5, 69], np.arange(2, 39), [7], np.arange(0, 70, 1)[:29]])
    q = rng.standard_normal((1, 1, 1, n, D)).astype("float32")
    k, v = (rng.standard_normal((1, 1, nk, D)).astype("float32") for _ in range(2))
    o, lse, used = cgather.run(q, k, v, indptr, cols, 0.5)
    portable = "avx2" if "avx2" in compiled_variants() and variant != "generic" else "generic"
    assert used == (variant if variant != "avx512" or (D % 16 == 0 and D <= 256) else portable)
    for r in range(n):
        c = cols[indptr[r]:indptr[r + 1]]
        if not len(c):
            assert (o[0, 0, 0, r] == 0).all() and np.isneginf(lse[0, 0, 0, r])
            continue
        s = 0.5 * k[0, 0, c].astype(np.float64) @ q[0, 0, 0, r].astype(np.float64)
        p = np.exp(s - s.max())
        ref = p @ v[0, 0, c].astype(np.float64) / p.sum()
        assert np.abs(o[0, 0, 0, r] - ref).max() <= 1e-5 * np.abs(ref).max()
        assert abs(lse[0, 0, 0, r] - (s.max() + np.log(p.sum()))) <= 1e-5 * max(1, abs(lse[0, 0, 0, r]))


SAME_BITS_MASKS = ["window:100+global:2", "window:256+dilated:2:9", "full", "block:300+causal",
                   "causal+window:33", "causal+random:40+dilated:3:7"]


@pytest.mark.parametrize("kernel", ["avx512", "avx2", "generic", "numpy"])
@pytest.mark.parametrize("spec", SAME_BITS_MASKS)
@pytest.mark.parametrize("shape", ["prefill", "decode"])
def test_attention_gives_the_same_bits_on_any_thread_count(rng, kernel, spec, shape, monkeypatch):
    """Through the public API, each CPU path (HPCATTN_GATHER forces the compiled variants, or
    `numpy`: BLAS tiles and NumPy gathers) gives the same o and lse with 1, 2 or 3 threads: the
    work is cut by the shape alone (row chunks; a decode's key blocks merged in key order) and
    every BLAS call runs on one thread. Checked on a call of many rows and on a decode (12
    queries at the end of 70,000 keys: key blocks)."""
    if kernel != "numpy" and kernel not in compiled_variants():
        pytest.skip(f"this CPU does not run the {kernel} variant (or hpcattn/cpu/_gather*.so is not built)")
    monkeypatch.setenv("HPCATTN_GATHER", kernel)
    n, nq = (6000, 6000) if shape == "prefill" else (70000, 12)
    if shape == "decode" and spec == "full":
        spec = "causal"
    q = rng.standard_normal((1, nq, 4, 64)).astype("float32")
    k, v = (rng.standard_normal((1, n, 2, 64)).astype("float32") for _ in range(2))
    qpos = np.arange(n - nq, n)
    got = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("HPCATTN_THREADS", threads)
        got.append(hpcattn.attention(q, k, v, mask=spec, comm=MPI.COMM_SELF, q_positions=qpos))
    for o, lse in got[1:]:
        assert np.array_equal(o, got[0][0]) and np.array_equal(lse, got[0][1])
    assert not np.isnan(got[0][0]).any() and np.isfinite(got[0][1]).all()


@pytest.mark.skipif(not {"avx512", "avx2"} <= set(compiled_variants()), reason="this CPU does not run both")
@pytest.mark.parametrize("spec", ["window:100", "causal+window:33", "window:256+global:2"])
@pytest.mark.parametrize("D", [16, 64, 128])
def test_band_gives_the_same_bits_with_avx512_and_avx2(rng, spec, D, monkeypatch):
    """The band kernel's AVX2 loops do per row the AVX-512 loops' operations in the same order
    (8 lanes instead of 16), so a window run gives the same bits on either kind of CPU."""
    n = 3001
    mask = parse(spec, n_keys=n)
    q = rng.standard_normal((1, 2, 2, n, D)).astype("float32")
    k, v = (rng.standard_normal((1, 2, n, D)).astype("float32") for _ in range(2))
    got = []
    for variant in ("avx512", "avx2"):
        monkeypatch.setenv("HPCATTN_GATHER", variant)
        got.append(local.attend(q, np.arange(n), k, v, 0, mask, 0.125))
    (o0, l0, e0), (o1, l1, e1) = got
    assert e0 == e1 and np.array_equal(o0, o1) and np.array_equal(l0, l1) and np.isfinite(l0).all()


def test_portable_build_runs_every_piece(rng, tmp_path, monkeypatch):
    """kernels/gather.c as a CPU other than x86-64 (Arm, ...) builds it (-DHPCATTN_GENERIC_ONLY:
    no intrinsics), without a warning: its portable loops are its best and run the gather and
    the band, each against float64 (D not a multiple of 8 too)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    lib = tmp_path / "generic.so"
    subprocess.run([cc, "-O3", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
                    "-DHPCATTN_GENERIC_ONLY", str(Path(__file__).parents[2] / "kernels" / "gather.c"),
                    "-o", str(lib), "-lm"], check=True, timeout=120)
    monkeypatch.setattr(cgather, "LIB", cgather._load(str(lib)))
    assert cgather.best() == "generic" and not cgather.band_blocked(64)
    used = []
    for name in ("band_rows", "run"):
        real = getattr(cgather, name)
        monkeypatch.setattr(cgather, name, lambda *a, real=real: used.append(real(*a)[2]) or real(*a))
    monkeypatch.setenv("HPCATTN_GATHER", "generic")
    for spec, D in (("causal+window:30+global:2", 64), ("random:7+dilated:3:4+csr", 20)):
        run_case(rng, spec, 600, H=4, Hkv=2, D=D)
    assert used and set(used) == {"generic"}


@pytest.mark.parametrize("shape, dtype", [((3, 5, 7), "float32"), ((0, 4), "float16"), ((1000, 64), "int64"),
                                          (17, "float32")])
def test_aligned_arrays_start_on_a_cache_line(shape, dtype):
    """backend.aligned_empty: the shape and dtype asked, data on a 64-byte boundary (NumPy's own
    large arrays start 16 bytes past one); aligned_copy keeps an aligned contiguous array and
    copies anything else (a view at an odd offset, a transposed view) into an aligned one."""
    a = aligned_empty(np, shape, dtype)
    assert a.shape == np.empty(shape).shape and a.dtype == dtype and a.flags.c_contiguous
    assert a.flags.writeable and (a.size == 0 or a.ctypes.data % 64 == 0)  # no data: no address
    assert a.size == 0 or aligned_copy(a) is a
    x = np.arange(4001, dtype=np.float32)[1:].reshape(40, 100)
    for src in (x, x.T):
        y = aligned_copy(src)
        assert y is not src and y.ctypes.data % 64 == 0 and y.flags.c_contiguous
        assert np.array_equal(y, src)
    h = to_heads(np.ones((1, 9, 4, 8), np.float32), 2)  # a copy: aligned
    assert h.shape == (1, 2, 2, 9, 8) and h.ctypes.data % 64 == 0
    one = np.ones((1, 9, 1, 8), np.float32)
    assert np.shares_memory(to_heads(one, 1), one)  # already head-major: never copied


@pytest.mark.parametrize("spec", ["csr", "causal+random:9+window:3"])
def test_gather_gives_the_same_bits_on_misaligned_inputs(rng, spec):
    """local.attend copies a misaligned K/V block to a cache-line boundary for the compiled
    gather (a speed matter only): K and V starting 4 bytes off one give the same bits."""
    n, D = 700, 64
    dense = rng.random((n, n)) < 0.05
    csr = check_csr(np.concatenate([[0], np.cumsum(dense.sum(1))]), np.nonzero(dense)[1], n, 0, n)
    mask = parse(spec, n_keys=n, csr=csr)
    q = rng.standard_normal((1, 1, 2, n, D)).astype("float32")
    k, v = (rng.standard_normal((1, 1, n, D)).astype("float32") for _ in range(2))
    odd = [aligned_empty(np, k.size + 1, np.float32)[1:].reshape(k.shape) for _ in range(2)]
    odd[0][...], odd[1][...] = k, v
    assert odd[0].ctypes.data % 64 == 4
    want = local.attend(q, np.arange(n), aligned_copy(k), aligned_copy(v), 0, mask, 0.125)
    got = local.attend(q, np.arange(n), odd[0], odd[1], 0, mask, 0.125)
    assert got[2] == want[2] > 0 and np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.array_equal(odd[0], k) and np.array_equal(odd[1], v)  # the inputs are left as they were


def test_compiled_gather_library_is_current():
    """A library beside the package built from another kernels/gather.c is refused, not called."""
    assert not cgather._SKIPPED, cgather._SKIPPED


def test_gather_variant_names_are_checked(monkeypatch):
    monkeypatch.setenv("HPCATTN_GATHER", "numba")
    with pytest.raises(HpcattnError, match="HPCATTN_GATHER='numba'"):
        cgather.available(np.dtype("float32"))
    monkeypatch.setenv("HPCATTN_GATHER", "numpy")
    assert not cgather.available(np.dtype("float32"))


@pytest.mark.parametrize("spec", ["window:40", "causal+window:40", "window:300"])
@pytest.mark.parametrize("mode", ["plain", "large_logits", "large_v", "underflow"])
@pytest.mark.parametrize("kernel", ["numpy", "avx512", "avx2"])
def test_band_tiles_every_softmax_path(rng, spec, mode, kernel, monkeypatch):
    """The band's interior tiles (HPCATTN_GATHER=numpy: the BLAS path) take exp(s) unshifted for
    ordinary inputs, subtract the bound c for large logits or large V, and recompute with exact
    row maxima when a row's sum underflows under c; the compiled band kernel always takes exact
    row maxima. Each against float64 (N = 1001: not a multiple of the tile, GQA)."""
    if kernel != "numpy" and kernel not in compiled_variants():
        pytest.skip(f"this CPU does not run the {kernel} variant (or hpcattn/cpu/_gather*.so is not built)")
    monkeypatch.setenv("HPCATTN_GATHER", kernel)
    n, H, Hkv, D = 1001, 4, 2, 32
    q = rng.standard_normal((1, n, H, D)).astype("float32")
    k, v = (rng.standard_normal((1, n, Hkv, D)).astype("float32") for _ in range(2))
    scale = 0.3
    if mode == "large_logits":  # q and k near one vector u: every score near c ~ 1e3 > NO_SHIFT
        u = rng.standard_normal(D).astype("float32")
        q, k = (u + 0.005 * x for x in (q, k))
        scale = 1e3 / float(u @ u)
    elif mode == "large_v":
        v *= 1e28  # exp(c) * L * |v| > SAFE although c is small
    elif mode == "underflow":
        k[0, 500] *= 40  # one large key: c ~ 1e3, while most rows' scores stay near 0
    calls = {"band": 0, "exact": 0}
    band, block = local._band_softmax, local._softmax_block

    def spy_band(*a):
        calls["band"] += 1
        calls["in"] = True
        try:
            return band(*a)
        finally:
            calls["in"] = False

    def spy_block(*a):
        calls["exact"] += calls.get("in", False)
        return block(*a)
    monkeypatch.setenv("HPCATTN_THREADS", "1")  # the spies' flag is per process
    monkeypatch.setattr(local, "_band_softmax", spy_band)
    monkeypatch.setattr(local, "_softmax_block", spy_block)
    mask = parse(spec)
    o, lse, _ = local.attend(to_heads(q, Hkv), np.arange(n), to_heads(k, Hkv)[:, :, 0],
                             to_heads(v, Hkv)[:, :, 0], 0, mask, scale)
    o_ref, lse_ref = reference(q, k, v, np.arange(n), mask, scale)
    o = o.transpose(0, 3, 1, 2, 4).reshape(q.shape)
    o_err, lse_err, empty_ok = errors(o, lse.reshape(1, H, n), o_ref, lse_ref)
    assert np.isfinite(o).all() and np.isfinite(lse).all() and empty_ok
    tol = 4 * float(np.finfo(np.float32).eps) * 1e3 if mode == "large_logits" else tolerance("float32")[0]
    assert o_err <= tol and lse_err <= 1e-4, (o_err, lse_err)
    if kernel == "numpy":
        assert calls["band"] > 0 and (calls["exact"] > 0) == (mode == "underflow"), calls
    else:
        assert calls["band"] == 0, calls


@needs_compiled
@pytest.mark.parametrize("variant", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("spec", ["window:40", "causal+window:40", "window:300", "causal+window:7+dilated:3:5",
                                  "global:3+window:20", "block:50+window:9", "window:5+window:40+random:3"])
@pytest.mark.parametrize("D", [16, 64, 80, 128])
@pytest.mark.parametrize("kwargs", [dict(B=2, H=6, Hkv=2, k0=100, k1=900),  # GQA, a key block
                                    dict(qpos=np.r_[150:260, 300, 301, 302, 700:717], k0=500, k1=700,
                                         H=2)])  # rows without keys, scattered rows
def test_compiled_band_matches_the_reference(rng, variant, spec, D, kwargs, monkeypatch):
    """The compiled band kernel (kernels/gather.c, each variant this CPU runs) against float64:
    N = 1001 (not a multiple of its 16-row blocks), window with and without causal and mixed
    with the other pieces, D a multiple of 16 or not (80 runs the portable loops), B, Hkv, G > 1,
    rows with no key in the block (o = 0, lse = -inf) and scattered rows."""
    if variant not in compiled_variants():
        pytest.skip(f"this CPU does not run the {variant} variant")
    calls = []
    real = cgather.band_rows

    def spy(*a):
        got = real(*a)
        calls.append(got[2])  # the variant that ran
        return got
    monkeypatch.setattr(cgather, "band_rows", spy)
    monkeypatch.setenv("HPCATTN_GATHER", variant)
    run_case(rng, spec, 1001, D=D, **kwargs)
    want = variant if variant != "avx512" or D % 16 == 0 else "avx2"
    assert calls and set(calls) == {want}


@pytest.mark.skipif(cgather.LIB is None or not cgather.band_blocked(64), reason="the band kernel's blocked loops do not run here")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("spec", ["window:40", "causal+window:300", "window:9+global:2"])
def test_compiled_band_takes_half_precision_a_chunk_at_a_time(rng, spec, dtype, monkeypatch):
    """float16 and bfloat16 inputs (the longest-context runs) go to the compiled band too: the keys a row
    chunk reaches are widened to float32 for the call (rows of 0..2W+1 edges, a key block)."""
    calls = []
    real = cgather.band_rows

    def spy(q, k, v, *a):
        calls.append((q.dtype, k.dtype, k.shape[2]))
        return real(q, k, v, *a)
    monkeypatch.setattr(cgather, "band_rows", spy)
    run_case(rng, spec, 1001, H=2, D=64, dtype=dtype, k0=100, k1=900)
    assert calls and all(kd == np.float32 and qd == np.dtype(dtype) and nk <= 800 for qd, kd, nk in calls)
