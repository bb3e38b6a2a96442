"""The streaming run (io/outofcore.py) under MPI (marker mpi), on uneven shards: the same bits
for any chunk size, NaN/Inf refused per chunk on every rank with no complete-looking file,
and host buffers bounded by the chunk, not the shard; the same for the streamed backward,
against float64."""
import h5py
import ml_dtypes
import numpy as np
import pytest
from mpi4py import MPI

import hpcattn
from hpcattn import Comm
from hpcattn.commands.run import run
from hpcattn.errors import HpcattnError
from hpcattn.io import h5io, outofcore
from hpcattn.masks import parse
from hpcattn.reference import grad_error, grad_tolerance, reference_backward

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]
N = 1003  # uneven over 2, 3 and 4 ranks


def make_input(path, n, dtype, seed=0, nan_at=None, do=False):
    """Rank 0 writes q, k, v (B = 2, H = 4, Hkv = 2, D = 16) and, with `do`, do like q; every
    rank gets the arrays. nan_at: (name, row) of one NaN."""
    rng = np.random.default_rng(seed)
    arrays = {"q": rng.standard_normal((2, n, 4, 16)), "k": rng.standard_normal((2, n, 2, 16)),
              "v": rng.standard_normal((2, n, 2, 16))}
    if do:
        arrays["do"] = rng.standard_normal((2, n, 4, 16))
    arrays = {name: a.astype(dtype) for name, a in arrays.items()}
    if nan_at:
        arrays[nan_at[0]][1, nan_at[1], 1, 3] = np.nan
    if MPI.COMM_WORLD.rank == 0:
        with h5py.File(path, "w") as f:
            for name, a in arrays.items():
                h5io.write(h5io.create(f, name, a.shape, a.dtype), Ellipsis, a)
    MPI.COMM_WORLD.Barrier()
    return arrays


def read(path):
    with h5py.File(path, "r") as f:
        return (h5io.read(f["o"]), f["lse"][...], dict(f.attrs),
                {key: f["stats"][key][...] for key in f["stats"]})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("spec", ["window:16", "causal+window:40", "dilated:5:3"])
def test_any_chunk_size_gives_the_bits_of_the_in_memory_kernel_call(mpi_tmp_path, monkeypatch, spec, dtype):
    """Chunks of 1003 (one rank), 64, 100 and 256 rows (out of core) over any rank count give
    exactly the o and lse of one attention call on the whole arrays (these masks' kernels
    compute each row on its own)."""
    dt = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    inp = mpi_tmp_path / "in.h5"
    arrays = make_input(inp, N, dt, seed=3)
    o_ref, lse_ref = hpcattn.attention(arrays["q"], arrays["k"], arrays["v"], spec, MPI.COMM_SELF)
    comm = Comm(MPI.COMM_WORLD)
    for rows, budget in ((None, None), (64, None), (100, None), (None, 1 << 16)):
        if rows:
            monkeypatch.setattr(outofcore, "MIN_CHUNK_ROWS", rows)
            monkeypatch.setattr(outofcore, "CHUNK_BYTES", rows * 4 * 16 * dt.itemsize * 2)
        out = mpi_tmp_path / f"o-{rows}-{budget}.h5"
        _, attrs = run(str(inp), str(out), spec, comm, max_memory=budget)
        o, lse, attrs, stats = read(out)
        assert attrs["complete"] == 1 and attrs["out_of_core"] == int(budget is not None)
        assert rows is None or attrs["chunk_rows"] == rows
        assert stats["q_rows"].sum() == N and stats["bytes_sent"].max() < 4000  # no K/V rows travel
        assert o.tobytes() == o_ref.tobytes() and lse.tobytes() == lse_ref.tobytes(), (rows, budget)
        monkeypatch.undo()
    comm.free()


