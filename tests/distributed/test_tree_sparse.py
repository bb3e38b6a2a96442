"""Under MPI: tree (decode) and sparse (mask-aware) against the float64 reference, with
exact byte counts computed here from the partition and the mask; auto's choice; decode files.
Their forward and backward results over every mask and layout, on self-attention shards, are
in test_grid.py; here: decode rows, the tree combines' bytes, sparse's bytes.

Run under `mpiexec -n P python -m mpi4py -m pytest --with-mpi -m mpi` for P = 1..4.
"""
import pickle

import h5py
import numpy as np
import pytest

import hpcattn
from helpers import control, expected_bytes, shard_data, tree_bytes, uneven_offsets, world
from hpcattn import Comm
from hpcattn.masks import parse
from hpcattn.partition import even_offsets
from hpcattn.reference import errors, reference, tolerance
from hpcattn.commands.run import run
from hpcattn.dist.variants import sparse

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]


def problem(N, Nq, H, Hkv, D, dtype, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, Nq, H, D)).astype(dtype)
    k = rng.standard_normal((2, N, Hkv, D)).astype(dtype)
    v = rng.standard_normal((2, N, Hkv, D)).astype(dtype)
    return q, k, v


def check(o, lse, q, k, v, qpos, spec, D):
    mask = spec if not isinstance(spec, str) else parse(spec)
    o_ref, lse_ref = reference(q, k, v, qpos, mask, 1 / np.sqrt(D))
    o_err, lse_err, empty_ok = errors(o, lse, o_ref, lse_ref)
    o_tol, lse_tol = tolerance(q.dtype)
    assert empty_ok and o_err <= o_tol and lse_err <= lse_tol, (o_err, lse_err)


@pytest.mark.parametrize("spec", ["full", "causal", "causal+window:40", "global:3+block:50"])
@pytest.mark.parametrize("variant", ["tree", "sparse"])
def test_decode_rows_match_reference(spec, variant):
    """A few queries near the end, with keys and queries split unevenly and independently."""
    P, r = world().size, world().rank
    N, Nq, D = 301, 6, 16
    q, k, v = problem(N, Nq, 4, 2, D, "float32", 7)
    qpos_all = np.array([1, 150, 297, 298, 299, 300])
    kv, qo = uneven_offsets(N, P, 11 + P), uneven_offsets(Nq, P, 12 + P)
    sl = slice(qo[r], qo[r + 1])
    o, lse = hpcattn.attention(q[:, sl], k[:, kv[r]:kv[r + 1]], v[:, kv[r]:kv[r + 1]], mask=spec,
                               comm=world(), variant=variant, q_positions=qpos_all[sl])
    check(o, lse, q[:, sl], k, v, qpos_all[sl], spec, D)


@pytest.mark.parametrize("method", ["packed", "three"])
@pytest.mark.parametrize("rpn", [None, 2, 3])
def test_tree_bytes_are_exact_and_independent_of_n(method, rpn):
    from hpcattn.dist.variants import tree
    P, r = world().size, world().rank
    Nq, H, Hkv, D, B = 5, 4, 2, 8, 2
    results = []
    for N in (40, 4000):
        q, k, v = problem(N, Nq, H, Hkv, D, "float32", 3)
        kv, qo = uneven_offsets(N, P, P), uneven_offsets(Nq, P, P + 1)
        qpos = np.arange(N - Nq, N)
        comm = Comm(world())
        shard = hpcattn.api.Shard(hpcattn.api.to_heads(q[:, qo[r]:qo[r + 1]], Hkv), qpos[qo[r]:qo[r + 1]],
                                  hpcattn.api.to_heads(k[:, kv[r]:kv[r + 1]], Hkv)[:, :, 0],
                                  hpcattn.api.to_heads(v[:, kv[r]:kv[r + 1]], Hkv)[:, :, 0],
                                  kv, parse("causal"), 0.3, q_offsets=qo, ranks_per_node=rpn)
        o, lse = tree.forward(comm, shard, method)
        o_ref, lse_ref = reference(q[:, qo[r]:qo[r + 1]], k, v, shard.qpos, parse("causal"), 0.3)
        assert errors(hpcattn.api.from_heads(o, "float32"), lse.reshape(B, H, -1), o_ref, lse_ref)[0] < 1e-5
        results.append((comm.bytes_sent, comm.bytes_received))
        fwd, _ = tree_bytes(P, rpn, r, np.diff(qo).tolist(), B, H, D, 4, method)
        assert (comm.bytes_sent, comm.bytes_received) == fwd
        comm.free()
    assert results[0] == results[1]  # per-rank bytes do not depend on N


