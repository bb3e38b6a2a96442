"""Backend and transport selection without a GPU: the choices, the errors, what `run` records."""
import h5py
import pytest
from mpi4py import MPI

from helpers import hpcattn
from hpcattn import Comm
from hpcattn.commands.gen import generate
from hpcattn.errors import HpcattnError
from hpcattn.gpu import device


def test_numpy_backend_moves_host_arrays_by_mpi():
    comm = Comm(MPI.COMM_SELF)
    for requested in ("auto", "mpi", "host"):
        assert comm.use_transport(requested, "numpy") == "mpi"
    comm.free()


@pytest.mark.parametrize("requested, words", [("nccl", "needs the GPU backend"), ("pigeon", "expected one of")])
def test_bad_transport_requests_are_refused(requested, words):
    comm = Comm(MPI.COMM_SELF)
    with pytest.raises(HpcattnError, match=words):
        comm.use_transport(requested, "numpy")
    comm.free()


def test_nccl_is_bootstrapped_over_the_comm(monkeypatch):
    """The NCCL branch of transport.choose with stand-in cupy modules: the unique id travels
    by the hpcattn Comm and the communicator is built with this rank's place (no GPU needed)."""
    import sys
    import types
    from hpcattn.dist import transport
    made = []
    nccl = types.SimpleNamespace(available=True, get_unique_id=lambda: b"uid",
                                 NcclCommunicator=lambda *a: made.append(a) or "nc")
    cuda = types.SimpleNamespace(nccl=nccl, Device=lambda: types.SimpleNamespace(id=0))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    monkeypatch.setattr(transport, "cuda_aware", lambda: False)
    comm = Comm(MPI.COMM_SELF)
    assert comm.use_transport("nccl", "cupy") == "nccl" and made == [(1, b"uid", 0)]
    assert comm.use_transport("auto", "cupy") == "host"  # one rank: nothing to gain from NCCL
    comm.free()


def test_chosen_backend(monkeypatch):
    monkeypatch.setattr(device, "device_count", lambda: 0)
    assert device.chosen_backend("auto") == "numpy" and device.chosen_backend("numpy") == "numpy"
    with pytest.raises(HpcattnError, match="sees no GPU"):
        device.chosen_backend("cupy")
    monkeypatch.setenv("HPCATTN_BACKEND", "tpu")
    with pytest.raises(HpcattnError, match="HPCATTN_BACKEND"):
        device.chosen_backend()


def test_run_records_backend_and_transport_and_refuses_nccl_on_cpu(tmp_path):
    generate(tmp_path / "in.h5", 64, heads=1, head_dim=8, seed=1)
    out = hpcattn("run", tmp_path / "in.h5", tmp_path / "o.h5", "--mask", "window:4", "--transport", "host")
    assert out.returncode == 0, out.stderr
    with h5py.File(tmp_path / "o.h5", "r") as f:
        expect = {"numpy": "mpi", "cupy": "host"}[f.attrs["backend"]]  # host arrays go by plain MPI
        assert f.attrs["transport"] == expect
    bad = hpcattn("run", tmp_path / "in.h5", tmp_path / "p.h5", "--mask", "window:4", "--transport", "nccl")
    if device.device_count() == 0:
        assert bad.returncode == 1 and "--transport nccl needs the GPU backend" in bad.stderr
        assert not (tmp_path / "p.h5").exists()
