"""Shared by the GPU tests: skip reasons, bfloat16 bit patterns, float64 reference backward, and
the offline NVRTC build of a kernel source (once per test run)."""
import functools

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


@functools.cache
def nvrtc_build(lib, source):
    """offline.nvrtc_compile of every name expression of a kernels/ source, with its cubin: (return
    code, log, cubin, {name: mangled}). test_gpu_build checks the log, test_gpu_sass the SASS of
    the same build (the one-pass backward's 32 kernels alone take about 2 minutes on 2 cores)."""
    from hpcattn.gpu import loader, offline
    return offline.nvrtc_compile(lib, source, loader.every_name(source), cubin=True)


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
    """Float64 (o, lse, delta, dq, dk, dv, (|dq|, |dk|)) over all keys 0..nk-1 in the kernel
    layout. |dq|, |dk| are the same sums over absolute values, dS taken as P (|dO| |V|^T + |D|):
    the size of the terms that cancel, which bounds a float32 kernel's rounding (see grad_err)."""
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
    ds_abs = p * (np.einsum("bhgqd,bhkd->bhgqk", abs(do), abs(v)) + abs(delta)[..., None])
    mags = (scale * np.einsum("bhgqk,bhkd->bhgqd", ds_abs, abs(k)),
            scale * np.einsum("bhgqk,bhgqd->bhkd", ds_abs, abs(q)))
    return o, lse, delta, dq, dk, dv, mags


def grad_err(a, ref, mag):
    """rel_err of a gradient, its denominator floored at 1% of max |mag| (the size of the terms
    summed). A gradient that cancels to zero (window:0: one key per row, so dS = P (dP - D) = 0
    exactly) would otherwise be judged by float32 rounding (~1e-7 |mag|) over a float64 ~1e-16;
    for the other masks max|ref| is 4-13x below max|mag|, so the floor never binds there."""
    a = np.asarray(a, dtype=np.float64)
    if np.isnan(a).any():
        return np.inf
    den = max(np.max(np.abs(ref), initial=0.0), 1e-2 * np.max(mag, initial=0.0), 1e-30)
    return float(np.max(np.abs(a - ref), initial=0.0) / den)


def rel_err(a, ref):
    a = np.asarray(a, dtype=np.float64)
    if np.isnan(a).any():
        return np.inf
    return float(np.max(np.abs(a - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-30))
