"""HDF5 input and output to the contract of DESIGN.md section 2.

Every rank reads only its hyperslab. Results are written under a temporary name and renamed
to the final one only after `complete` = 1 is set, so a failed run leaves no result-looking file.
Writes go through `Output`: parallel HDF5 (`mpio` driver, collective transfers) when h5py has
it, else ordered per-rank writes; one ordinary file with the same content either way.
This module knows nothing of the attention maths.
"""
import contextlib
import os
import shutil
import sys
import time
import uuid

import h5py
import ml_dtypes
import numpy as np

from . import validate
from ..api import check_shapes
from ..errors import HpcattnError, agree
from ..profile import phase

FILE_DTYPES = ("float32", "float16", "bfloat16")  # what input and output files hold
BF16 = np.dtype(ml_dtypes.bfloat16)
BF16_FIELDS = (15, 7, 8, 0, 7)  # HDF5 float fields: sign bit, exponent (pos, size), mantissa (pos, size)
BF16_EBIAS = 127
STATS = ("bytes_sent", "bytes_received", "compute_s", "comm_s", "io_s", "wall_s", "edges",
         "q_rows", "kv_rows")


@contextlib.contextmanager
def _open(path, mode="r"):
    """The open HDF5 file; HDF5 errors while it is used (a damaged file) become HpcattnError."""
    if os.path.isdir(path):
        raise HpcattnError(f"{path!r} is a directory, not an HDF5 file")
    try:
        f = h5py.File(path, mode)
    except FileNotFoundError:
        raise HpcattnError(f"input file {path!r} does not exist") from None
    except OSError as e:
        raise HpcattnError(f"cannot open {path!r} as HDF5 ({e})") from None
    with f:
        try:
            yield f
        except HpcattnError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise HpcattnError(f"cannot read {path!r}, the file is damaged ({e})") from None


def file_dtype(name):
    """The NumPy dtype of a FILE_DTYPES name ("bfloat16": ml_dtypes.bfloat16)."""
    return BF16 if str(name) == "bfloat16" else np.dtype(name)


def _bf16_type():
    """The HDF5 type of bfloat16 in files: an IEEE-style little-endian 16-bit float, sign bit 15,
    exponent bits 7..14 (bias 127), mantissa bits 0..6 (HDF5 2.0's H5T_FLOAT_BFLOAT16LE
    layout), which h5py and other HDF5 tools read as a float."""
    t = h5py.h5t.IEEE_F32LE.copy()
    t.set_fields(*BF16_FIELDS)
    t.set_offset(0)
    t.set_precision(16)
    t.set_size(2)
    t.set_ebias(BF16_EBIAS)
    return t


BF16_TYPE = _bf16_type()


def _is_bf16(tid):
    """True when the HDF5 type `tid` has the bfloat16 layout (either byte order)."""
    return (isinstance(tid, h5py.h5t.TypeFloatID) and tid.get_size() == 2
            and tid.get_fields() == BF16_FIELDS and tid.get_ebias() == BF16_EBIAS)


def stored_dtype(ds):
    """The NumPy dtype a dataset holds: ml_dtypes.bfloat16 for the bfloat16 layout (h5py alone
    would report float32), else the dataset's own dtype."""
    return BF16 if _is_bf16(ds.id.get_type()) else ds.dtype


def native_bytes(ds):
    """The dtype whose native-order bytes the dataset stores as they are (so they may be read
    straight from the file), else None (another byte order)."""
    tid = ds.id.get_type()
    if _is_bf16(tid):
        little = tid.get_order() == h5py.h5t.ORDER_LE
        return BF16 if little == (sys.byteorder == "little") else None
    return ds.dtype if ds.dtype.isnative else None


def _select(ds, selection):
    """h5py's own parse of ds[selection]: file space `.id`, memory shape `.mshape`, `.array_shape`."""
    from h5py._hl.selections import select
    return select(ds.shape, selection if isinstance(selection, tuple) else (selection,), ds)


def read(ds, selection=Ellipsis):
    """ds[selection] in the stored dtype (bfloat16 read bit for bit, through its HDF5 type)."""
    if not _is_bf16(ds.id.get_type()):
        return ds[selection]
    sel = _select(ds, selection)
    out = np.zeros(sel.array_shape, np.uint16)
    if sel.nselect:
        ds.id.read(h5py.h5s.create_simple(sel.mshape), sel.id, out, mtype=BF16_TYPE)
    return out.view(BF16)


