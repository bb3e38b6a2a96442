"""What MPI is handed when device arrays travel, checked without a GPU: stand-in device arrays
(NumPy arrays whose type lives in a `cupy` module, so hpcattn treats them as device arrays) and
a stand-in cupy whose compute stream logs its synchronisations, over a communicator that logs
every MPI call and the kinds of buffer it is given.

Two contracts of the CUDA-aware path (transport "mpi"): MPI sees a device buffer only after the
compute stream is synchronised (MPI reads and writes device memory outside any stream of ours,
and mpi4py does not synchronise), and a user-defined reduction op, which MPI runs on the host
and which cannot read device memory, only ever gets host buffers. Byte counts are those of
host arrays."""
import sys
import types

import numpy as np
import pytest
from mpi4py import MPI

from hpcattn import Comm
from hpcattn.arrays import is_device
from hpcattn.dist.comm import UserOp


class Dev(np.ndarray):
    """A stand-in device array: its type's module starts with "cupy"."""

    def get(self):
        return np.array(self)


Dev.__module__ = "cupy._stand_in"


def dev(x):
    return np.ascontiguousarray(x).view(Dev)


def _buffers(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _buffers(a)
        elif isinstance(a, np.ndarray):
            yield a


class LoggedMPI:
    """Forwards to an mpi4py communicator and logs (call, kinds of the buffers it got)."""

    def __init__(self, mpi, log):
        self._mpi, self._log = mpi, log

    def __getattr__(self, name):
        fn = getattr(self._mpi, name)
        if not callable(fn) or name[0].islower():
            return fn

        def call(*args, **kw):
            kinds = ["device" if is_device(b) else "host" for b in _buffers((*args, *kw.values()))]
            self._log.append((name, kinds))
            return fn(*args, **kw)
        return call


@pytest.fixture
def log(monkeypatch):
    out = []

    class Stream:
        def synchronize(self):
            out.append(("synchronize", []))

        def record(self):
            return None

    cuda = types.SimpleNamespace(get_current_stream=Stream)
    fake = types.SimpleNamespace(cuda=cuda, asarray=dev, empty_like=lambda a: dev(np.empty_like(a)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    return out


def logged_comm(log, transport):
    from hpcattn.dist.transport import Transport
    comm = Comm(MPI.COMM_SELF)
    comm.transport = Transport(transport)
    comm._real = comm.mpi
    comm.mpi = LoggedMPI(comm.mpi, log)
    return comm


def free(comm):
    comm.mpi = comm._real
    comm.free()


def first_device_call(log):
    return next(i for i, (_, kinds) in enumerate(log) if "device" in kinds)


def test_exchange_synchronises_before_mpi_sees_device_buffers(log):
    comm = logged_comm(log, "mpi")
    send, recv = dev(np.arange(6, dtype=np.float32)), dev(np.zeros(6, np.float32))
    comm.exchange([send], 0, [recv], 0).wait()
    assert np.array_equal(recv, send)
    i = first_device_call(log)
    assert ("synchronize", []) in log[:i], log
    assert {name for name, _ in log[i:]} == {"Irecv", "Isend"}
    assert (comm.bytes_sent, comm.bytes_received) == (24, 24)
    free(comm)


def test_builtin_allreduce_of_device_arrays_synchronises_first(log):
    comm = logged_comm(log, "mpi")
    out = comm.allreduce(dev(np.arange(4, dtype=np.float32)), "max")
    assert is_device(out) and np.array_equal(out, np.arange(4))
    i = first_device_call(log)
    assert log[i][0] == "Allreduce" and ("synchronize", []) in log[:i], log
    free(comm)


def _rowmax(a, b):
    np.maximum(a, b, out=b)


# ids not "mpi": pytest-mpi skips, without --with-mpi, any test with that keyword
@pytest.mark.parametrize("transport", ["mpi", "host", "nccl"], ids=lambda t: f"by-{t}")
def test_a_user_op_never_gets_device_memory(log, transport):
    """The tree's packed combine is a user-defined op: MPI calls it on the host, so even a
    CUDA-aware MPI must be handed host copies; the result comes back as a device array."""
    comm = logged_comm(log, transport)
    x = dev(np.arange(12, dtype=np.float32))
    out = comm.allreduce(x, UserOp(_rowmax, 3))
    assert is_device(out) and np.array_equal(out, np.arange(12))
    out = comm.reduce(x, UserOp(_rowmax, 3), root=0)
    assert is_device(out) and np.array_equal(out, np.arange(12))
    calls = [(name, kinds) for name, kinds in log if name in ("Allreduce", "Reduce")]
    assert [name for name, _ in calls] == ["Allreduce", "Reduce"]
    assert all(kinds and set(kinds) == {"host"} for _, kinds in calls), calls
    free(comm)
