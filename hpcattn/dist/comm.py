"""The one communication layer: every byte a rank sends or receives passes here and is counted.

Wraps an mpi4py communicator (duplicated, so library traffic never mixes with the caller's).
Variants use `exchange` (post sends/receives now, `wait` later) for overlap and the collectives
below; none calls MPI directly. Arrays may be NumPy or CuPy: device arrays move by the
transport chosen with `use_transport` (transport.py: CUDA-aware MPI, NCCL or pinned staging).
"""
import contextlib
import pickle
import time

import numpy as np

from .. import profile
from ..arrays import is_device
from .transport import Transport


def _mpi():
    from mpi4py import MPI
    return MPI


def _staged(array):
    """(host array, back): the collectives other than exchange/allreduce move host memory only,
    so a device array is copied to the host and back(result) returns the result on the device
    (bytes counted the same either way). Host arrays pass through."""
    if not is_device(array):
        return array, lambda x: x
    import cupy
    return array.get(), lambda x: None if x is None else cupy.asarray(x)


# MPI ops and their datatypes belong to the process, not to a communicator, and MPI
# libraries allow only a few user ops: one per (fn, row width, dtype) for the process's life.
_USER_OPS = {}


class Pending:
    """Outstanding non-blocking transfers; `wait` completes them exactly once."""

    def __init__(self, comm, finish, received):
        self._comm, self._finish, self.received = comm, finish, received
        comm._outstanding.append(self)
        self._posted = profile.now()

    def wait(self):
        if self._finish is None:
            raise RuntimeError("Pending.wait() called twice")
        t = time.perf_counter()
        self._finish()
        self._comm._count(seconds=time.perf_counter() - t)
        profile.span("send/recv in flight", self._posted)
        self._finish = None
        self._comm._outstanding.remove(self)
        return self.received

    def test(self):
        """Advance the transfers without blocking (host MPI requests; device transports
        progress on their own streams)."""
        if self._finish is not None and hasattr(self._finish, "test"):
            self._finish.test()


class UserOp:
    """A reduction written in NumPy over rows of `width` elements of `dtype`.

    fn(a, b) -> None combines rows a into b in place (both (rows, width) arrays); it must be
    associative and, with commute=True, commutative. The comm layer turns it into an MPI op over
    a contiguous row datatype, so MPI never splits a row across calls.
    """

    def __init__(self, fn, width, dtype=np.float32, commute=True):
        self.fn, self.width, self.dtype, self.commute = fn, int(width), np.dtype(dtype), commute