def write(ds, selection, arr, dxpl=None):
    """ds[selection] = arr, converted to the stored dtype (bfloat16 written bit for bit)."""
    sel = _select(ds, selection)
    if sel.nselect:
        buf, mtype = _buffer(ds, np.broadcast_to(arr, sel.array_shape))
        ds.id.write(h5py.h5s.create_simple(sel.mshape), sel.id, buf, mtype=mtype, dxpl=dxpl)


def _buffer(ds, arr):
    """(contiguous buffer, HDF5 memory type or None) that write arr's values into ds: bfloat16
    as its uint16 bit patterns under the bfloat16 type."""
    if _is_bf16(ds.id.get_type()):
        return np.ascontiguousarray(np.asarray(arr).astype(BF16, copy=False)).view(np.uint16), BF16_TYPE
    return np.ascontiguousarray(arr, dtype=ds.dtype), None


def create(f, name, shape, dtype, **kwargs):
    """f.create_dataset(name, shape, dtype, **kwargs), bfloat16 stored in its HDF5 layout."""
    if np.dtype(dtype) == BF16:
        dtype = h5py.Datatype(BF16_TYPE.copy())
    return f.create_dataset(name, shape=shape, dtype=dtype, **kwargs)


class Lazy:
    """A dataset read on indexing in its stored dtype (for code that slices arrays)."""

    def __init__(self, ds):
        self.ds, self.shape, self.dtype = ds, ds.shape, stored_dtype(ds)

    def __getitem__(self, selection):
        return read(self.ds, selection)


def _dataset(f, name, path):
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise HpcattnError(f"input {path!r} has no dataset {name!r}")
    return f[name]


def read_meta(path, need_do=False):
    """Shapes and dtype of an input file, validated; HpcattnError names what is wrong."""
    with _open(path) as f:
        q, k, v = (_dataset(f, n, path) for n in ("q", "k", "v"))
        dtype = stored_dtype(q)
        problem = check_shapes(q.shape, k.shape, v.shape, (dtype, stored_dtype(k), stored_dtype(v)))
        if problem:
            raise HpcattnError(f"input {path!r}: {problem}")
        B, Nq, H, D = q.shape
        N, Hkv = k.shape[1], k.shape[2]
        meta = dict(B=B, Nq=Nq, N=N, H=H, Hkv=Hkv, D=D, dtype=dtype.newbyteorder("="),
                    positions="q_positions" in f, do="do" in f)
        validate.dims(path, meta)
        if meta["positions"]:
            p = _dataset(f, "q_positions", path)
            if p.shape != (Nq,) or p.dtype.kind not in "iu":
                raise HpcattnError(f"input {path!r}: q_positions must be ({Nq},) integers, "
                                   f"got {p.shape} {p.dtype}")
        elif Nq != N:
            raise HpcattnError(f"input {path!r}: q has {Nq} rows but k has {N}; "
                               "q_positions is needed when they differ")
        if need_do:
            do = _dataset(f, "do", path)
            if do.shape != q.shape or stored_dtype(do) != dtype:
                raise HpcattnError(f"input {path!r}: do must match q {q.shape} {dtype}, "
                                   f"got {do.shape} {stored_dtype(do)}")
    return meta


def _ranges(r):
    """A (start, stop) pair or a list of them, as a list."""
    return [tuple(r)] if len(r) == 2 and np.isscalar(r[0]) else [tuple(x) for x in r]