@pytest.mark.parametrize("ooc", [False, True])
@pytest.mark.parametrize("name, row", [("q", 900), ("k", 17), ("v", 1002)])
def test_nan_is_refused_per_chunk_on_every_rank(mpi_tmp_path, monkeypatch, name, row, ooc):
    """A NaN in one chunk of one rank ends the run on every rank with the dataset and row named;
    no result-looking file is left (an out-of-core run keeps its partial, not complete)."""
    monkeypatch.setattr(outofcore, "MIN_CHUNK_ROWS", 100)
    monkeypatch.setattr(outofcore, "CHUNK_BYTES", 100 * 4 * 16 * 2)
    inp, out = mpi_tmp_path / "in.h5", mpi_tmp_path / "out.h5"
    make_input(inp, N, np.float16, nan_at=(name, row))
    comm = Comm(MPI.COMM_WORLD)
    with pytest.raises(HpcattnError, match=f"{name} holds NaN or Inf \\(first at row {row}\\)") as e:
        run(str(inp), str(out), "window:8", comm, max_memory=(1 << 16) if ooc else None)
    assert e.value.collective
    MPI.COMM_WORLD.Barrier()
    assert not out.exists() and not list(mpi_tmp_path.glob("out.h5.tmp-*"))
    partial = mpi_tmp_path / "out.h5.partial"
    assert partial.exists() == ooc
    if ooc:
        with h5py.File(partial, "r") as f:
            assert "complete" not in f.attrs
    comm.free()


