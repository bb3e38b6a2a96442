"""HDF5 at scale under MPI (marker mpi): the output path this h5py offers (parallel `mpio` or
the serial fallback) and out-of-core streaming, checked against the float64 reference.

The same file runs on the pip Open MPI stack (serial HDF5) and on the parallel-HDF5 stack
(`make test-phdf5`); tests/cli/test_stacks.py compares their outputs byte for byte.
"""
import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hpcattn import Comm
from hpcattn.masks import parse
from hpcattn.reference import errors, reference, tolerance
from hpcattn.commands.run import run

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]
EXPECTED = "mpio" if h5py.get_config().mpi else "serial"


def make_input(path, N, B=2, H=2, Hkv=1, D=16, dtype="float16", seed=0):
    """Rank 0 writes the file; every rank gets q, k, v for the reference."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, N, H, D)).astype(dtype)
    k = rng.standard_normal((B, N, Hkv, D)).astype(dtype)
    v = rng.standard_normal((B, N, Hkv, D)).astype(dtype)
    if MPI.COMM_WORLD.rank == 0:
        with h5py.File(path, "w") as f:
            f["q"], f["k"], f["v"] = q, k, v
    MPI.COMM_WORLD.Barrier()
    return q, k, v


def check_against_reference(out, q, k, v, spec):
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] == 1 and f.attrs["hdf5"] == EXPECTED
        assert f.attrs["ranks"] == MPI.COMM_WORLD.size
        o, lse = f["o"][...], f["lse"][...]
        assert o.dtype == q.dtype and lse.dtype == np.float32
        # chunked along the sequence: about 1 MiB of whole rows (H*D*itemsize bytes each)
        row = q.shape[2] * q.shape[3] * q.itemsize
        assert f["o"].chunks == (1, min(q.shape[1], (1 << 20) // row), *q.shape[2:])
        stats = {key: f["stats"][key][...] for key in f["stats"]}
        ooc = int(f.attrs["out_of_core"])
    o_ref, lse_ref = reference(q, k, v, np.arange(q.shape[1]), parse(spec), 1 / np.sqrt(q.shape[-1]))
    o_err, lse_err, ok = errors(o, lse, o_ref, lse_ref)
    o_tol, lse_tol = tolerance(q.dtype)
    assert ok and o_err <= o_tol and lse_err <= lse_tol
    assert stats["q_rows"].sum() == q.shape[1] and len(stats["io_s"]) == MPI.COMM_WORLD.size
    return o, lse, stats, ooc


@pytest.mark.parametrize("N", [1, 257, 1003])
def test_in_core_output_path(mpi_tmp_path, N):
    inp, out = mpi_tmp_path / "in.h5", mpi_tmp_path / "out.h5"
    q, k, v = make_input(inp, N, seed=N)
    comm = Comm(MPI.COMM_WORLD)
    _, attrs = run(str(inp), str(out), "causal+window:30", comm)
    assert attrs["hdf5"] == EXPECTED and attrs["out_of_core"] == 0
    check_against_reference(out, q, k, v, "causal+window:30")
    comm.free()


@pytest.mark.parametrize("spec", ["causal+window:40+global:3", "dilated:5:3", "block:64"])
def test_out_of_core_matches_reference_and_in_core(mpi_tmp_path, spec):
    """A tiny memory budget forces 256-row chunks (uneven over ranks); results agree with
    the reference, and every chunk is written once."""
    inp = mpi_tmp_path / "in.h5"
    q, k, v = make_input(inp, 1500, seed=1)
    comm = Comm(MPI.COMM_WORLD)
    _, attrs = run(str(inp), str(mpi_tmp_path / "ooc.h5"), spec, comm, max_memory=1 << 16)
    assert attrs["out_of_core"] == 1 and attrs["chunk_rows"] == 256
    o, lse, stats, ooc = check_against_reference(mpi_tmp_path / "ooc.h5", q, k, v, spec)
    assert ooc == 1 and stats["chunks"].sum() == 6
    assert stats["bytes_sent"].max() < 2000  # small control messages only: no K/V rows travel
    assert stats["edges"].sum() == parse(spec).allowed(np.arange(1500)[:, None], np.arange(1500)[None, :]).sum()
    _, attrs = run(str(inp), str(mpi_tmp_path / "ic.h5"), spec, comm)
    o_ic, lse_ic, _, ooc = check_against_reference(mpi_tmp_path / "ic.h5", q, k, v, spec)
    assert ooc == 0
    assert np.abs(o.astype(np.float32) - o_ic.astype(np.float32)).max() <= 2 ** -9
    np.testing.assert_allclose(lse, lse_ic, rtol=2e-6)
    assert not [p for p in mpi_tmp_path.iterdir() if ".tmp-" in p.name or p.suffix == ".partial"]
    comm.free()


def test_out_of_core_refuses_unbounded_masks(mpi_tmp_path):
    inp = mpi_tmp_path / "in.h5"
    make_input(inp, 600)
    comm = Comm(MPI.COMM_WORLD)
    with pytest.raises(Exception, match="unbounded reach") as e:
        run(str(inp), str(mpi_tmp_path / "o.h5"), "causal", comm, max_memory=1 << 16)
    assert e.value.collective
    MPI.COMM_WORLD.Barrier()
    assert not (mpi_tmp_path / "o.h5").exists()
    comm.free()


@pytest.mark.skipif(not h5py.get_config().mpi, reason="needs h5py with parallel HDF5 (make test-phdf5)")
def test_mpio_and_serial_writes_give_the_same_file_content(mpi_tmp_path):
    """On a parallel build both write paths are available: same rows in, same bytes out."""
    from hpcattn.io import h5io
    from hpcattn.partition import even_shard
    N, P, r = 1001, MPI.COMM_WORLD.size, MPI.COMM_WORLD.rank
    a, b = even_shard(N, P, r)
    rng = np.random.default_rng(9)
    o = rng.standard_normal((2, N, 3, 8)).astype("float16")
    lse = rng.standard_normal((2, 3, N)).astype("float32")
    comm = Comm(MPI.COMM_WORLD)
    for name, mpio in (("m.h5", True), ("s.h5", False)):
        used = h5io.write_rows(comm, str(mpi_tmp_path / name), name, (a, b),
                               {"o": (o[:, a:b], o.shape, 1), "lse": (lse[:, :, a:b], lse.shape, 2)}, mpio=mpio)
        assert used == ("mpio" if mpio else "serial")
    with h5py.File(mpi_tmp_path / "m.h5", "r") as m, h5py.File(mpi_tmp_path / "s.h5", "r") as s:
        for name, full in (("o", o), ("lse", lse)):
            assert m[name][...].tobytes() == s[name][...].tobytes() == full.tobytes()
            assert m[name].chunks == s[name].chunks
    comm.free()