def _rows(ds, ranges, axis=1):
    """The rows of ds in the given ranges along axis, concatenated (one hyperslab each)."""
    parts = [read(ds, (slice(None),) * axis + (slice(a, b),)) for a, b in ranges]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def read_shard(path, meta, q_range, kv_range, backward=False, times=None):
    """This rank's rows: q (and do with backward), q positions, k, v in native byte order;
    refused before reading when they cannot fit in memory, after reading when they hold
    NaN/Inf, huge values or bad positions. q_range, kv_range: a (start, stop) pair or a list
    of them (zigzag layout). times: a dict that gets read_s and check_s."""
    t = time.perf_counter()
    q_ranges, kv_ranges = _ranges(q_range), _ranges(kv_range)
    validate.fits(path, meta, q_ranges, kv_ranges)
    with phase("read"), _open(path) as f:
        out = {"q": _rows(f["q"], q_ranges), "k": _rows(f["k"], kv_ranges), "v": _rows(f["v"], kv_ranges)}
        if backward:
            out["do"] = _rows(f["do"], q_ranges)
        out = {name: arr.astype(meta["dtype"], copy=False) for name, arr in out.items()}  # native order
        if meta["positions"]:
            raw = _rows(f["q_positions"], q_ranges, axis=0)
            validate.positions(path, raw, meta["N"])
            out["q_positions"] = raw.astype(np.int64)
        else:
            out["q_positions"] = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in q_ranges])
    read_s, t = time.perf_counter() - t, time.perf_counter()
    with phase("check"):
        for name in [n for n in ("q", "k", "v", "do") if n in out]:
            at = 0
            for a, b in (kv_ranges if name in ("k", "v") else q_ranges):
                validate.values(path, name, out[name][:, at:at + b - a], a)
                at += b - a
    if times is not None:
        times.update(read_s=read_s, check_s=time.perf_counter() - t)
    return out


def read_csr(path, meta, qpos):
    """The explicit mask's rows min(qpos)..max(qpos): one hyperslab of mask/indptr and the
    matching slice of mask/indices, validated (masks.check_csr) before any index is used."""
    from ..masks import CsrRows, check_csr
    N = meta["N"]
    with _open(path) as f:
        ptr, idx = _dataset(f, "mask/indptr", path), _dataset(f, "mask/indices", path)
        for name, ds in (("mask/indptr", ptr), ("mask/indices", idx)):
            if ds.ndim != 1 or ds.dtype.kind not in "iu":
                raise HpcattnError(f"input {path!r}: {name} must be 1-D integers, got {ds.shape} {ds.dtype}")
        if ptr.shape[0] != N + 1:
            raise HpcattnError(f"input {path!r}: mask/indptr must have {N + 1} entries (one per "
                               f"key position + 1), got {ptr.shape[0]}")
        if int(ptr[0]) != 0 or int(ptr[N]) != idx.shape[0]:
            raise HpcattnError(f"input {path!r}: mask/indptr must run from 0 to len(mask/indices) "
                               f"= {idx.shape[0]}, got {int(ptr[0])} .. {int(ptr[N])}")
        if len(qpos) == 0:
            return CsrRows(np.zeros(1, np.int64), np.zeros(0, np.int64), 0, N, np.zeros(0, np.int64))
        lo, hi = int(np.min(qpos)), int(np.max(qpos))
        indptr = ptr[lo:hi + 2].astype(np.int64)
        a, b = int(indptr[0]), int(indptr[-1])
        if not 0 <= a <= b <= idx.shape[0]:
            raise HpcattnError(f"input {path!r}: mask/indptr rows {lo}..{hi} point outside "
                               f"mask/indices ({a} .. {b} of {idx.shape[0]})")
        indices = idx[a:b]
    return check_csr(indptr, indices, N, row0=lo, where=f"input {path!r}: mask")


def temp_name(comm, final):
    """A temporary path beside `final`, the same on every rank."""
    name = f"{final}.tmp-{uuid.uuid4().hex[:12]}" if comm.rank == 0 else None
    return comm.bcast_object(name)


def parallel_hdf5():
    """True when h5py was built against parallel HDF5 (the `mpio` driver is available)."""
    return bool(h5py.get_config().mpi)


CHUNK_BYTES = 1 << 20  # target size of one HDF5 storage chunk


