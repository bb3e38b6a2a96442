"""In-process MPI tests: run under `mpiexec -n P python -m mpi4py -m pytest --with-mpi -m mpi`.

Every rank draws the same random data (one seed), shards it with the library's own partition,
and checks its rows against the float64 reference; byte counts are checked exactly.
"""
import pickle

import h5py
import numpy as np
import pytest

import hpcattn
from helpers import world
from hpcattn import Comm
from hpcattn.masks import parse
from hpcattn.partition import even_offsets, even_shard
from hpcattn.reference import errors, reference, tolerance
from hpcattn.commands.run import run

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]


@pytest.mark.parametrize("spec", ["full", "causal", "causal+window:40", "dilated:4:3+global:2", "block:33"])
@pytest.mark.parametrize("N, H, Hkv, D, dtype", [(203, 4, 2, 64, "float32"), (130, 2, 1, 48, "float16"),
                                                 (3, 1, 1, 8, "float32")])
def test_sharded_attention_matches_reference(spec, N, H, Hkv, D, dtype):
    rng = np.random.default_rng(N)
    q = rng.standard_normal((2, N, H, D)).astype(dtype)
    k = rng.standard_normal((2, N, Hkv, D)).astype(dtype)
    v = rng.standard_normal((2, N, Hkv, D)).astype(dtype)
    P, r = world().size, world().rank
    a, b = even_shard(N, P, r)
    comm = Comm(world())
    o, lse = hpcattn.attention(q[:, a:b], k[:, a:b], v[:, a:b], mask=spec, comm=comm, variant="ring")
    o_ref, lse_ref = reference(q[:, a:b], k, v, np.arange(a, b), parse(spec), 1 / np.sqrt(D))
    o_err, lse_err, empty_ok = errors(o, lse, o_ref, lse_ref)
    o_tol, lse_tol = tolerance(dtype)
    assert empty_ok and o_err <= o_tol and lse_err <= lse_tol
    # ring: K and V of every other shard pass through each rank exactly once (P-1 hops)
    off = even_offsets(N, P)
    row = 2 * Hkv * D * np.dtype(dtype).itemsize
    sent = sum(int(off[(r - h) % P + 1] - off[(r - h) % P]) for h in range(P - 1)) * 2 * row
    recv = sum(int(off[(r - h - 1) % P + 1] - off[(r - h - 1) % P]) for h in range(P - 1)) * 2 * row
    sizes = [(int(b1 - a1),) * 2 for a1, b1 in zip(off[:-1], off[1:])]  # the shard-size allgather
    control_sent = len(pickle.dumps(sizes[r])) * (P - 1)
    control_recv = sum(len(pickle.dumps(s)) for i, s in enumerate(sizes) if i != r)
    assert comm.bytes_sent == sent + control_sent
    assert comm.bytes_received == recv + control_recv
    comm.free()


def test_user_supplied_uneven_pieces_and_positions():
    """Any contiguous split in rank order works, including empty pieces and decode positions."""
    P, r = world().size, world().rank
    N, D = 97, 16
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 2, D)).astype("float32")
    k = rng.standard_normal((1, N, 1, D)).astype("float32")
    v = rng.standard_normal((1, N, 1, D)).astype("float32")
    cuts = np.sort(rng.integers(0, N + 1, size=P - 1)) if P > 1 else np.array([], int)
    kv_off = np.concatenate([[0], cuts, [N]])
    q_off = even_offsets(4, P)
    qpos = np.array([10, 50, 95, 96])[q_off[r]:q_off[r + 1]]
    o, lse = hpcattn.attention(q[:, q_off[r]:q_off[r + 1]], k[:, kv_off[r]:kv_off[r + 1]],
                               v[:, kv_off[r]:kv_off[r + 1]], mask="causal", comm=world(), q_positions=qpos)
    o_ref, lse_ref = reference(q[:, q_off[r]:q_off[r + 1]], k, v, qpos, parse("causal"), 0.25)
    o_err, lse_err, _ = errors(o, lse, o_ref, lse_ref)
    assert o_err < 1e-5 and lse_err < 1e-5


