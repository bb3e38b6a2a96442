"""The API and `run` at P ranks: run under `mpiexec -n P python -m mpi4py -m pytest --with-mpi -m mpi`.

User-chosen uneven pieces and decode positions, a run's file re-read from disk, and bad inputs
raising on every rank. Every variant x mask x layout against the reference: test_grid.py.
"""
import h5py
import numpy as np
import pytest

import hpcattn
from helpers import world
from hpcattn import Comm
from hpcattn.masks import parse
from hpcattn.partition import even_offsets, even_shard
from hpcattn.reference import errors, reference
from hpcattn.commands.run import run

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]


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
