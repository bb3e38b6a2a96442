"""How arrays cross between ranks. comm.Comm owns one Transport and counts the bytes; a
Transport only moves them. Host (NumPy) arrays always go through plain MPI. Device (CuPy)
arrays go by the chosen transport:

- "mpi":  CUDA-aware MPI, device buffers straight to mpi4py after the compute stream is synced;
- "nccl": cupy.cuda.nccl send/recv on the transport's stream, bootstrapped over MPI;
- "host": staged through pinned host buffers on the transport's stream.
"""
import ctypes
import socket

import numpy as np

from ..arrays import is_device
from ..errors import HpcattnError

NAMES = ("auto", "mpi", "host", "nccl")


def _mpi():
    from mpi4py import MPI
    return MPI


class _Requests:
    """Posted MPI requests: calling completes them, test() advances them without blocking."""

    def __init__(self, reqs):
        self.reqs = reqs

    def __call__(self):
        _mpi().Request.Waitall(self.reqs)

    def test(self):
        _mpi().Request.Testall(self.reqs)


def _wire(buf):
    """Point-to-point message spec: 16-bit floats travel as raw bytes, since MPI libraries
    have no bfloat16 and some no half-precision datatype (Debian's Open MPI 4); the bytes are
    the same."""
    return [buf.view(np.uint8), _mpi().BYTE] if buf.dtype.name in ("float16", "bfloat16") else buf


def _plain(mpi, sends, dest, recvs, source, tag):
    reqs = [mpi.Irecv(_wire(b), source=source, tag=tag + i) for i, b in enumerate(recvs)]
    reqs += [mpi.Isend(_wire(b), dest=dest, tag=tag + i) for i, b in enumerate(sends)]
    return _Requests(reqs)


class Transport:
    """Moves host arrays by MPI and device arrays by `name` (mpi|host|nccl)."""

    def __init__(self, name="host", nccl_comm=None):
        self.name, self._nccl = name, nccl_comm
        self._stream = None

    @property
    def stream(self):
        if self._stream is None:
            import cupy
            self._stream = cupy.cuda.Stream(non_blocking=True)
        return self._stream

    def _after_compute(self):
        """Make the transport stream wait for the work queued so far on the compute stream."""
        import cupy
        self.stream.wait_event(cupy.cuda.get_current_stream().record())

    def _before_compute(self):
        """Make the compute stream wait for what the transport stream queued."""
        import cupy
        cupy.cuda.get_current_stream().wait_event(self.stream.record())

    def exchange(self, mpi, sends, dest, recvs, source, tag):
        """Post the transfers; returns a callable that completes them."""
        if not any(map(is_device, (*sends, *recvs))):
            return _plain(mpi, sends, dest, recvs, source, tag)
        if not all(map(is_device, (*sends, *recvs))):
            raise HpcattnError("exchange mixes host and device arrays", collective=True)
        if self.name == "mpi":
            import cupy
            cupy.cuda.get_current_stream().synchronize()
            return _plain(mpi, sends, dest, recvs, source, tag)
        if self.name == "nccl":
            return self._nccl_exchange(sends, dest, recvs, source)
        return self._staged_exchange(mpi, sends, dest, recvs, source, tag)

    def _staged_exchange(self, mpi, sends, dest, recvs, source, tag):
        import cupyx
        self._after_compute()
        out = [cupyx.empty_pinned(b.shape, b.dtype) for b in sends]
        inn = [cupyx.empty_pinned(b.shape, b.dtype) for b in recvs]
        for h, d in zip(out, sends):
            d.get(stream=self.stream, out=h)
        self.stream.synchronize()
        wait = _plain(mpi, out, dest, inn, source, tag)

        def finish():
            wait()
            for h, d in zip(inn, recvs):
                d.set(h, stream=self.stream)
            self._before_compute()
            self.stream.synchronize()  # pinned buffers are reused by the pool once freed
        return finish

    def _nccl_exchange(self, sends, dest, recvs, source):
        from cupy.cuda import nccl
        self._after_compute()
        s = self.stream.ptr
        nccl.groupStart()
        for b in recvs:
            self._nccl.recv(b.data.ptr, b.nbytes, nccl.NCCL_INT8, source, s)
        for b in sends:
            self._nccl.send(b.data.ptr, b.nbytes, nccl.NCCL_INT8, dest, s)
        nccl.groupEnd()
        return self._before_compute

    def allreduce(self, mpi, array, op):
        """Allreduce (op: sum|max|min) of a contiguous array into a new array of its kind."""
        MPI = _mpi()
        mpi_op = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
        if not is_device(array):
            import numpy as np
            out = np.empty_like(array)
            mpi.Allreduce(array, out, mpi_op)
            return out
        import cupy
        if self.name == "mpi":
            out = cupy.empty_like(array)
            cupy.cuda.get_current_stream().synchronize()
            mpi.Allreduce(array, out, mpi_op)
            return out
        if self.name == "nccl":
            from cupy.cuda import nccl
            types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64,
                     "int64": nccl.NCCL_INT64, "int32": nccl.NCCL_INT32, "float16": nccl.NCCL_FLOAT16}
            out = cupy.empty_like(array)
            self._after_compute()
            self._nccl.allReduce(array.data.ptr, out.data.ptr, array.size, types[str(array.dtype)],
                                 {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}[op],
                                 self.stream.ptr)
            self._before_compute()
            return out
        host = array.get()
        out = host.copy()
        mpi.Allreduce(host, out, mpi_op)
        return cupy.asarray(out)