class Comm:
    """A counted communicator. Attributes: rank, size, bytes_sent, bytes_received, comm_s.

    A sub-communicator made by `split`/`node_groups` counts its traffic into its parent too.
    """

    def __init__(self, mpi_comm=None, parent=None):
        MPI = _mpi()
        self.mpi = (mpi_comm if mpi_comm is not None else MPI.COMM_WORLD).Dup()
        self.rank, self.size = self.mpi.Get_rank(), self.mpi.Get_size()
        self.bytes_sent = self.bytes_received = 0
        self.comm_s = 0.0
        self._outstanding = []
        self.parent = parent
        self._children, self._groups = [], {}
        # device arrays are staged through host memory until use_transport says more; a
        # sub-communicator never reuses its parent's NCCL communicator (other ranks, other ids)
        inherit = parent is not None and parent.transport.name != "nccl"
        self.transport = parent.transport if inherit else Transport("host")

    def use_transport(self, requested, backend):
        """Choose how device arrays travel (auto|mpi|host|nccl) for backend numpy|cupy
        (collective); returns the transport's name."""
        from . import transport
        self.transport = transport.choose(self, requested, backend)
        return self.transport.name

    def free(self):
        """Release this communicator and its sub-communicators."""
        for child in self._children:
            child.free()
        self._children, self._groups = [], {}
        self.mpi.Free()

    def _count(self, sent=0, received=0, seconds=0.0):
        """Add traffic to this communicator and every parent (one place for all counting)."""
        c = self
        while c is not None:
            c.bytes_sent += int(sent)
            c.bytes_received += int(received)
            c.comm_s += seconds
            c = c.parent

    def _timed(self, fn, *args):
        t = time.perf_counter()
        with profile.phase(fn.__name__):
            out = fn(*args)
        self._count(seconds=time.perf_counter() - t)
        return out

    def exchange(self, sends, dest, recvs, source, tag=0):
        """Post Isend of each array in `sends` to dest and Irecv into each of `recvs` from source.

        Arrays must be contiguous, all host or all device arrays. Returns a Pending whose
        wait() yields `recvs` (for device arrays, ready for work queued after the wait).
        """
        self._count(sent=sum(b.nbytes for b in sends), received=sum(b.nbytes for b in recvs))
        t = time.perf_counter()
        finish = self.transport.exchange(self.mpi, sends, dest, recvs, source, tag)
        self._count(seconds=time.perf_counter() - t)
        return Pending(self, finish, recvs)

    def progress(self):
        """Let posted transfers advance while the caller computes: MPI without a progress
        thread moves large (rendezvous) messages only inside MPI calls, so kernels call this
        between tiles. Time spent here counts as comm_s."""
        if self._outstanding:
            t = time.perf_counter()
            for pending in self._outstanding:
                pending.test()
            self._count(seconds=time.perf_counter() - t)

    def _op(self, op, array):
        """(MPI op, buffer spec) for op = 'sum'|'max'|'min' or a UserOp."""
        MPI = _mpi()
        if not isinstance(op, UserOp):
            return {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op], array
        if array.dtype != op.dtype or array.size % op.width:
            raise ValueError(f"UserOp over rows of {op.width} {op.dtype} got {array.size} {array.dtype}")
        key = (op.fn, op.width, op.dtype.str, op.commute)
        if key not in _USER_OPS:
            row = MPI.Datatype.fromcode(op.dtype.char).Create_contiguous(op.width).Commit()

            def call(inbuf, inoutbuf, datatype, fn=op.fn, width=op.width, dtype=op.dtype):
                fn(np.frombuffer(inbuf, dtype=dtype).reshape(-1, width),
                   np.frombuffer(inoutbuf, dtype=dtype).reshape(-1, width))

            _USER_OPS[key] = (MPI.Op.Create(call, commute=op.commute), row)
        mpi_op, row = _USER_OPS[key]
        return mpi_op, [array, array.size // op.width, row]

    def allreduce(self, array, op="sum"):
        """Allreduce of a contiguous host array (op: sum|max|min or a UserOp), or of a device
        array (sum|max|min by the transport; a UserOp's NumPy body through host memory); bytes
        counted as one send and one receive of the array per rank (the logical volume)."""
        if is_device(array) and not isinstance(op, UserOp):
            out = self._timed(self.transport.allreduce, self.mpi, array, op)
            if self.size > 1:
                self._count(sent=array.nbytes, received=array.nbytes)
            return out
        array, back = _staged(array)
        out = np.empty_like(array)
        mpi_op, send = self._op(op, array)
        _, recv = self._op(op, out)
        self._timed(self.mpi.Allreduce, send, recv, mpi_op)
        if self.size > 1:
            self._count(array.nbytes, array.nbytes)
        return back(out)

    def reduce(self, array, op="sum", root=0):
        """Reduce a contiguous host array onto root (op as in allreduce). Returns the result on
        root, None elsewhere. Counted like a gather: each other rank sends the array once, root
        receives it from each of them."""
        array, back = _staged(array)
        out = np.empty_like(array) if self.rank == root else None
        mpi_op, send = self._op(op, array)
        recv = self._op(op, out)[1] if out is not None else None
        self._timed(self.mpi.Reduce, send, recv, mpi_op, root)
        if self.size > 1:
            if self.rank == root:
                self._count(received=array.nbytes * (self.size - 1))
            else:
                self._count(sent=array.nbytes)
        return back(out)

    def bcast(self, array, root=0):
        """Broadcast root's contiguous array in place into `array` on every rank (all ranks
        pass an array of the same shape and dtype; device arrays go through host memory).
        Returns it."""
        target = array
        array, back = _staged(array)
        self._timed(self.mpi.Bcast, array, root)
        if self.size > 1:
            if self.rank == root:
                self._count(sent=array.nbytes * (self.size - 1))
            else:
                self._count(received=array.nbytes)
        if target is not array:
            target[...] = back(array)
        return target

    def allgather_rows(self, array, rows):
        """Concatenate every rank's `array` (n_r, ...) along axis 0 in rank order.

        rows: (P,) the n_r of every rank (known to all). Each rank sends its piece to P-1
        others and receives every other piece. Returns a new contiguous array.
        """
        MPI = _mpi()
        array, back = _staged(array)
        array = np.ascontiguousarray(array)
        rows = np.asarray(rows, dtype=np.int64)
        row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.itemsize
        out = np.empty((int(rows.sum()), *array.shape[1:]), dtype=array.dtype)
        if row_bytes and out.size:
            row = MPI.BYTE.Create_contiguous(row_bytes).Commit()
            displs = np.concatenate([[0], np.cumsum(rows)[:-1]])
            self._timed(self.mpi.Allgatherv, [array, len(array), row], [out, (rows, displs), row])
            row.Free()
        if self.size > 1:
            self._count(array.nbytes * (self.size - 1), row_bytes * (int(rows.sum()) - len(array)))
        return back(out)

    def alltoallv(self, array, send_rows, recv_rows=None):
        """Personalised exchange: rows send_rows[d] of `array` (in destination order, axis 0)
        go to rank d. recv_rows, when the caller knows them, saves the count exchange (P-1
        int64 each way, counted). Rows to self are copied, not counted. Returns
        (received array in source order, recv_rows)."""
        MPI = _mpi()
        array, back = _staged(array)
        array = np.ascontiguousarray(array)
        send_rows = np.asarray(send_rows, dtype=np.int64)
        if recv_rows is None:
            recv_rows = np.empty_like(send_rows)
            self._timed(self.mpi.Alltoall, send_rows, recv_rows)
            if self.size > 1:
                self._count(8 * (self.size - 1), 8 * (self.size - 1))
        recv_rows = np.asarray(recv_rows, dtype=np.int64)
        row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.itemsize
        out = np.empty((int(recv_rows.sum()), *array.shape[1:]), dtype=array.dtype)
        if row_bytes:  # collective: every rank calls, even with nothing to move
            row = MPI.BYTE.Create_contiguous(row_bytes).Commit()
            sd = np.concatenate([[0], np.cumsum(send_rows)[:-1]])
            rd = np.concatenate([[0], np.cumsum(recv_rows)[:-1]])
            self._timed(self.mpi.Alltoallv, [array, (send_rows, sd), row], [out, (recv_rows, rd), row])
            row.Free()
        me = self.rank
        self._count(row_bytes * int(send_rows.sum() - send_rows[me]),
                    row_bytes * int(recv_rows.sum() - recv_rows[me]))
        return back(out), recv_rows

    def split(self, color, key=None):
        """A counted sub-communicator of the ranks with the same color (None: not a member;
        returns None there). Collective over this communicator."""
        MPI = _mpi()
        sub = self.mpi.Split(MPI.UNDEFINED if color is None else int(color),
                             self.rank if key is None else int(key))
        if sub == MPI.COMM_NULL:
            return None
        child = Comm(sub, parent=self)
        sub.Free()
        self._children.append(child)
        return child

    def node_color(self, ranks_per_node=None):
        """This rank's node index: rank // ranks_per_node for simulated nodes, else the lowest
        rank sharing its memory (collective over the node)."""
        if ranks_per_node:
            return self.rank // int(ranks_per_node)
        MPI = _mpi()
        local = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        first = local.allreduce(self.rank, op=MPI.MIN)
        local.Free()
        return first

    def node_groups(self, ranks_per_node=None):
        """(node, leaders): the counted communicator of this rank's node (node-rank 0 = its
        lowest rank) and, on node leaders only, the communicator of all leaders (None
        elsewhere). Nodes are simulated by ranks_per_node when given. Collective the first
        time for a given ranks_per_node, then cached."""
        if ranks_per_node not in self._groups:
            node = self.split(self.node_color(ranks_per_node))
            leaders = self.split(0 if node.rank == 0 else None)
            self._groups[ranks_per_node] = (node, leaders)
        return self._groups[ranks_per_node]

    def allgather_object(self, obj):
        """Small control data (shard sizes, error messages) from every rank, in rank order."""
        out = self._timed(self.mpi.allgather, obj)
        if self.size > 1:
            n = len(pickle.dumps(obj))
            self._count(n * (self.size - 1),
                        sum(len(pickle.dumps(o)) for i, o in enumerate(out) if i != self.rank))
        return out

    def bcast_object(self, obj, root=0):
        out = self._timed(self.mpi.bcast, obj, root)
        if self.size > 1:
            n = len(pickle.dumps(out))
            if self.rank == root:
                self._count(sent=n * (self.size - 1))
            else:
                self._count(received=n)
        return out

    def gather_object(self, obj, root=0):
        out = self._timed(self.mpi.gather, obj, root)
        if self.size > 1:
            if self.rank == root:
                self._count(received=sum(len(pickle.dumps(o)) for i, o in enumerate(out) if i != root))
            else:
                self._count(sent=len(pickle.dumps(obj)))
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

    def node_ids(self, ranks_per_node=None):
        """The node of every rank (collective unless ranks_per_node is given): with
        ranks_per_node K, simulated nodes of K consecutive ranks (no communication); otherwise
        ranks sharing memory (COMM_TYPE_SHARED), named by their lowest rank."""
        if ranks_per_node is not None:
            if ranks_per_node < 1:
                raise ValueError(f"ranks per node must be >= 1, got {ranks_per_node}")
            return [q // ranks_per_node for q in range(self.size)]
        MPI = _mpi()
        local = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            leader = self._timed(local.allreduce, self.rank, MPI.MIN)
            if local.Get_size() > 1:
                self.bytes_sent += 8
                self.bytes_received += 8
        finally:
            local.Free()
        return self.allgather_object(leader)

    def counters(self):
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "comm_s": self.comm_s}


@contextlib.contextmanager
def counted(comm):
    """A Comm for the duration of one call: `comm` itself if it already counts, else a counted
    duplicate of it (or of COMM_WORLD), freed afterwards so repeated calls leak nothing."""
    if isinstance(comm, Comm):
        yield comm
        return
    c = Comm(comm)
    try:
        yield c
    finally:
        c.free()