def test_host_buffers_are_bounded_by_the_chunk_not_the_shard(mpi_tmp_path, monkeypatch):
    """With 128-row chunks, a 4x longer sequence needs the same chunk buffers on every rank,
    less than half the shard at 8003 tokens over 4 ranks; the stats say so."""
    monkeypatch.setattr(outofcore, "MIN_CHUNK_ROWS", 128)
    monkeypatch.setattr(outofcore, "CHUNK_BYTES", 128 * 4 * 16 * 2)
    comm = Comm(MPI.COMM_WORLD)
    held = []
    for n in (8003, 32003):
        inp = mpi_tmp_path / f"in{n}.h5"
        make_input(inp, n, np.float16)
        _, attrs = run(str(inp), str(mpi_tmp_path / f"o{n}.h5"), "causal+window:20", comm)
        *_, stats = read(mpi_tmp_path / f"o{n}.h5")
        assert attrs["chunk_rows"] == 128 and attrs["out_of_core"] == 0
        held.append(stats["buffer_bytes"])
        shard = 2 * (n // comm.size) * (4 + 2 + 2) * 16 * 2  # q, k, v rows of a rank, float16
        assert stats["buffer_bytes"].max() < shard / 2
    assert np.array_equal(held[0], held[1]) and held[0].min() > 0
    comm.free()


def test_phases_account_for_the_wall_time(mpi_tmp_path):
    """start-up, read, check, compute and write are recorded for every rank; what the compute
    stage did not spend computing it spent waiting, starting or finishing."""
    inp = mpi_tmp_path / "in.h5"
    make_input(inp, N, np.float16)
    comm = Comm(MPI.COMM_WORLD)
    run(str(inp), str(mpi_tmp_path / "o.h5"), "window:16", comm)
    *_, stats = read(mpi_tmp_path / "o.h5")
    for key in ("startup_s", "read_s", "check_s", "write_s", "compute_s"):
        assert (stats[key] > 0).all(), key
    assert (stats["upload_s"] == 0).all() and (stats["download_s"] == 0).all()
    assert np.allclose(stats["io_s"], stats["read_s"] + stats["check_s"] + stats["write_s"])
    assert (stats["startup_s"] + stats["compute_s"] + stats["wait_s"] <= stats["wall_s"]).all()
    comm.free()


def test_nan_in_a_key_only_global_rows_reach_is_refused(mpi_tmp_path):
    """Every row global (N <= G): the keys come through the pass over key blocks, checked there;
    the refusal still reaches every rank (some own no chunk)."""
    inp, out = mpi_tmp_path / "in.h5", mpi_tmp_path / "out.h5"
    make_input(inp, 3, np.float32, nan_at=("k", 2))
    comm = Comm(MPI.COMM_WORLD)
    with pytest.raises(HpcattnError, match="k holds NaN or Inf \\(first at row 2\\)") as e:
        run(str(inp), str(out), "window:1+global:5", comm)
    assert e.value.collective
    MPI.COMM_WORLD.Barrier()
    assert not out.exists() and not list(mpi_tmp_path.glob("out.h5.tmp-*"))
    comm.free()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("spec", ["window:16", "causal+window:40", "dilated:5:3", "block:64"])
def test_streamed_backward_matches_float64_for_any_chunk_size(mpi_tmp_path, monkeypatch, spec, dtype):
    """`run --backward` streams: each rank's chunks, plus the rows within the mask's reach of its
    keys, give dq, dk, dv within the dtype's tolerance of float64 for chunks of 1003 (one
    rank), 64 and 100 rows and out of core, o and lse the in-memory call's bits (block masks:
    its values), and no K/V rows travel between ranks."""
    dt = np.dtype(dtype)
    inp = mpi_tmp_path / "in.h5"
    a = make_input(inp, N, dt, seed=5, do=True)
    o_ref, lse_ref = hpcattn.attention(a["q"], a["k"], a["v"], spec, MPI.COMM_SELF)
    want = reference_backward(a["q"], a["k"], a["v"], a["do"], np.arange(N), parse(spec), 1 / 4)
    comm = Comm(MPI.COMM_WORLD)
    for rows, budget in ((None, None), (64, None), (100, None), (None, 1 << 17)):
        if rows:
            monkeypatch.setattr(outofcore, "MIN_CHUNK_ROWS", rows)
            monkeypatch.setattr(outofcore, "CHUNK_BYTES", rows * 4 * 16 * dt.itemsize * 2)
        out = mpi_tmp_path / f"g-{rows}-{budget}.h5"
        run(str(inp), str(out), spec, comm, backward=True, max_memory=budget)
        o, lse, attrs, stats = read(out)
        assert attrs["complete"] == 1 and attrs["backward"] == 1 and attrs["out_of_core"] == int(budget is not None)
        assert rows is None or attrs["chunk_rows"] == rows
        if spec.startswith("block"):  # dense block products: BLAS rounds rows by where a chunk cuts a block
            assert np.allclose(o.astype(np.float32), o_ref.astype(np.float32), rtol=2e-3, atol=2e-3)
        else:
            assert o.tobytes() == o_ref.tobytes() and lse.tobytes() == lse_ref.tobytes(), (rows, budget)
        with h5py.File(out, "r") as f:
            got = [h5io.read(f[n]) for n in ("dq", "dk", "dv")]
        for g, w in zip(got, want):
            assert np.isfinite(g).all() and grad_error(g, w) <= grad_tolerance(dt), (rows, budget, grad_error(g, w))
        assert stats["edges_backward"].sum() >= stats["edges"].sum() and stats["bytes_sent"].max() < 4000
        monkeypatch.undo()
    comm.free()


def test_streamed_backward_buffers_are_bounded_and_do_is_checked(mpi_tmp_path, monkeypatch):
    """The backward's host buffers follow the chunk, not the shard, and a NaN in do ends the
    run on every rank with no result-looking file."""
    monkeypatch.setattr(outofcore, "MIN_CHUNK_ROWS", 128)
    monkeypatch.setattr(outofcore, "CHUNK_BYTES", 128 * 4 * 16 * 2)
    comm = Comm(MPI.COMM_WORLD)
    n = 16003
    inp = mpi_tmp_path / "in.h5"
    make_input(inp, n, np.float16, do=True)
    _, attrs = run(str(inp), str(mpi_tmp_path / "o.h5"), "window:20", comm, backward=True)
    *_, stats = read(mpi_tmp_path / "o.h5")
    shard = 2 * (n // comm.size) * (4 + 2 + 2 + 4) * 16 * 2  # q, k, v, do rows of a rank, float16
    assert attrs["chunk_rows"] == 128 and stats["buffer_bytes"].max() < shard / 2
    bad = mpi_tmp_path / "bad.h5"
    make_input(bad, N, np.float16, do=True, nan_at=("do", 777))
    with pytest.raises(HpcattnError, match="do holds NaN or Inf \\(first at row 777\\)") as e:
        run(str(bad), str(mpi_tmp_path / "x.h5"), "window:8", comm, backward=True)
    assert e.value.collective
    MPI.COMM_WORLD.Barrier()
    assert not (mpi_tmp_path / "x.h5").exists() and not list(mpi_tmp_path.glob("x.h5.tmp-*"))
    comm.free()


@pytest.mark.parametrize("spec, resume, why", [("window:8+global:2", False, "has global rows"),
                                                ("window:8", True, "--resume applies to forward runs")])
def test_backward_out_of_core_says_what_it_cannot_stream(mpi_tmp_path, spec, resume, why):
    inp = mpi_tmp_path / "in.h5"
    make_input(inp, N, np.float32, do=True)
    comm = Comm(MPI.COMM_WORLD)
    with pytest.raises(HpcattnError, match=why) as e:
        run(str(inp), str(mpi_tmp_path / "o.h5"), spec, comm, backward=True, max_memory=1 << 16, resume=resume)
    assert e.value.collective
    comm.free()
