"""The distributed grid at P ranks: every variant x mask x layout x shape, forward and backward.
Run under `mpiexec -n P python -m mpi4py -m pytest --with-mpi -m mpi` for P = 1..4.

Every rank draws the same data (one seed), takes its rows by the layout (even contiguous pieces,
random uneven contiguous pieces with empty ones allowed, or zigzag), and checks against the
float64 reference of the whole problem (random terms bound to N, so the result cannot depend
on P):
- forward: o and lse of its rows, no NaN and every row written, the edge count summed over
  ranks exactly, the variant recorded in stats, and the exact bytes sent and received of ring,
  burst and tree (helpers.call_bytes, from the partition alone);
- backward, for every variant (each has one) over the same masks and layouts on fewer shapes:
  dq, dk, dv of its rows (dtype, shape, no NaN), the edges again, and the exact bytes of the
  forward and of the backward of ring, burst and tree. Nodes of 2 ranks (the two-level ring at
  P = 4) except on uneven pieces: nodes of 1 rank (every hop of burst's ring between nodes).
"""
import ml_dtypes  # noqa: F401 (NumPy then knows "bfloat16")
import numpy as np
import pytest

import hpcattn
from helpers import call_bytes, uneven_offsets, world
from hpcattn import Comm
from hpcattn.dist.variants import VARIANTS
from hpcattn.masks import parse
from hpcattn.partition import even_offsets, positions, segments
from hpcattn.reference import errors, grad_tolerance, reference, reference_backward, tolerance

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]

MASKS = ["full", "causal", "window:6", "causal+window:17", "causal+window:40", "dilated:3:4",
         "causal+dilated:2:5", "dilated:4:3+global:2", "block:23", "block:33", "causal+block:31",
         "global:4", "global:3+window:5", "causal+global:5+window:2", "window:2+block:16+dilated:1:7",
         "random:7:5", "causal+random:4", "window:9+global:3+random:5:1", "dilated:3:4+random:2+causal"]
LAYOUTS = ["even", "uneven", "zigzag"]
# (B, N, H, Hkv, D, dtype): GQA with D a multiple of 16 or not, float16, bfloat16, fewer tokens than ranks
SHAPES = [(2, 203, 4, 2, 64, "float32"), (2, 211, 4, 2, 32, "float32"), (2, 130, 2, 1, 48, "float16"),
          (2, 96, 2, 1, 16, "bfloat16"), (2, 3, 1, 1, 8, "float32")]
BACKWARD_SHAPES = [(2, 97, 4, 2, 24, "float32"), (1, 64, 2, 1, 16, "bfloat16"), (2, 3, 2, 1, 8, "float32")]


def rows_of(layout, N, P, r):
    """This rank's rows, and every rank's row count."""
    if layout == "zigzag":
        return positions(segments(N, P, r, "zigzag")), [len(positions(segments(N, P, i, "zigzag")))
                                                         for i in range(P)]
    off = even_offsets(N, P) if layout == "even" else uneven_offsets(N, P, N + P)
    return np.arange(off[r], off[r + 1]), [int(off[i + 1] - off[i]) for i in range(P)]


def problem(B, N, H, Hkv, D, dtype):
    rng = np.random.default_rng(N)
    q = rng.standard_normal((B, N, H, D)).astype(dtype)
    k = rng.standard_normal((B, N, Hkv, D)).astype(dtype)
    v = rng.standard_normal((B, N, Hkv, D)).astype(dtype)
    return q, k, v


def check_forward(o, lse, q, k, v, idx, mask, D, dtype):
    assert o.shape == q[:, idx].shape and o.dtype == q.dtype and lse.shape == (q.shape[0], q.shape[2], len(idx))
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    o_ref, lse_ref = reference(q[:, idx], k, v, idx, mask, 1 / np.sqrt(D))
    o_err, lse_err, empty_ok = errors(o, lse, o_ref, lse_ref)
    o_tol, lse_tol = tolerance(dtype)
    assert empty_ok and o_err <= o_tol and lse_err <= lse_tol, (o_err, lse_err)