def test_run_writes_one_complete_file_re_read_from_disk(mpi_tmp_path):
    inp, out = mpi_tmp_path / "in.h5", mpi_tmp_path / "out.h5"
    if world().rank == 0:
        from hpcattn.commands.gen import generate
        generate(inp, 301, heads=2, kv_heads=1, head_dim=32, dtype="float16", seed=3)
    world().Barrier()
    comm = Comm(world())
    per_rank, attrs = run(str(inp), str(out), "causal+window:50", comm)
    world().Barrier()
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] == 1 and f.attrs["ranks"] == world().size
        o, lse = f["o"][...], f["lse"][...]
        stats = {k: f["stats"][k][...] for k in f["stats"]}
        with h5py.File(inp, "r") as g:
            o_ref, lse_ref = reference(g["q"][...], g["k"][...], g["v"][...], np.arange(301),
                                       parse("causal+window:50"), f.attrs["scale"])
    o_err, lse_err, ok = errors(o, lse, o_ref, lse_ref)
    assert ok and o_err < 4e-3 and lse_err < 1e-4
    assert stats["q_rows"].sum() == 301 and stats["edges"].sum() == parse("causal+window:50").allowed(
        np.arange(301)[:, None], np.arange(301)[None, :]).sum()
    assert not [p for p in mpi_tmp_path.iterdir() if ".tmp-" in p.name]
    comm.free()


def test_a_bad_file_fails_on_every_rank(mpi_tmp_path):
    inp = mpi_tmp_path / "bad.h5"
    if world().rank == 0:
        with h5py.File(inp, "w") as f:
            f["q"] = np.ones((1, 5, 1, 4), "float32")
    world().Barrier()
    comm = Comm(world())
    with pytest.raises(hpcattn.HpcattnError, match="no dataset 'k'") as e:
        run(str(inp), str(mpi_tmp_path / "o.h5"), "full", comm)
    assert e.value.collective
    comm.free()


@pytest.mark.parametrize("what", ["q_shape", "dtype", "positions_high", "positions_negative", "grad_o", "grad_lse"])
def test_a_bad_api_argument_on_one_rank_raises_on_every_rank(what):
    """The last rank alone passes a bad argument: every rank raises the same collective
    HpcattnError naming that rank (none is left waiting in a collective: the timeout says so)."""
    P, r = world().size, world().rank
    bad = r == P - 1
    N, D = 40, 8
    rng = np.random.default_rng(3)
    a, b = even_shard(N, P, r)
    q = rng.standard_normal((1, b - a, 2, D)).astype("float32")
    k = rng.standard_normal((1, b - a, 1, D)).astype("float32")
    v = k.copy()
    qpos = np.arange(a, b)
    if bad and what == "q_shape":
        q = q[:, :, :, :D - 1]
    if bad and what == "dtype":
        v = v.astype("float64")
    if bad and what == "positions_high":
        qpos = qpos + N
    if bad and what == "positions_negative":
        qpos = qpos - N
    comm = Comm(world())
    with pytest.raises(hpcattn.HpcattnError) as e:
        if what.startswith("grad"):
            o = np.zeros_like(q)
            lse = np.zeros((1, 2, b - a), "float32")
            if bad and what == "grad_o":
                o = o[:, :, :1]
            if bad and what == "grad_lse":
                lse = lse[:, :1]
            hpcattn.attention_backward(q, k, v, o, lse, np.ones_like(q), mask="causal", comm=comm, variant="ring")
        else:
            hpcattn.attention(q, k, v, mask="causal", comm=comm, q_positions=qpos, variant="ring")
    assert e.value.collective
    if P > 1:
        assert str(e.value).startswith(f"rank {P - 1}: ")
    word = {"q_shape": "head dim", "dtype": "dtype", "positions_high": "q_positions",
            "positions_negative": "q_positions", "grad_o": "o must be shaped", "grad_lse": "lse must have"}[what]
    assert word in str(e.value)
    comm.free()