def reached(mask, qpos, n):
    """Bool (n,) of the keys any of the rows qpos has an edge to (dense, from mask.allowed)."""
    if not len(qpos):
        return np.zeros(n, dtype=bool)
    return mask.allowed(np.asarray(qpos)[:, None], np.arange(n)[None, :]).any(axis=0)


def runs(flags):
    """Number of maximal runs of True."""
    f = np.concatenate([[False], flags])
    return int((f[1:] & ~f[:-1]).sum())


@pytest.mark.parametrize("spec", ["window:6", "causal+window:17", "block:23", "causal+block:31",
                                  "dilated:3:4", "global:4+window:3", "causal+global:5+window:2", "causal"])
def test_sparse_bytes_equal_the_rows_the_mask_reaches(spec):
    """Each rank receives exactly the key rows its rows reach outside its shard (and sends the
    rows others reach in it), plus 16 bytes per requested interval and the count exchange."""
    P, r = world().size, world().rank
    N, H, Hkv, D, B = 187, 2, 1, 8, 2
    q, k, v = problem(N, N, H, Hkv, D, "float32", 5)
    off = uneven_offsets(N, P, 40 + P)
    mask = parse(spec)
    comm = Comm(world())
    a, b = off[r], off[r + 1]
    o, lse = hpcattn.attention(q[:, a:b], k[:, a:b], v[:, a:b], mask=spec, comm=comm, variant="sparse")
    check(o, lse, q[:, a:b], k, v, np.arange(a, b), spec, D)
    pieces = [(int(off[i + 1] - off[i]),) * 2 for i in range(P)]
    sent, recv = control(len(pieces), r, pieces)
    if P > 1:
        row = 2 * B * Hkv * D * 4
        rank_rows = [np.arange(off[s], off[s + 1]) for s in range(P)]
        wide = [sparse.wide_rows(mask, p) for p in rank_rows]
        if wide[0] is not None:  # rows reaching everything go the tree way
            counts = [int(w.sum()) for w in wide]
            sent += len(pickle.dumps(counts[r])) * (P - 1)
            recv += sum(len(pickle.dumps(c)) for i, c in enumerate(counts) if i != r)
            if sum(counts):
                qrow = B * H * D * 4 + 8
                sent += counts[r] * qrow * (P - 1)
                recv += (sum(counts) - counts[r]) * qrow
                sent += B * H * sum(counts) * 4 * (D + 1)
                recv += B * H * sum(counts) * 4 * (D + 1)
            rank_rows = [p[~w] for p, w in zip(rank_rows, wide)]
        reach = [reached(mask, p, N) for p in rank_rows]
        for s in range(P):
            if s == r:
                continue
            mine = reach[s][off[r]:off[r + 1]]  # what s needs from me
            theirs = reach[r][off[s]:off[s + 1]]  # what I need from s
            sent += 16 * runs(theirs) + row * int(mine.sum())
            recv += 16 * runs(mine) + row * int(theirs.sum())
        sent += 8 * (P - 1)
        recv += 8 * (P - 1)
    assert (comm.bytes_sent, comm.bytes_received) == (sent, recv)
    comm.free()


def test_auto_records_its_choice():
    P, r = world().size, world().rank
    N, D = 400, 8
    q, k, v = problem(N, N, 2, 1, D, "float32", 9)
    off = even_offsets(N, P)
    sl = slice(off[r], off[r + 1])
    expect = {"causal+window:10": "sparse", "causal": "burst", "block:20+global:2": "sparse"}
    for spec, want in expect.items():
        stats = {}
        o, lse = hpcattn.attention(q[:, sl], k[:, sl], v[:, sl], mask=spec, comm=world(), stats=stats)
        assert stats["variant"] == (want if P > 1 else "ring")
        check(o, lse, q[:, sl], k, v, np.arange(off[r], off[r + 1]), spec, D)
    qo = even_offsets(3, P)
    qpos = np.array([397, 398, 399])[qo[r]:qo[r + 1]]
    stats = {}
    hpcattn.attention(q[:, qo[r]:qo[r + 1]], k[:, sl], v[:, sl], mask="causal", comm=world(),
                      q_positions=qpos, stats=stats)
    assert stats["variant"] == ("tree" if P > 1 else "ring")


