"""The local kernel's dense decode path (local._dense: few query rows over many keys that every
row reaches) and its float16 widening (jit.widen), against the float64 reference."""
import numpy as np
import pytest

from hpcattn.cpu import jit, local
from hpcattn.api import to_heads
from hpcattn.masks import parse
from hpcattn.reference import errors, reference, tolerance


def decode_case(rng, spec, n, qpos, B=1, H=1, Hkv=1, D=16, dtype="float32", k0=0, k1=None,
                boost=None):
    """attend() of rows qpos over keys [k0, k1) checked against float64; boost = (a, b, x):
    keys a..b-1 get x times the first query row of each head (late or early large scores)."""
    k1 = n if k1 is None else k1
    qpos = np.asarray(qpos)
    q = rng.standard_normal((B, len(qpos), H, D)).astype(dtype)
    k, v = (rng.standard_normal((B, n, Hkv, D)).astype(dtype) for _ in range(2))
    if boost:
        a, b, x = boost
        k[:, a:b] += (x * q[:, :1, ::H // Hkv]).astype(dtype)
    mask = parse(spec)
    o, lse, edges = local.attend(to_heads(q, Hkv), qpos, to_heads(k[:, k0:k1], Hkv)[:, :, 0],
                                 to_heads(v[:, k0:k1], Hkv)[:, :, 0], k0, mask, 0.3)
    keys = np.arange(k0, k1)
    o_ref, lse_ref = reference(q, k[:, k0:k1], v[:, k0:k1], qpos, mask, 0.3, keys=keys)
    o = o.transpose(0, 3, 1, 2, 4).reshape(q.shape)
    o_err, lse_err, empty_ok = errors(o, lse.reshape(B, H, len(qpos)), o_ref, lse_ref)
    o_tol, lse_tol = tolerance(dtype)
    assert empty_ok and o_err <= o_tol and lse_err <= lse_tol, (o_err, lse_err)
    assert edges == mask.allowed(qpos[:, None], keys[None, :]).sum()


@pytest.mark.parametrize("spec", ["full", "causal", "causal+full", "causal+window:20"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("n, qpos, kw", [
    (3000, np.arange(2984, 3000), dict(B=2, H=8, Hkv=2, D=32)),          # decode at the end, GQA
    (2500, [5, 900, 2499], dict(H=2, Hkv=1, D=64)),                     # scattered rows: part dense
    (4100, np.arange(4090, 4100), dict(D=16, k0=1000, k1=3777)),         # a ring hop's key block
])
def test_decode_path_matches_reference(rng, monkeypatch, spec, dtype, n, qpos, kw):
    monkeypatch.setattr(local, "DECODE_ELEMS", 4096)  # many key chunks, a partial last one
    decode_case(rng, spec, n, qpos, dtype=dtype, **kw)


@pytest.mark.parametrize("boost", [(2900, 2950, 3.0), (0, 40, 3.0), (1500, 1501, 6.0)])
def test_online_softmax_rescales_when_a_later_or_earlier_chunk_dominates(rng, monkeypatch, boost):
    monkeypatch.setattr(local, "DECODE_ELEMS", 2048)
    decode_case(rng, "causal", 3000, np.arange(2990, 3000), H=4, Hkv=1, D=32, boost=boost)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_online_softmax_follows_a_steadily_rising_maximum(rng, monkeypatch, dtype):
    """Keys drift towards the queries, so nearly every chunk raises the rows' maxima far past
    the lagging reference (each such chunk is redone with its maxima)."""
    monkeypatch.setattr(local, "DECODE_ELEMS", 1024)
    n, D = 4000, 32
    q = rng.standard_normal((1, 4, 2, D)).astype(dtype)
    k, v = (rng.standard_normal((1, n, 1, D)).astype(dtype) for _ in range(2))
    k[0, :, 0] += (np.linspace(0, 4, n)[:, None] * q[0, 0, 0]).astype(dtype)
    qpos = np.arange(n - 4, n)
    o, lse, _ = local.attend(to_heads(q, 1), qpos, to_heads(k, 1)[:, :, 0], to_heads(v, 1)[:, :, 0],
                             0, parse("causal"), 1.0)
    o_ref, lse_ref = reference(q, k, v, qpos, parse("causal"), 1.0)
    o_err, lse_err, ok = errors(o.transpose(0, 3, 1, 2, 4).reshape(q.shape), lse.reshape(1, 2, 4),
                                o_ref, lse_ref)
    assert lse_ref.max() > 100 and ok and o_err <= tolerance(dtype)[0] and lse_err <= 1e-4, (o_err, lse_err)


@pytest.mark.parametrize("jit_flag", ["1", "0"])
def test_widen_is_exact_for_every_float16_value(monkeypatch, jit_flag):
    monkeypatch.setenv("HPCATTN_JIT", jit_flag)
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    src = np.repeat(bits, 2).view(np.float16).reshape(2, 2, 1 << 12, 8)[..., ::2]  # strided
    out = np.full(src.shape, 7, np.float32)
    assert jit.widen(src, out) is out
    expect = src.astype(np.float32)
    assert np.array_equal(out.view(np.uint32), expect.view(np.uint32))  # NaN payloads and -0 too


def test_decode_path_is_taken_for_few_rows_only(rng, monkeypatch):
    """The branch is narrow: few rows over keys every row reaches; wide tiles keep _block."""
    calls = []
    real = local._dense
    monkeypatch.setattr(local, "_dense", lambda *a: calls.append(a[0].shape[3]) or real(*a))
    decode_case(rng, "causal", 2000, np.arange(1990, 2000))
    assert calls == [10]
    calls.clear()
    decode_case(rng, "causal", 700, np.arange(700))
    assert calls == []
