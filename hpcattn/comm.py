"""The one communication layer: every byte a rank sends or receives passes here and is counted.

Wraps an mpi4py communicator (duplicated, so library traffic never mixes with the caller's).
Variants use `exchange` (post sends/receives now, `wait` later) for overlap and the collectives
below; none calls MPI directly.
"""
import pickle
import time

import numpy as np


def _mpi():
    from mpi4py import MPI
    return MPI


def _wire(buf):
    """Point-to-point message spec: float16 travels as raw bytes, since MPI libraries without
    a half-precision datatype (Debian's Open MPI 4) cannot map it; the bytes are the same."""
    return [buf, _mpi().BYTE] if buf.dtype.char == "e" else buf


class Pending:
    """Outstanding non-blocking transfers; `wait` completes them exactly once."""

    def __init__(self, comm, requests, received):
        self._comm, self._requests, self.received = comm, requests, received

    def wait(self):
        if self._requests is None:
            raise RuntimeError("Pending.wait() called twice")
        t = time.perf_counter()
        _mpi().Request.Waitall(self._requests)
        self._comm.comm_s += time.perf_counter() - t
        self._requests = None
        return self.received


class Comm:
    """A counted communicator. Attributes: rank, size, bytes_sent, bytes_received, comm_s."""

    def __init__(self, mpi_comm=None):
        MPI = _mpi()
        self.mpi = (mpi_comm if mpi_comm is not None else MPI.COMM_WORLD).Dup()
        self.rank, self.size = self.mpi.Get_rank(), self.mpi.Get_size()
        self.bytes_sent = self.bytes_received = 0
        self.comm_s = 0.0

    @classmethod
    def wrap(cls, comm):
        """A Comm for `comm`: itself if already counted, else a counted duplicate."""
        return comm if isinstance(comm, cls) else cls(comm)

    def free(self):
        self.mpi.Free()

    def _timed(self, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.comm_s += time.perf_counter() - t
        return out

    def exchange(self, sends, dest, recvs, source, tag=0):
        """Post Isend of each array in `sends` to dest and Irecv into each of `recvs` from source.

        Arrays must be contiguous host arrays. Returns a Pending whose wait() yields `recvs`.
        """
        reqs = []
        for i, buf in enumerate(recvs):
            reqs.append(self.mpi.Irecv(_wire(buf), source=source, tag=tag + i))
            self.bytes_received += buf.nbytes
        for i, buf in enumerate(sends):
            reqs.append(self.mpi.Isend(_wire(buf), dest=dest, tag=tag + i))
            self.bytes_sent += buf.nbytes
        return Pending(self, reqs, recvs)

    def allreduce(self, array, op="sum"):
        """Allreduce of a contiguous host array (op: sum|max|min); bytes counted as one
        send and one receive of the array per rank (the logical volume)."""
        MPI = _mpi()
        out = np.empty_like(array)
        self._timed(self.mpi.Allreduce, array, out, {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op])
        if self.size > 1:
            self.bytes_sent += array.nbytes
            self.bytes_received += array.nbytes
        return out

    def allgather_object(self, obj):
        """Small control data (shard sizes, error messages) from every rank, in rank order."""
        out = self._timed(self.mpi.allgather, obj)
        if self.size > 1:
            n = len(pickle.dumps(obj))
            self.bytes_sent += n * (self.size - 1)
            self.bytes_received += sum(len(pickle.dumps(o)) for i, o in enumerate(out) if i != self.rank)
        return out

    def bcast_object(self, obj, root=0):
        out = self._timed(self.mpi.bcast, obj, root)
        if self.size > 1:
            n = len(pickle.dumps(out))
            if self.rank == root:
                self.bytes_sent += n * (self.size - 1)
            else:
                self.bytes_received += n
        return out

    def gather_object(self, obj, root=0):
        out = self._timed(self.mpi.gather, obj, root)
        if self.size > 1:
            if self.rank == root:
                self.bytes_received += sum(len(pickle.dumps(o)) for i, o in enumerate(out) if i != root)
            else:
                self.bytes_sent += len(pickle.dumps(obj))
        return out

    def barrier(self):
        self._timed(self.mpi.Barrier)

    def abort(self, code=1):
        self.mpi.Abort(code)

    def nodes(self):
        """Number of distinct shared-memory nodes in this communicator (collective)."""
        MPI = _mpi()
        local = self.mpi.Split_type(MPI.COMM_TYPE_SHARED)
        leader = int(local.Get_rank() == 0)
        local.Free()
        return int(self.mpi.allreduce(leader))

    def counters(self):
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "comm_s": self.comm_s}