@pytest.mark.parametrize("variant", ["tree", "auto", "sparse"])
def test_decode_file_re_read_from_disk(mpi_tmp_path, variant):
    """`hpcattn gen --queries` puts q_positions at the end; the run's file holds every row."""
    inp, out = mpi_tmp_path / "dec.h5", mpi_tmp_path / f"dec_{variant}.h5"
    if world().rank == 0:
        from hpcattn.commands.gen import generate
        generate(inp, 5000, queries=5, heads=4, kv_heads=2, head_dim=16, dtype="float16", seed=2)
    world().Barrier()
    comm = Comm(world())
    per_rank, attrs = run(str(inp), str(out), "causal", comm, variant, ranks_per_node=2)
    world().Barrier()
    with h5py.File(out, "r") as f, h5py.File(inp, "r") as g:
        assert f.attrs["complete"] == 1
        assert f.attrs["variant"] == (variant if variant != "auto" else "tree" if world().size > 1 else "ring")
        assert g["q_positions"][...].tolist() == list(range(4995, 5000))
        o_ref, lse_ref = reference(g["q"][...], g["k"][...], g["v"][...], g["q_positions"][...],
                                   parse("causal"), f.attrs["scale"])
        o_err, lse_err, ok = errors(f["o"][...], f["lse"][...], o_ref, lse_ref)
        assert ok and o_err < 4e-3 and lse_err < 1e-5
        assert f["stats"]["edges"][...].sum() == sum(range(4996, 5001)) and (f["stats"]["attn_s"][...] > 0).all()
    comm.free()


def test_tree_backward_matches_reference():
    """Decode backward: dQ partials summed across ranks, dK, dV stay with their owners."""
    from hpcattn.reference import grad_error, grad_tolerance, reference_backward
    P, r = world().size, world().rank
    N, Nq, D = 211, 5, 16
    q, k, v = problem(N, Nq, 4, 2, D, "float32", 13)
    do = np.random.default_rng(14).standard_normal(q.shape).astype("float32")
    qpos_all = np.array([3, 100, 208, 209, 210])
    kv, qo = uneven_offsets(N, P, 70 + P), uneven_offsets(Nq, P, 71 + P)
    sq, sk = slice(qo[r], qo[r + 1]), slice(kv[r], kv[r + 1])
    args = dict(mask="causal+global:2+window:50", comm=world(), variant="tree", q_positions=qpos_all[sq])
    o, lse = hpcattn.attention(q[:, sq], k[:, sk], v[:, sk], **args)
    dq, dk, dv = hpcattn.attention_backward(q[:, sq], k[:, sk], v[:, sk], o, lse, do[:, sq], **args)
    rq, rk, rv = reference_backward(q, k, v, do, qpos_all, parse(args["mask"]), 1 / np.sqrt(D))
    for name, got, want in (("dq", dq, rq[:, sq]), ("dk", dk, rk[:, sk]), ("dv", dv, rv[:, sk])):
        assert grad_error(got, want) <= grad_tolerance("float32"), name


@pytest.mark.parametrize("spec", ["window:6", "causal+window:17", "dilated:3:4", "block:23",
                                  "global:4+window:3", "causal+global:5+window:2", "full"])
