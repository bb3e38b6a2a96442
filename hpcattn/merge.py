"""The one (o, lse) merge every variant uses: associative, commutative, -inf safe."""
from .arrays import array_module


def merge(o_a, lse_a, o_b, lse_b):
    """Combine two normalised partials of the same rows over disjoint key sets.

    o_*: (..., n, D) float32, lse_*: (..., n) float32. Returns (o, lse); rows where both
    sides are empty (lse = -inf) give (0, -inf), never NaN.
    """
    xp = array_module(o_a)
    if xp.__name__ == "cupy" and o_a.shape == o_b.shape and o_a.dtype == o_b.dtype == xp.float32:
        from .gpu.merge import merge as fused  # the same formula in one kernel (kernels/merge.cu)
        return fused(o_a, lse_a, o_b, lse_b)
    lse = xp.logaddexp(lse_a, lse_b)
    ref = xp.where(xp.isneginf(lse), 0, lse)
    w_a = xp.exp(lse_a - ref)[..., None]
    w_b = xp.exp(lse_b - ref)[..., None]
    return w_a * o_a + w_b * o_b, lse


def empty_state(xp, shape, d):
    """The merge identity for rows of `shape`: o = 0, lse = -inf (float32)."""
    return xp.zeros((*shape, d), dtype=xp.float32), xp.full(shape, -xp.inf, dtype=xp.float32)
