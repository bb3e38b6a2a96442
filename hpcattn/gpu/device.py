"""The GPU backend's process setup: which backend, which device, which stream.

A rank takes device (node-local rank mod devices on the node), found with
Split_type(COMM_TYPE_SHARED), before it allocates anything; kernels then run on a
non-blocking compute stream, and transfers on the transport's own stream (dist/transport.py).
"""
import os

from ..errors import HpcattnError

BACKENDS = ("auto", "numpy", "cupy")


def device_count():
    """CUDA devices visible through CuPy (0 without CuPy, driver or device)."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # ImportError, CUDARuntimeError, missing libraries: all mean none
        return 0


def chosen_backend(requested=None):
    """'cupy' or 'numpy': HPCATTN_BACKEND (auto|numpy|cupy), auto = cupy when a GPU is seen."""
    requested = requested or os.environ.get("HPCATTN_BACKEND", "auto")
    if requested not in BACKENDS:
        raise HpcattnError(f"HPCATTN_BACKEND={requested!r}: expected one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return "cupy" if device_count() else "numpy"
    if requested == "cupy" and not device_count():
        raise HpcattnError("backend cupy asked for, but CuPy sees no GPU")
    return requested


def local_rank(mpi_comm):
    """(rank, size) of this process among the ranks of its shared-memory node (collective)."""
    from mpi4py import MPI
    local = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
    out = local.Get_rank(), local.Get_size()
    local.Free()
    return out


def setup(mpi_comm):
    """Select this rank's device and make a non-blocking compute stream current (collective).
    Returns the device id."""
    import cupy
    rank, _ = local_rank(mpi_comm)
    dev = rank % device_count()
    cupy.cuda.Device(dev).use()
    stream = cupy.cuda.Stream(non_blocking=True)
    stream.use()
    setup.stream = stream  # kept alive for the process
    return dev


def xp(name):
    """The array module of a backend name."""
    if name == "cupy":
        import cupy
        return cupy
    import numpy
    return numpy