def grad_error(got, ref, idx):
    """max |got - ref[idx]| / max(max |ref| over all rows, 0.01): a rank's rows may all have zero
    gradients (a causal row 0 alone: dq = 0), and so may every row (a mask leaving only the
    diagonal, as dilated terms do at N = 3): rounding noise is all there is to measure then."""
    return float(np.max(np.abs(got - ref[:, idx]), initial=0.0) / max(np.abs(ref).max(initial=0.0), 1e-2))


def all_edges(mask, N):
    return mask.allowed(np.arange(N)[:, None], np.arange(N)[None, :]).sum()


@pytest.mark.parametrize("B, N, H, Hkv, D, dtype", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", MASKS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_reference(variant, spec, layout, B, N, H, Hkv, D, dtype):
    P, r = world().size, world().rank
    q, k, v = problem(B, N, H, Hkv, D, dtype)
    idx, rows = rows_of(layout, N, P, r)
    comm = Comm(world())
    stats = {}
    o, lse = hpcattn.attention(q[:, idx], k[:, idx], v[:, idx], mask=spec, comm=comm, variant=variant,
                               layout="zigzag" if layout == "zigzag" else "contiguous", ranks_per_node=2,
                               stats=stats)
    mask = parse(spec, n_keys=N)
    check_forward(o, lse, q, k, v, idx, mask, D, dtype)
    assert stats["variant"] == variant
    assert world().allreduce(stats["edges"]) == all_edges(mask, N)
    want = call_bytes(variant, P, 2, r, rows, B, H, Hkv, D, np.dtype(dtype).itemsize)
    if want is not None:
        assert (comm.bytes_sent, comm.bytes_received) == want[0]
    comm.free()


@pytest.mark.parametrize("B, N, H, Hkv, D, dtype", BACKWARD_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", MASKS)
@pytest.mark.parametrize("variant", sorted(v for v, m in VARIANTS.items() if hasattr(m, "backward")))
def test_backward_matches_reference(variant, spec, layout, B, N, H, Hkv, D, dtype):
    P, r = world().size, world().rank
    q, k, v = problem(B, N, H, Hkv, D, dtype)
    do = np.random.default_rng(N + 1).standard_normal(q.shape).astype(dtype)
    idx, rows = rows_of(layout, N, P, r)
    K = 1 if layout == "uneven" else 2
    comm = Comm(world())
    kw = dict(mask=spec, comm=comm, variant=variant, layout="zigzag" if layout == "zigzag" else "contiguous",
              ranks_per_node=K)
    o, lse = hpcattn.attention(q[:, idx], k[:, idx], v[:, idx], **kw)
    fwd = comm.bytes_sent, comm.bytes_received
    stats = {}
    dq, dk, dv = hpcattn.attention_backward(q[:, idx], k[:, idx], v[:, idx], o, lse, do[:, idx], stats=stats, **kw)
    mask = parse(spec, n_keys=N)
    check_forward(o, lse, q, k, v, idx, mask, D, dtype)
    want = reference_backward(q, k, v, do, np.arange(N), mask, 1 / np.sqrt(D))
    for name, got, ref, like in (("dq", dq, want[0], q), ("dk", dk, want[1], k), ("dv", dv, want[2], v)):
        assert got.shape == like[:, idx].shape and got.dtype == like.dtype and not np.isnan(got).any(), name
        err = grad_error(got, ref, idx)
        assert err <= grad_tolerance(dtype), (name, err)
    assert stats["variant"] == variant
    assert world().allreduce(stats["edges"]) == all_edges(mask, N)
    bytes_ = call_bytes(variant, P, K, r, rows, B, H, Hkv, D, np.dtype(dtype).itemsize)
    if bytes_ is not None:
        assert fwd == bytes_[0]
        assert (comm.bytes_sent - fwd[0], comm.bytes_received - fwd[1]) == bytes_[1]
    comm.free()
