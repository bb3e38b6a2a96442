"""GPU backend under MPI (run with mpiexec like tests/distributed/): every variant and every
transport this machine offers, on CuPy shards, against the float64 reference; the GPU run
counts exactly the bytes the NumPy run counts. Ranks may share one GPU (host/mpi transports).
Skips, saying why, without CuPy or a CUDA device."""
import math
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from gpu_helpers import cupy_or_skip

cp = cupy_or_skip()

import hpcattn  # noqa: E402
from hpcattn import Comm  # noqa: E402
from hpcattn.commands.run import run  # noqa: E402
from hpcattn.io import h5io, outofcore  # noqa: E402
from hpcattn.gpu import device  # noqa: E402
from hpcattn.errors import HpcattnError  # noqa: E402
from hpcattn.masks import parse  # noqa: E402
from hpcattn.partition import even_shard  # noqa: E402
from hpcattn.reference import errors, grad_error, grad_tolerance, reference, reference_backward, tolerance  # noqa: E402
from hpcattn.dist.variants import VARIANTS  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]
device.setup(MPI.COMM_WORLD)


REQUIRED = os.environ.get("HPCATTN_TEST_TRANSPORTS")


def transports():
    """The transports to try here. By default each test skips one this machine refuses (mpi
    without a CUDA-aware MPI, nccl where ranks share a GPU); HPCATTN_TEST_TRANSPORTS=mpi,host
    names the ones to run, and a refusal of those fails."""
    return REQUIRED.split(",") if REQUIRED else ["host", "mpi", "nccl"]


def use_or_skip(comm, transport, *others):
    """comm.use_transport(transport, "cupy"), or free comm and others and skip (collective:
    every rank skips together) unless the transport was named in HPCATTN_TEST_TRANSPORTS."""
    try:
        comm.use_transport(transport, "cupy")
    except HpcattnError as e:
        for c in (comm, *others):
            c.free()
        if REQUIRED:
            raise
        pytest.skip(f"transport {transport} not available here: {e}")


@pytest.mark.parametrize("transport", transports())
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("spec", ["full", "causal", "causal+window:40", "dilated:4:3+global:2", "block:33"])
def test_sharded_gpu_attention_matches_reference_and_cpu_bytes(transport, variant, spec):
    world = MPI.COMM_WORLD
    N, H, Hkv, D, dtype = 203, 4, 2, 64, "float16"
    rng = np.random.default_rng(N)
    q, k, v = (rng.standard_normal((2, N, h, D)).astype(dtype) for h in (H, Hkv, Hkv))
    a, b = even_shard(N, world.size, world.rank)
    comm = Comm(world)
    use_or_skip(comm, transport)
    assert comm.transport.name == transport
    before = comm.counters()
    o, lse = hpcattn.attention(*(cp.asarray(x[:, a:b]) for x in (q, k, v)), mask=spec, comm=comm,
                               variant=variant)
    o_ref, lse_ref = reference(q[:, a:b], k, v, np.arange(a, b), parse(spec), 1 / math.sqrt(D))
    o_err, lse_err, empty_ok = errors(o.get(), lse.get(), o_ref, lse_ref)
    o_tol, lse_tol = tolerance(dtype)
    assert empty_ok and o_err <= o_tol and lse_err <= lse_tol, (o_err, lse_err)
    cpu = Comm(world)
    hpcattn.attention(q[:, a:b], k[:, a:b], v[:, a:b], mask=spec, comm=cpu, variant=variant)
    after = comm.counters()
    assert after["bytes_sent"] - before["bytes_sent"] == cpu.bytes_sent
    assert after["bytes_received"] - before["bytes_received"] == cpu.bytes_received
    comm.free()
    cpu.free()


@pytest.mark.parametrize("transport", transports())
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("spec", ["causal+window:40", "dilated:4:3+global:2", "full"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sharded_gpu_backward_matches_float64(transport, variant, spec, dtype):
    """Gradients of uneven CuPy shards (halo rows' dK, dV sent home, relays, tree rows) against
    the float64 gradients of the whole sequence, and the same bytes as the NumPy run. float32
    runs the CUDA-core backward, float16 the tensor-core one."""
    world = MPI.COMM_WORLD
    N, H, Hkv, D = 203, 4, 2, 32
    rng = np.random.default_rng(N)
    q, do = (rng.standard_normal((1, N, H, D)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((1, N, Hkv, D)).astype(dtype) for _ in range(2))
    tol = grad_tolerance(dtype)
    cuts = np.array([0, 1, 3, 6, 10])[:world.size + 1] if world.size < 5 else None
    a, b = ((N * cuts[world.rank]) // cuts[-1], (N * cuts[world.rank + 1]) // cuts[-1]) if cuts is not None \
        else even_shard(N, world.size, world.rank)
    comm, cpu = Comm(world), Comm(world)
    use_or_skip(comm, transport, cpu)
    mine = [x[:, a:b] for x in (q, k, v)]
    o, lse = hpcattn.attention(*mine, mask=spec, comm=cpu, variant=variant)
    cpu_before = cpu.counters()
    want = hpcattn.attention_backward(*mine, o, lse, do[:, a:b], mask=spec, comm=cpu, variant=variant)
    before = comm.counters()
    got = hpcattn.attention_backward(*(cp.asarray(x) for x in (*mine, o, lse, do[:, a:b])), mask=spec,
                                     comm=comm, variant=variant)
    full = reference_backward(q, k, v, do, np.arange(N), parse(spec), 1 / math.sqrt(D))
    for name, g, w, ref in zip(("dq", "dk", "dv"), got, want, full):
        assert isinstance(g, cp.ndarray), name
        got_err = grad_error(g.get().astype(np.float32), ref[:, a:b])
        assert got_err <= tol, (name, got_err)
        assert grad_error(w.astype(np.float32), ref[:, a:b]) <= tol, name
    for key in ("bytes_sent", "bytes_received"):
        assert comm.counters()[key] - before[key] == cpu.counters()[key] - cpu_before[key], key
    comm.free()
    cpu.free()


@pytest.mark.parametrize("transport", transports())
def test_allreduce_of_device_arrays(transport):
    world = MPI.COMM_WORLD
    comm = Comm(world)
    use_or_skip(comm, transport)
    x = cp.arange(10, dtype=cp.float32) + world.rank
    before = comm.bytes_sent
    out = comm.allreduce(x, "sum")
    assert isinstance(out, cp.ndarray)
    expect = np.arange(10) * world.size + sum(range(world.size))
    assert np.allclose(out.get(), expect)
    assert comm.bytes_sent - before == (x.nbytes if world.size > 1 else 0)
    assert comm.allreduce(x, "max").get()[0] == world.size - 1
    assert comm.bytes_sent - before == (2 * x.nbytes if world.size > 1 else 0)
    comm.free()


@pytest.mark.parametrize("transport", transports())
@pytest.mark.parametrize("method", ["packed", "three"])
@pytest.mark.parametrize("topo", [False, True], ids=["flat", "node-leaders"])
def test_tree_combine_of_device_states(transport, method, topo):
    """The tree's Allreduce of device (o, lse) states: "packed" is a user-defined op, which MPI
    runs on the host and cannot give device memory (comm.py stages it), "three" uses built-in
    ops on the transport; flat, and as node reduce -> leaders' allreduce -> node broadcast
    (simulated nodes of 2 ranks). The NumPy combine's result and bytes."""
    from hpcattn.dist.variants import tree
    world = MPI.COMM_WORLD
    rng = np.random.default_rng(world.rank)
    o = rng.standard_normal((2, 3, 5, 16)).astype(np.float32)
    lse = rng.standard_normal((2, 3, 5)).astype(np.float32)
    o[0, 0, 0], lse[0, 0, 0] = 0, -np.inf  # a row this rank has no keys for
    if world.rank == 0:
        o[1, 2], lse[1, 2] = 0, -np.inf
    comm, cpu = Comm(world), Comm(world)
    use_or_skip(comm, transport, cpu)
    want = tree.combine(cpu, o, lse, method, ranks_per_node=2, topo=topo)
    before = comm.counters()
    got = tree.combine(comm, cp.asarray(o), cp.asarray(lse), method, ranks_per_node=2, topo=topo)
    for g, w in zip(got, want):
        assert isinstance(g, cp.ndarray)
        assert np.allclose(g.get(), w, rtol=1e-5, atol=1e-5)  # "three": CuPy exp, log vs NumPy
    for key in ("bytes_sent", "bytes_received"):
        assert comm.counters()[key] - before[key] == cpu.counters()[key], key
    comm.free()
    cpu.free()


@pytest.mark.parametrize("spec", ["window:16", "causal+window:40"])
def test_streamed_gpu_run_matches_float64(mpi_tmp_path, monkeypatch, spec):
    """`run` and `run --backward` on the GPU stream chunks through their own copy streams: for
    one chunk per rank, chunks of 64 rows and out of core, o and lse within float16's tolerance
    of float64 (the forward-only and the backward run giving the same bits on the same chunk
    grid), dq, dk and dv
    within its gradient tolerance, every row written, and the copies counted."""
    world, N = MPI.COMM_WORLD, 1003
    rng = np.random.default_rng(11)
    a = {name: rng.standard_normal((2, N, 4 if name in ("q", "do") else 2, 64)).astype(np.float16)
         for name in ("q", "k", "v", "do")}
    inp = mpi_tmp_path / "in.h5"
    if world.rank == 0:
        with h5py.File(inp, "w") as f:
            for name, x in a.items():
                h5io.write(h5io.create(f, name, x.shape, x.dtype), Ellipsis, x)
    world.Barrier()
    mask = parse(spec)
    o_ref, lse_ref = reference(a["q"], a["k"], a["v"], np.arange(N), mask, 1 / 8)
    want = reference_backward(a["q"], a["k"], a["v"], a["do"], np.arange(N), mask, 1 / 8)
    comm = Comm(world)
    for rows, budget in ((None, None), (64, None), (None, 1 << 18)):
        if rows:
            monkeypatch.setattr(outofcore, "MIN_CHUNK_ROWS", rows)
            monkeypatch.setattr(outofcore, "CHUNK_BYTES", rows * 4 * 64 * 2)
        bits = []
        for backward in (False, True):
            out = mpi_tmp_path / f"o-{rows}-{budget}-{backward}.h5"
            run(str(inp), str(out), spec, comm, backward=backward, max_memory=budget)
            with h5py.File(out, "r") as f:
                assert f.attrs["complete"] == 1 and f.attrs["backend"] == "cupy"
                assert f.attrs["out_of_core"] == int(budget is not None)
                o, lse = h5io.read(f["o"]), f["lse"][...]
                o_err, lse_err, empty_ok = errors(o, lse, o_ref, lse_ref)
                assert o_err <= tolerance("float16")[0] and lse_err <= 1e-4 and empty_ok, (rows, budget, o_err)
                assert (f["stats"]["upload_s"][...] > 0).all() and (f["stats"]["download_s"][...] > 0).all()
                bits.append((f.attrs["chunk_rows"], o.tobytes() + lse.tobytes()))
                if backward:
                    for name, w in zip(("dq", "dk", "dv"), want):
                        g = h5io.read(f[name]).astype(np.float32)
                        assert np.isfinite(g).all() and grad_error(g, w) <= grad_tolerance("float16"), name
        assert bits[0][0] != bits[1][0] or bits[0][1] == bits[1][1], (rows, budget)  # same grid, same bits
        monkeypatch.undo()
    comm.free()