def test_sparse_backward_bytes(spec):
    """Sparse's backward moves the forward's traffic again plus the halo rows' dK, dV back to
    their owners (float32), exactly, on uneven contiguous shards; dQ, dK, dV against float64
    (every layout and dtype: the grid)."""
    from hpcattn.reference import grad_error, grad_tolerance, reference_backward
    P, r = world().size, world().rank
    N, H, Hkv, D, dtype = 143, 4, 2, 16, "float32"
    q, k, v = problem(N, N, H, Hkv, D, dtype, 8)
    do = np.random.default_rng(9).standard_normal(q.shape).astype(dtype)
    off = uneven_offsets(N, P, 60 + P)
    rows = np.arange(off[r], off[r + 1])
    comm = Comm(world())
    args = dict(mask=spec, comm=comm, variant="sparse")
    o, lse = hpcattn.attention(q[:, rows], k[:, rows], v[:, rows], **args)
    before = comm.bytes_sent, comm.bytes_received
    stats = {}
    dq, dk, dv = hpcattn.attention_backward(q[:, rows], k[:, rows], v[:, rows], o, lse, do[:, rows],
                                            stats=stats, **args)
    rq, rk, rv = reference_backward(q, k, v, do, np.arange(N), parse(spec), 1 / np.sqrt(D))
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert got.dtype == q.dtype and grad_error(got, want[:, rows]) <= grad_tolerance(dtype), name
    mask = parse(spec)
    assert world().allreduce(stats["edges"]) == mask.allowed(np.arange(N)[:, None], np.arange(N)[None, :]).sum()
    if P > 1 and sparse.wide_rows(mask, rows) is None:
        # backward = the forward's traffic again (shard sizes, requests, K/V rows in dtype), plus
        # the received rows' dK, dV going back to their owners as float32
        row_back = 2 * 2 * Hkv * D * 4
        reach = [reached(mask, np.arange(off[s], off[s + 1]), N) for s in range(P)]
        served = sum(int(reach[s][off[r]:off[r + 1]].sum()) for s in range(P) if s != r)
        got = sum(int(reach[r][off[s]:off[s + 1]].sum()) for s in range(P) if s != r)
        assert comm.bytes_sent - before[0] == before[0] + got * row_back
        assert comm.bytes_received - before[1] == before[1] + served * row_back
    comm.free()


@pytest.mark.parametrize("spec", ["window:3+global:2+random:3:7", "causal+random:5", "random:2+block:10"])
def test_sparse_listed_columns(spec):
    """random/csr: each rank fetches exactly the listed columns its rows reach (BigBird)."""
    P, r = world().size, world().rank
    N, D = 301, 16
    q, k, v = problem(N, N, 2, 1, D, "float32", 21)
    off = uneven_offsets(N, P, 80 + P)
    a, b = off[r], off[r + 1]
    mask = parse(spec, n_keys=N)
    comm = Comm(world())
    o, lse = hpcattn.attention(q[:, a:b], k[:, a:b], v[:, a:b], mask=mask, comm=comm, variant="sparse")
    check(o, lse, q[:, a:b], k, v, np.arange(a, b), mask, D)
    rows = np.arange(a, b)
    wide = sparse.wide_rows(mask, rows)
    need = reached(mask, rows if wide is None else rows[~wide], N)
    need[a:b] = False
    row = 2 * 2 * D * 4  # (B = 2) x (k, v) x D float32
    assert comm.bytes_received >= int(need.sum()) * row
    comm.free()


def test_sparse_with_idle_ranks():
    """Ranks with empty shards, or whose rows reach nothing outside, still join every exchange."""
    P, r = world().size, world().rank
    N, D = 120, 8
    q, k, v = problem(N, N, 2, 1, D, "float32", 31)
    off = np.array([0] + [min(N, 40 * i) for i in range(P)], dtype=np.int64)  # rank 0 empty
    off[-1] = N
    a, b = off[r], off[r + 1]
    for spec in ("block:40", "window:2", "global:3+block:40"):
        o, lse = hpcattn.attention(q[:, a:b], k[:, a:b], v[:, a:b], mask=spec, comm=world(),
                                   variant="sparse")
        check(o, lse, q[:, a:b], k, v, np.arange(a, b), spec, D)


@pytest.mark.parametrize("spec, queries, variant", [("causal+window:40", None, "auto"),
                                                    ("window:30+global:3", None, "sparse"),
                                                    ("causal", 4, "auto")])
def test_run_backward_file(mpi_tmp_path, spec, queries, variant):
    """`run --backward` with sparse and tree (auto's picks): dq, dk, dv re-read from disk."""
    from hpcattn.reference import grad_error, reference_backward
    inp, out = mpi_tmp_path / "bw.h5", mpi_tmp_path / f"bw_{variant}_{queries}.h5"
    if world().rank == 0:
        from hpcattn.commands.gen import generate
        generate(inp, 900, queries=queries, heads=2, kv_heads=1, head_dim=16, seed=4, backward=True)
    world().Barrier()
    comm = Comm(world())
    run(str(inp), str(out), spec, comm, variant, backward=True)
    world().Barrier()
    with h5py.File(out, "r") as f, h5py.File(inp, "r") as g:
        qpos = g["q_positions"][...] if "q_positions" in g else np.arange(900)
        want = reference_backward(g["q"][...], g["k"][...], g["v"][...], g["do"][...], qpos, parse(spec),
                                  f.attrs["scale"])
        if world().size > 1:
            assert f.attrs["variant"] == ("tree" if queries else "sparse")
        for name, ref in zip(("dq", "dk", "dv"), want):
            assert grad_error(f[name][...], ref) < 1e-4, name
    comm.free()