def cuda_aware():
    """True/False from Open MPI's MPIX_Query_cuda_support (MPI must be initialised), or None
    when the library does not say."""
    from mpi4py import MPI
    try:
        lib = ctypes.CDLL(MPI.__file__, mode=ctypes.RTLD_GLOBAL)
        query = lib.MPIX_Query_cuda_support
    except (OSError, AttributeError):
        try:
            query = ctypes.CDLL(None).MPIX_Query_cuda_support
        except AttributeError:
            return None
    query.restype = ctypes.c_int
    return bool(query())


def cuda_aware_word():
    """cuda_aware() as the word `hpcattn info` and the output's `cuda_aware_mpi` attribute use."""
    return {True: "yes", False: "no", None: "unknown"}[cuda_aware()]


def choose(comm, requested, backend):
    """The Transport for `requested` (auto|mpi|host|nccl) on this backend (collective over the
    hpcattn Comm `comm`, whose counted collectives carry the agreement; every rank gets the
    same choice or the same error)."""
    if requested not in NAMES:
        raise HpcattnError(f"--transport {requested}: expected one of {', '.join(NAMES)}", collective=True)
    if backend != "cupy":
        if requested not in ("auto", "mpi", "host"):
            raise HpcattnError(f"--transport {requested} needs the GPU backend", collective=True)
        return Transport("mpi")
    import cupy
    try:
        from cupy.cuda import nccl
        has_nccl = bool(nccl.available)
    except Exception:
        has_nccl = False
    where = (socket.gethostname(), cupy.cuda.Device().id, bool(cuda_aware()), has_nccl)
    seen = comm.allgather_object(where)
    aware = all(s[2] for s in seen)
    distinct = len({s[:2] for s in seen}) == len(seen)  # NCCL refuses two ranks on one GPU
    nccl_ok = all(s[3] for s in seen) and distinct
    name = requested
    if requested == "auto":
        name = "mpi" if aware else "nccl" if nccl_ok and len(seen) > 1 else "host"
    elif requested == "mpi" and not aware:
        raise HpcattnError("--transport mpi needs a CUDA-aware MPI; this library does not say it is "
                           "(use --transport host or nccl)", collective=True)
    elif requested == "nccl" and not nccl_ok:
        raise HpcattnError("--transport nccl needs cupy.cuda.nccl on every rank and one GPU per rank",
                           collective=True)
    if name == "nccl":
        uid = comm.bcast_object(nccl.get_unique_id() if comm.rank == 0 else None)
        nc = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        return Transport(name, nc)
    return Transport(name)