def chunks_for(shape, axis, dtype):
    """Storage chunks for the sequence axis: whole rows of every other axis but the leading
    batch, about CHUNK_BYTES each, so a rank's contiguous rows map to few chunks."""
    shape = tuple(int(n) for n in shape)
    row = int(np.prod([n for i, n in enumerate(shape) if i > axis], dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = max(1, min(shape[axis], CHUNK_BYTES // max(1, row)))
    return tuple(max(1, rows if i == axis else (1 if i < axis else n)) for i, n in enumerate(shape))


def _space_problem(tmp, final, datasets, compression):
    """A message when the output's directory cannot hold the uncompressed datasets (checked
    up front: HDF5 reports a full disk late, at flush or close), else None."""
    need = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
               for shape, dtype, _ in datasets.values())
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free
    except OSError as e:
        return f"cannot create output {final!r}: {e}"
    if compression is None and need > free:
        return (f"cannot create output {final!r}: it needs {need / 2**20:.1f} MiB but its file system "
                f"has {free / 2**20:.1f} MiB free (No space left on device)")
    return None


class Output:
    """An output file under a temporary name that every rank writes rows into (collective).

    With parallel HDF5 every rank keeps the file open through the `mpio` driver on the
    Comm's own duplicated communicator and writes with collective transfers; otherwise
    (`hdf5` = "serial") ranks open it in turn and write their rows in rank order. Either way
    the result is one ordinary HDF5 file with the same content. `datasets`: name ->
    (global shape, dtype, sequence axis). Datasets are chunked along the sequence axis,
    optionally compressed (`compression`: None, "gzip" or "lzf").
    """

    def __init__(self, comm, tmp, final, datasets, mode="w", compression=None, mpio=None):
        self.comm, self.tmp, self.final = comm, tmp, final
        self.mpio = parallel_hdf5() if mpio is None else mpio
        self.hdf5 = "mpio" if self.mpio else "serial"
        self.names = sorted(datasets)
        self.axes = {name: axis for name, (_, _, axis) in datasets.items()}
        self.file = self.own_comm = None
        problem = None
        if self.mpio:
            from h5py import h5fd, h5p
            self.dxpl = h5p.create(h5p.DATASET_XFER)
            self.dxpl.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE)
            if comm.rank == 0 and mode == "w":
                problem = _space_problem(tmp, final, datasets, compression)
            agree(comm, problem)
            try:
                self.file = h5py.File(tmp, mode, driver="mpio", comm=comm.mpi)
            except OSError as e:
                problem = f"cannot {'create' if mode == 'w' else 'open'} output {final!r}: {e}"
            agree(comm, problem)
            if mode == "w":  # dataset creation is collective under mpio: same calls on every rank
                try:
                    self._create(self.file, datasets, compression)
                except (OSError, RuntimeError, ValueError) as e:
                    problem = f"cannot create output {final!r}: {e}"
        else:
            self.dxpl = None
            if comm.rank == 0 and mode == "w":
                problem = _space_problem(tmp, final, datasets, compression)
                try:
                    if problem is None:
                        with h5py.File(tmp, "w") as f:
                            self._create(f, datasets, compression)
                except (OSError, RuntimeError, ValueError) as e:
                    problem = f"cannot create output {final!r}: {e}"
            elif comm.rank == 0 and not os.access(tmp, os.R_OK | os.W_OK):
                problem = f"cannot open {tmp!r} for writing"
        agree(comm, problem)
        self.rows, self.fd = None, None
        if not self.mpio and compression is None:
            try:
                self.rows = Rows.of_file(tmp, self.axes)
                self.fd = os.open(tmp, os.O_WRONLY) if self.rows else None
            except OSError as e:
                problem = f"cannot open output {final!r}: {e}"
            agree(comm, problem)

    def _create(self, f, datasets, compression):
        """The datasets, chunked along the sequence axis. Serial and uncompressed: every chunk
        allocated now and never filled, so that ranks write their rows' bytes in place (Rows)."""
        dcpl = None
        if not self.mpio and compression is None:
            from h5py import h5d, h5p
            dcpl = h5p.create(h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
        for name, (shape, dtype, axis) in sorted(datasets.items()):
            create(f, name, shape, dtype, chunks=chunks_for(shape, axis, dtype), compression=compression,
                   fillvalue=0, **({"dcpl": dcpl.copy(), "fill_time": "never"} if dcpl else {}))

    def put(self, items):
        """Not collective: write this rank's items (as for `write`) straight into the file's
        preallocated chunks (serial h5py, no compression: `self.rows`), beside other ranks
        doing the same on other rows, any thread; returns a problem message or None."""
        try:
            for name, rows, arr in items:
                self.rows[name].put(self.fd, rows, arr)
        except OSError as e:
            return f"cannot write output {self.final!r}: {e}"
        return None

    def write(self, items):
        """Collective: write this rank's items, a list of (name, (start, stop) of the sequence
        axis, array); a rank may pass none (empty list) and still takes part. Without parallel
        HDF5, ranks write their bytes in place at once (`put`), or, where the chunks are
        compressed, open the file in rank order."""
        if self.rows is not None:
            agree(self.comm, self.put(items))
            return
        by_name = {}
        for name, rows, arr in items:
            by_name.setdefault(name, []).append((rows, arr))
        if self.mpio:
            # collective transfers: every rank makes the same number of writes per dataset
            counts = self.comm.allgather_object([len(by_name.get(n, ())) for n in self.names])
            most = np.max(np.array(counts, dtype=np.int64).reshape(len(counts), -1), axis=0, initial=1)
            problem = None
            try:
                for name, n in zip(self.names, most):  # every rank visits every dataset, in one order
                    pieces = by_name.get(name, [])
                    for rows, arr in pieces + [(None, None)] * (max(int(n), 1) - len(pieces)):
                        self._put(self.file[name], self.axes[name], rows, arr)
                self.file.flush()
            except (OSError, RuntimeError) as e:
                problem = f"cannot write output {self.final!r}: {e}"
            agree(self.comm, problem)
            return
        for r in range(self.comm.size):
            problem = None
            if self.comm.rank == r and items:
                try:
                    f = self.file or h5py.File(self.tmp, "r+")
                    try:
                        for name in self.names:
                            for rows, arr in by_name.get(name, ()):
                                self._put(f[name], self.axes[name], rows, arr)
                        f.flush()
                    finally:
                        if self.file is None:
                            f.close()
                except (OSError, RuntimeError) as e:
                    problem = f"cannot write output {self.final!r}: {e}"
            if self.comm.size > 1 or problem:
                agree(self.comm, problem)

    def collective_thread(self):
        """Collective: whether this output's collective writes (`write` under mpio) may run in a
        thread beside the caller's own collectives: with MPI_THREAD_MULTIPLE on every rank, they
        then agree on a communicator of their own."""
        if not self.mpio:
            return False
        from mpi4py import MPI
        from ..dist.comm import Comm
        if not min(self.comm.allgather_object(MPI.Query_thread() == MPI.THREAD_MULTIPLE)):
            return False
        if self.own_comm is None:
            self.own_comm = self.comm = Comm(self.comm.mpi, parent=self.comm)
        return True

    def keep_open(self):
        """Serial path on one rank: keep the file open between writes (no reopen per chunk)."""
        if not self.mpio and self.rows is None and self.comm.size == 1 and self.file is None:
            self.file = h5py.File(self.tmp, "r+")

    def _put(self, ds, axis, rows, arr):
        """Write arr into rows [start, stop) of ds's sequence `axis`; rows None: take part only
        (an empty selection, so collective transfers still match on every rank)."""
        from h5py import h5s
        fspace = ds.id.get_space()
        if rows is None or arr is None or arr.size == 0:
            fspace.select_none()
            mspace = h5s.create_simple((1,))
            mspace.select_none()
            buf, mtype = _buffer(ds, np.zeros(1, stored_dtype(ds)))
        else:
            start = [0] * ds.ndim
            start[axis] = rows[0]
            if tuple(arr.shape[:axis]) + tuple(arr.shape[axis + 1:]) != ds.shape[:axis] + ds.shape[axis + 1:] \
                    or arr.shape[axis] != rows[1] - rows[0]:
                raise ValueError(f"slab {arr.shape} does not fit rows {rows} of {ds.name} {ds.shape}")
            fspace.select_hyperslab(tuple(start), tuple(arr.shape))
            buf, mtype = _buffer(ds, arr)
            mspace = h5s.create_simple(buf.shape)
        ds.id.write(mspace, fspace, buf, mtype=mtype, dxpl=self.dxpl)

    def set_attrs(self, attrs):
        """Collective: set root attributes (same values on every rank)."""
        if self.mpio:
            for key, val in attrs.items():
                self.file.attrs[key] = val
            return
        problem = None
        if self.comm.rank == 0:
            try:
                f = self.file or h5py.File(self.tmp, "r+")
                f.attrs.update(attrs)
                f.flush()
                if self.file is None:
                    f.close()
            except (OSError, RuntimeError) as e:
                problem = f"cannot write output {self.final!r}: {e}"
        agree(self.comm, problem)

    def release(self):
        """Not collective: let go of this rank's handles (a failed run)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.file is not None:
            self.file.close()
            self.file = None

    def close(self):
        """Collective: close the file (every rank's data is on disk afterwards)."""
        self.release()
        self.comm.barrier()
        if self.own_comm is not None:
            self.comm = self.own_comm.parent
            self.own_comm.free()
            self.own_comm = None


class Rows:
    """Where the rows of one dataset lie in its file: the byte offset of every storage chunk
    (chunks span whole rows of the axes after the sequence axis, one index of those before it,
    as `chunks_for` makes them), so that `put` writes rows with os.pwrite, no HDF5 call: ranks
    and threads write disjoint bytes of the closed file at once, and pwrite releases the GIL."""

    def __init__(self, ds, axis):
        self.axis, self.dtype = axis, stored_dtype(ds)
        self.step = ds.chunks[axis]
        self.row = int(np.prod(ds.shape[axis + 1:], dtype=np.int64)) * self.dtype.itemsize
        self.at = {}

        def found(info):
            self.at[info.chunk_offset[:axis + 1]] = info.byte_offset
        if hasattr(ds.id, "chunk_iter"):
            ds.id.chunk_iter(found)
        else:  # HDF5 before 1.12.3 (Debian 12's 1.10): one query per chunk
            for i in range(ds.id.get_num_chunks()):
                found(ds.id.get_chunk_info(i))

    @classmethod
    def of_file(cls, path, axes):
        """{name: Rows} of a file's datasets (name -> sequence axis), or None when one is not
        chunked that way, filtered, stored in a foreign byte order or not fully allocated."""
        with h5py.File(path, "r") as f:
            out = {}
            for name, axis in axes.items():
                ds = f[name]
                ok = (ds.chunks is not None and not ds.compression and native_bytes(ds) is not None
                      and ds.chunks[:axis] == (1,) * axis and ds.chunks[axis + 1:] == ds.shape[axis + 1:])
                if not ok:
                    return None
                out[name] = cls(ds, axis)
                outer = int(np.prod(ds.shape[:axis], dtype=np.int64))
                if len(out[name].at) != outer * -(-ds.shape[axis] // ds.chunks[axis]):
                    return None
            return out

    def put(self, fd, rows, arr):
        """Write arr (rows[1] - rows[0] along the sequence axis) into those rows."""
        a, b = rows
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        for outer in np.ndindex(*arr.shape[:self.axis]):
            data = memoryview(arr[outer].reshape(-1).view(np.uint8))
            r = a
            while r < b:
                c0 = r - r % self.step
                r1 = min(b, c0 + self.step)
                _pwrite(fd, data[(r - a) * self.row:(r1 - a) * self.row],
                        self.at[outer + (c0,)] + (r - c0) * self.row)
                r = r1


def _pwrite(fd, data, pos):
    while len(data):
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


def write_rows(comm, tmp, final, q_range, arrays, compression=None, mpio=None):
    """Collective: create `tmp` and write this rank's rows of `arrays`
    (name -> (array, global shape, axis of the rows[, row ranges])); rows go to q_range unless
    the entry names its own ranges; a range is a (start, stop) pair or a list of them (zigzag).
    Returns the HDF5 path used ("mpio" or "serial")."""
    out = Output(comm, tmp, final, {n: (e[1], e[0].dtype, e[2]) for n, e in arrays.items()},
                 compression=compression, mpio=mpio)
    items = []
    for name, (arr, _, axis, *own) in arrays.items():
        at = 0
        for a, b in _ranges(own[0] if own else q_range):
            index = [slice(None)] * arr.ndim
            index[axis] = slice(at, at + b - a)
            items.append((name, (a, b), arr[tuple(index)]))
            at += b - a
    try:
        with phase("write"):
            out.write(items)
    finally:
        out.close()
    return out.hdf5


def finish(comm, tmp, final, stats, attrs, drop=()):
    """Collective: record every rank's `stats` and the `attrs`, delete the datasets in `drop`
    (bookkeeping), set complete = 1 (last) and rename tmp -> final. Returns the list of
    per-rank stats on rank 0, None elsewhere."""
    gathered = comm.gather_object(stats)
    problem = None
    if comm.rank == 0:
        try:
            with phase("write stats"), h5py.File(tmp, "r+") as f:
                if "stats" in f:  # left by a finish that was interrupted: rewrite it
                    del f["stats"]
                g = f.create_group("stats")
                for key in gathered[0]:
                    g.create_dataset(key, data=np.array([s[key] for s in gathered]))
                for name in drop:
                    if name in f:
                        del f[name]
                for key, val in attrs.items():
                    f.attrs[key] = val
                f.flush()
                f.attrs["complete"] = 1
            os.replace(tmp, final)
        except (OSError, RuntimeError) as e:
            problem = f"cannot finish output {final!r}: {e}"
    agree(comm, problem)
    return gathered


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass
