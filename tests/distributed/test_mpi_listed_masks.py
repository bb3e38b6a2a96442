"""random and csr masks under the default variant (auto) at any rank count. Run under mpiexec.
(Every explicit variant with random masks: test_grid.py.)"""
import h5py
import numpy as np
import pytest
from mpi4py import MPI

import hpcattn
from hpcattn import Comm
from hpcattn.masks import check_csr, parse
from hpcattn.partition import even_shard
from hpcattn.reference import errors, reference, tolerance
from hpcattn.commands.run import run

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]


@pytest.mark.parametrize("spec", ["random:7:5", "causal+random:4", "window:9+global:3+random:5:1",
                                  "dilated:3:4+random:2+causal"])
@pytest.mark.parametrize("N, H, Hkv, D, dtype", [(211, 4, 2, 32, "float32"), (97, 2, 1, 16, "float16")])
def test_random_masks_are_the_same_for_every_rank_count(spec, N, H, Hkv, D, dtype):
    """Each rank's rows match the single-process float64 reference of the mask bound to N: the
    random edges cannot depend on P (the reference knows nothing of ranks)."""
    rng = np.random.default_rng(N)
    q, k, v = (rng.standard_normal((1, N, h, D)).astype(dtype) for h in (H, Hkv, Hkv))
    P, r = MPI.COMM_WORLD.size, MPI.COMM_WORLD.rank
    a, b = even_shard(N, P, r)
    comm = Comm(MPI.COMM_WORLD)
    stats = {}
    o, lse = hpcattn.attention(q[:, a:b], k[:, a:b], v[:, a:b], mask=spec, comm=comm, stats=stats)
    mask = parse(spec, n_keys=N)
    o_ref, lse_ref = reference(q[:, a:b], k, v, np.arange(a, b), mask, 1 / np.sqrt(D))
    o_err, lse_err, empty_ok = errors(o, lse, o_ref, lse_ref)
    o_tol, lse_tol = tolerance(dtype)
    assert empty_ok and o_err <= o_tol and lse_err <= lse_tol
    edges = MPI.COMM_WORLD.allreduce(stats["edges"])
    assert edges == mask.allowed(np.arange(N)[:, None], np.arange(N)[None, :]).sum()
    comm.free()


@pytest.mark.parametrize("N, gen_spec", [(150, "random:9:3+window:2+csr"), (61, "causal+random:4+csr")])
def test_csr_file_runs_on_any_rank_count(mpi_tmp_path, N, gen_spec):
    inp, out = mpi_tmp_path / "in.h5", mpi_tmp_path / "out.h5"
    if MPI.COMM_WORLD.rank == 0:
        from hpcattn.commands.gen import generate
        generate(inp, N, heads=2, kv_heads=1, head_dim=16, dtype="float32", seed=4, mask=gen_spec)
    MPI.COMM_WORLD.Barrier()
    comm = Comm(MPI.COMM_WORLD)
    run(str(inp), str(out), "csr", comm)
    MPI.COMM_WORLD.Barrier()
    with h5py.File(inp, "r") as g:
        csr = check_csr(g["mask/indptr"][...], g["mask/indices"][...], N, 0, N)
        o_ref, lse_ref = reference(g["q"][...], g["k"][...], g["v"][...], np.arange(N),
                                   parse("csr", csr=csr), 0.25)
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] == 1 and f.attrs["ranks"] == MPI.COMM_WORLD.size
        o_err, lse_err, ok = errors(f["o"][...], f["lse"][...], o_ref, lse_ref)
        assert f["stats/edges"][...].sum() == len(csr.indices)
    assert ok and o_err < 1e-4 and lse_err < 1e-4
    comm.free()
