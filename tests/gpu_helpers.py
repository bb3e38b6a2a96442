"""Shared by the GPU tests: skip reasons, bfloat16 bit patterns, float64 reference backward."""
import numpy as np
import pytest


def cupy_or_skip():
    """cupy with at least one device, or skip the calling module with the reason."""
    try:
        import cupy
    except Exception as e:  # ImportError or a broken CUDA install
        pytest.skip(f"GPU TESTS SKIPPED: CuPy does not import ({type(e).__name__}: {e})",
                    allow_module_level=True)
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        pytest.skip(f"GPU TESTS SKIPPED: no CUDA device ({type(e).__name__}: {e})", allow_module_level=True)
    if n == 0:
        pytest.skip("GPU TESTS SKIPPED: CuPy sees no CUDA device", allow_module_level=True)
    return cupy


def bf16_bits(x):
    """(uint16 bfloat16 bit patterns, their float32 values) of x, rounded to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def local_reference(q, k, v, qpos, k0, mask, scale):
    """Float64 (o, lse) in the kernel layout over the keys k0..k0+nk-1 (-inf, 0 for no edge)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    allowed = mask.allowed(np.asarray(qpos)[:, None], np.arange(k0, k0 + k.shape[2])[None, :])
    s = np.where(allowed, scale * np.einsum("bhgqd,bhkd->bhgqk", q, k), -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m0 = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - m0)
    den = e.sum(axis=-1, keepdims=True)
    o = np.einsum("bhgqk,bhkd->bhgqd", e / np.where(den > 0, den, 1), v)
    with np.errstate(divide="ignore"):
        return o, (m0 + np.log(den))[..., 0]


def full_backward(q, k, v, do, qpos, mask, scale):
    """Float64 (o, lse, dq, dk, dv) over all keys 0..nk-1 in the kernel layout."""
    q, k, v, do = (np.asarray(a, dtype=np.float64) for a in (q, k, v, do))
    nk = k.shape[2]
    allowed = mask.allowed(np.asarray(qpos)[:, None], np.arange(nk)[None, :])
    s = np.where(allowed, scale * np.einsum("bhgqd,bhkd->bhgqk", q, k), -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m0 = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - m0)
    den = e.sum(axis=-1, keepdims=True)
    p = e / np.where(den > 0, den, 1)
    with np.errstate(divide="ignore"):
        lse = (m0 + np.log(den))[..., 0]
    o = np.einsum("bhgqk,bhkd->bhgqd", p, v)
    delta = (do * o).sum(-1)
    dp = np.einsum("bhgqd,bhkd->bhgqk", do, v)
    ds = p * (dp - delta[..., None])
    dq = scale * np.einsum("bhgqk,bhkd->bhgqd", ds, k)
    dk = scale * np.einsum("bhgqk,bhgqd->bhkd", ds, q)
    dv = np.einsum("bhgqk,bhgqd->bhkd", p, do)
    return o, lse, delta, dq, dk, dv


def rel_err(a, ref):
    a = np.asarray(a, dtype=np.float64)
    if np.isnan(a).any():
        return np.inf
    return float(np.max(np.abs(a - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-30))
