"""The distributed forward result over one grid: every variant x mask x layout x shape, at P ranks.
Run under `mpiexec -n P python -m mpi4py -m pytest --with-mpi -m mpi` for P = 1..4.

Every rank draws the same data (one seed), takes its rows by the layout (even contiguous pieces,
random uneven contiguous pieces with empty ones allowed, or zigzag), and checks: o and lse of its
rows against the float64 reference of the whole problem (random terms bound to N, so the result
cannot depend on P), no NaN and every row written, the edge count summed over ranks exactly, the
variant recorded in stats, and for ring on contiguous pieces the exact bytes sent and received.
"""
import numpy as np
import pytest

import hpcattn
from helpers import control, uneven_offsets, world
from hpcattn import Comm
from hpcattn.dist.variants import VARIANTS
from hpcattn.masks import parse
from hpcattn.partition import even_offsets, positions, segments
from hpcattn.reference import errors, reference, tolerance

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]

MASKS = ["full", "causal", "window:6", "causal+window:17", "causal+window:40", "dilated:3:4",
         "causal+dilated:2:5", "dilated:4:3+global:2", "block:23", "block:33", "causal+block:31",
         "global:4", "global:3+window:5", "causal+global:5+window:2", "window:2+block:16+dilated:1:7",
         "random:7:5", "causal+random:4", "window:9+global:3+random:5:1", "dilated:3:4+random:2+causal"]
LAYOUTS = ["even", "uneven", "zigzag"]
# (B, N, H, Hkv, D, dtype): GQA with D a multiple of 16 or not, float16, fewer tokens than ranks
SHAPES = [(2, 203, 4, 2, 64, "float32"), (2, 211, 4, 2, 32, "float32"), (2, 130, 2, 1, 48, "float16"),
          (2, 96, 2, 1, 16, "float16"), (2, 3, 1, 1, 8, "float32")]


def rows_of(layout, N, P, r):
    """This rank's rows, and for contiguous layouts every rank's offsets (None for zigzag)."""
    if layout == "zigzag":
        return positions(segments(N, P, r, "zigzag")), None
    off = even_offsets(N, P) if layout == "even" else uneven_offsets(N, P, N + P)
    return np.arange(off[r], off[r + 1]), off


def ring_bytes(off, P, r, row):
    """(sent, received) of the ring: each other rank's K and V pass through once (P - 1 hops),
    plus the shard-size allgather."""
    size = [int(off[i + 1] - off[i]) for i in range(P)]
    sent = sum(size[(r - h) % P] for h in range(P - 1)) * row
    recv = sum(size[(r - h - 1) % P] for h in range(P - 1)) * row
    c_sent, c_recv = control(P, r, [(s, s) for s in size])
    return sent + c_sent, recv + c_recv


@pytest.mark.parametrize("B, N, H, Hkv, D, dtype", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", MASKS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_reference(variant, spec, layout, B, N, H, Hkv, D, dtype):
    P, r = world().size, world().rank
    rng = np.random.default_rng(N)
    q = rng.standard_normal((B, N, H, D)).astype(dtype)
    k = rng.standard_normal((B, N, Hkv, D)).astype(dtype)
    v = rng.standard_normal((B, N, Hkv, D)).astype(dtype)
    idx, off = rows_of(layout, N, P, r)
    comm = Comm(world())
    stats = {}
    o, lse = hpcattn.attention(q[:, idx], k[:, idx], v[:, idx], mask=spec, comm=comm, variant=variant,
                               layout="zigzag" if layout == "zigzag" else "contiguous", ranks_per_node=2,
                               stats=stats)
    mask = parse(spec, n_keys=N)
    assert o.shape == q[:, idx].shape and o.dtype == q.dtype and lse.shape == (B, H, len(idx))
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    o_ref, lse_ref = reference(q[:, idx], k, v, idx, mask, 1 / np.sqrt(D))
    o_err, lse_err, empty_ok = errors(o, lse, o_ref, lse_ref)
    o_tol, lse_tol = tolerance(dtype)
    assert empty_ok and o_err <= o_tol and lse_err <= lse_tol, (o_err, lse_err)
    assert stats["variant"] == variant
    edges = world().allreduce(stats["edges"])
    assert edges == mask.allowed(np.arange(N)[:, None], np.arange(N)[None, :]).sum()
    if variant == "ring" and off is not None:
        row = 2 * B * Hkv * D * np.dtype(dtype).itemsize
        assert (comm.bytes_sent, comm.bytes_received) == ring_bytes(off, P, r, row)
    comm.free()