@pytest.mark.parametrize("H, Hkv, dtype, want", [(8, 2, "float32", "ring"), (6, 2, "float16", "ring"),
                                                 (4, 4, "float32", "burst")])
def test_auto_backward_picks_the_variant_moving_fewer_bytes(H, Hkv, dtype, want):
    """Backward under auto: ring when the query side (G = H / Hkv heads) outweighs the key side,
    burst otherwise; the choice is in stats, the gradients match float64 on uneven zigzag
    shards, and the bytes are exactly the chosen variant's (helpers.expected_bytes)."""
    from hpcattn.partition import positions
    from hpcattn.reference import grad_error, grad_tolerance, reference_backward
    P, r = world().size, world().rank
    N, B, D, spec = 131, 1, 16, "causal"
    q, k, v, do, layout, segs = shard_data(N, B, H, Hkv, D, dtype, spec, 5)
    idx = positions(segs[r])
    comm = Comm(world())
    kw = dict(mask=spec, comm=comm, variant="auto", layout=layout, ranks_per_node=P)  # one node
    fwd_stats, bwd_stats = {}, {}
    o, lse = hpcattn.attention(q[:, idx], k[:, idx], v[:, idx], stats=fwd_stats, **kw)
    before = comm.bytes_sent, comm.bytes_received
    dq, dk, dv = hpcattn.attention_backward(q[:, idx], k[:, idx], v[:, idx], o, lse, do[:, idx],
                                            stats=bwd_stats, **kw)
    assert fwd_stats["variant"] == ("burst" if P > 1 else "ring")
    assert bwd_stats["variant"] == (want if P > 1 else "ring")
    want_grads = reference_backward(q, k, v, do, np.arange(N), parse(spec), 1 / np.sqrt(D))
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), want_grads):
        assert not np.isnan(got).any() and grad_error(got, ref[:, idx]) <= grad_tolerance(dtype), name
    sizes = [(len(positions(s)),) * 2 for s in segs]
    rows = [s[0] for s in sizes]
    _, bwd = expected_bytes(bwd_stats["variant"], P, P, r, rows, rows, B, H, Hkv, D, np.dtype(dtype).itemsize)
    c_sent, c_recv = control(P, r, sizes)
    assert (comm.bytes_sent - before[0], comm.bytes_received - before[1]) == (bwd[0] + c_sent, bwd[1] + c_recv)
    comm.free()


def test_run_backward_records_auto_backward_choice(mpi_tmp_path):
    """`run --backward` with GQA and a causal mask: auto runs burst forward, ring backward, and
    the file says so (attribute variant_backward); gradients re-read from disk match float64."""
    from hpcattn.reference import grad_error, reference_backward
    inp, out = mpi_tmp_path / "gqa.h5", mpi_tmp_path / "gqa_out.h5"
    if world().rank == 0:
        from hpcattn.commands.gen import generate
        generate(inp, 300, heads=4, kv_heads=1, head_dim=16, seed=6, backward=True)
    world().Barrier()
    comm = Comm(world())
    run(str(inp), str(out), "causal", comm, "auto", backward=True)
    world().Barrier()
    with h5py.File(out, "r") as f, h5py.File(inp, "r") as g:
        multi = world().size > 1
        assert (f.attrs["variant"], f.attrs["variant_backward"]) == (("burst", "ring") if multi else ("ring", "ring"))
        want = reference_backward(g["q"][...], g["k"][...], g["v"][...], g["do"][...], np.arange(300),
                                  parse("causal"), f.attrs["scale"])
        for name, ref in zip(("dq", "dk", "dv"), want):
            got = f[name][...]
            assert not np.isnan(got).any() and grad_error(got, ref) < 1e-4, name
    comm.free()
