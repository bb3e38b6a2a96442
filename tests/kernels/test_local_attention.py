"""One process: the local kernel and the API against the float64 reference."""
import numpy as np
import pytest
from mpi4py import MPI

import hpcattn
from hpcattn.cpu import local
from hpcattn.api import to_heads
from hpcattn.masks import parse
from hpcattn.reference import errors, reference, tolerance


def check(o, lse, q, k, v, qpos, spec, scale):
    o_ref, lse_ref = reference(q, k, v, qpos, parse(spec), scale)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.dtype == np.float32
    o_err, lse_err, empty_ok = errors(o, lse, o_ref, lse_ref)
    o_tol, lse_tol = tolerance(q.dtype)
    assert empty_ok and o_err <= o_tol and lse_err <= lse_tol, (o_err, lse_err)
    return lse_ref


@pytest.mark.parametrize("spec", ["full", "causal", "window:7", "causal+window:33", "dilated:3:5",
                                  "block:50", "global:4+window:2", "causal+global:5"])
@pytest.mark.parametrize("B,N,H,Hkv,D,dtype", [(1, 300, 1, 1, 64, "float32"),
                                               (2, 257, 4, 2, 48, "float32"),
                                               (1, 513, 6, 2, 128, "float16"),
                                               (1, 301, 4, 1, 64, "bfloat16")])
def test_attention_one_rank_matches_reference(rng, spec, B, N, H, Hkv, D, dtype):
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, D)))
    stats = {}
    o, lse = hpcattn.attention(q, k, v, mask=spec, comm=MPI.COMM_SELF, stats=stats)
    check(o, lse, q, k, v, np.arange(N), spec, 1 / np.sqrt(D))
    assert stats["variant"] == "ring" and stats["edges"] == parse(spec).allowed(
        np.arange(N)[:, None], np.arange(N)[None, :]).sum()


def test_decode_queries_at_the_end_and_rows_without_edges(rng):
    N, D = 700, 32
    q, k, v = (rng.standard_normal(s).astype("float32") for s in ((1, 5, 2, D), (1, N, 1, D), (1, N, 1, D)))
    qpos = np.array([0, 3, 650, 698, 699])
    spec = "block:10+causal"
    o, lse = hpcattn.attention(q, k, v, mask=spec, comm=MPI.COMM_SELF, q_positions=qpos)
    check(o, lse, q, k, v, qpos, spec, 1 / np.sqrt(D))
    # window:0 on keys [100, 200) leaves query 5 with no edge: o = 0, lse = -inf
    qh = to_heads(q, 1)
    kh, vh = to_heads(k[:, 100:200], 1)[:, :, 0], to_heads(v[:, 100:200], 1)[:, :, 0]
    po, pl, edges = local.attend(qh, np.array([5, 100, 150, 199, 200]), kh, vh, 100, parse("window:0"), 0.1)
    assert edges == 3 and np.isneginf(pl[..., [0, 4]]).all() and (po[..., [0, 4], :] == 0).all()
    assert np.isfinite(pl[..., 1:4]).all()


def test_large_logits_stay_finite(rng):
    N, D = 200, 16
    q, k, v = (rng.standard_normal(s).astype("float32") * 30 for s in ((1, N, 1, D), (1, N, 1, D), (1, N, 1, D)))
    o, lse = hpcattn.attention(q, k, v, mask="causal", comm=MPI.COMM_SELF)
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    check(o, lse, q, k, v, np.arange(N), "causal", 0.25)


@pytest.mark.parametrize("shapes, words", [
    (((1, 8, 2, 4), (1, 8, 3, 4), (1, 8, 3, 4)), "multiple of kv heads"),
    (((1, 8, 2, 4), (1, 8, 2, 4), (1, 9, 2, 4)), "same shape"),
    (((1, 8, 2), (1, 8, 2, 4), (1, 8, 2, 4)), "4-D"),
    (((1, 8, 2, 4), (2, 8, 2, 4), (2, 8, 2, 4)), "disagree")])
def test_bad_shapes_raise_a_clear_error(shapes, words):
    q, k, v = (np.zeros(s, "float32") for s in shapes)
    with pytest.raises(hpcattn.HpcattnError, match=words):
        hpcattn.attention(q, k, v, comm=MPI.COMM_SELF)


def test_mixed_or_unsupported_dtypes_are_refused():
    q = np.zeros((1, 4, 1, 8), "float64")
    with pytest.raises(hpcattn.HpcattnError, match="dtype"):
        hpcattn.attention(q, q, q, comm=MPI.COMM_SELF)
    with pytest.raises(hpcattn.HpcattnError, match="dtype"):
        hpcattn.attention(q.astype("float32"), q.astype("float16"), q.astype("float16"), comm=MPI.COMM_SELF)


class CountingComm(hpcattn.Comm):
    """A one-rank hpcattn Comm that records every MPI method the call reaches."""

    def __init__(self):
        super().__init__(MPI.COMM_SELF)
        self.touched = []
        for name in ("allgather_object", "exchange", "allreduce", "split", "bcast", "barrier"):
            method = getattr(self, name)
            setattr(self, name, lambda *a, _n=name, _m=method, **kw: (self.touched.append(_n), _m(*a, **kw))[1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("spec", ["window:40", "causal", "full", "dilated:2:5+global:3"])
def test_one_rank_takes_the_direct_path_without_traffic(rng, spec, dtype):
    """P = 1: the kernel alone, o written in the caller's layout and dtype, and no byte, no
    collective and no variant exchange on the communicator, forward or backward."""
    B, N, H, Hkv, D = 2, 301, 4, 2, 32
    q, k, v, do = (rng.standard_normal(s).astype(dtype) for s in ((B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, D),
                                                                 (B, N, H, D)))
    comm = CountingComm()
    stats = {}
    o, lse = hpcattn.attention(q, k, v, mask=spec, comm=comm, stats=stats)
    check(o, lse, q, k, v, np.arange(N), spec, 1 / np.sqrt(D))
    assert o.flags.c_contiguous and lse.flags.c_contiguous
    grads = hpcattn.attention_backward(q, k, v, o, lse, do, mask=spec, comm=comm)
    assert [g.dtype for g in grads] == [q.dtype] * 3 and [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert (comm.bytes_sent, comm.bytes_received, comm.comm_s, comm.touched) == (0, 0, 0.0, [])
    assert stats["variant"] == "ring" and stats["compute_s"] > 0
    comm.free()


def test_positions_of_a_layout_are_built_once():
    """The positions of a layout's ranges are cached by the ranges: a second call with the same
    layout gets the same read-only array (no per-call O(N) work, device copies reused)."""
    from hpcattn.partition import positions
    a, b = positions([(0, 5), (9, 12)]), positions([(0, 5), (9, 12)])
    assert a is b and not a.flags.writeable and a.tolist() == [0, 1, 2, 3, 4, 9, 10, 11]
    assert positions([]).size == 0
