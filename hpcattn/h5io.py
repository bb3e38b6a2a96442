"""HDF5 input and output to the contract of DESIGN.md section 2.

Every rank reads only its hyperslab. Results are written under a temporary name and renamed
to the final one only after `complete` = 1 is set, so a failed run leaves no result-looking file.
This module knows nothing of the attention maths.
"""
import os
import uuid

import h5py
import numpy as np

from .api import check_shapes
from .errors import HpcattnError, agree
from .profile import phase

STATS = ("bytes_sent", "bytes_received", "compute_s", "comm_s", "io_s", "wall_s", "edges",
         "q_rows", "kv_rows")


def _open(path, mode="r"):
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise HpcattnError(f"input file {path!r} does not exist") from None
    except OSError as e:
        raise HpcattnError(f"cannot open {path!r} as HDF5 ({e})") from None


def _dataset(f, name, path):
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise HpcattnError(f"input {path!r} has no dataset {name!r}")
    return f[name]


def read_meta(path, need_do=False):
    """Shapes and dtype of an input file, validated; HpcattnError names what is wrong."""
    with _open(path) as f:
        q, k, v = (_dataset(f, n, path) for n in ("q", "k", "v"))
        problem = check_shapes(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype))
        if problem:
            raise HpcattnError(f"input {path!r}: {problem}")
        B, Nq, H, D = q.shape
        N, Hkv = k.shape[1], k.shape[2]
        meta = dict(B=B, Nq=Nq, N=N, H=H, Hkv=Hkv, D=D, dtype=q.dtype, positions="q_positions" in f,
                    do="do" in f)
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
            if do.shape != q.shape or do.dtype != q.dtype:
                raise HpcattnError(f"input {path!r}: do must match q {q.shape} {q.dtype}, "
                                   f"got {do.shape} {do.dtype}")
    return meta


def _ranges(r):
    """A (start, stop) pair or a list of them, as a list."""
    return [tuple(r)] if len(r) == 2 and np.isscalar(r[0]) else [tuple(x) for x in r]


def _rows(ds, ranges, axis=1):
    """The rows of ds in the given ranges along axis, concatenated (one hyperslab each)."""
    parts = [ds[(slice(None),) * axis + (slice(a, b),)] for a, b in ranges]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def read_shard(path, meta, q_range, kv_range, backward=False):
    """This rank's rows: q (and do with backward), q positions, k, v; checked for NaN/Inf and
    position range. q_range, kv_range: a (start, stop) pair or a list of them (zigzag layout)."""
    q_ranges, kv_ranges = _ranges(q_range), _ranges(kv_range)
    with phase("read"), _open(path) as f:
        out = {"q": _rows(f["q"], q_ranges), "k": _rows(f["k"], kv_ranges), "v": _rows(f["v"], kv_ranges)}
        if backward:
            out["do"] = _rows(f["do"], q_ranges)
        if meta["positions"]:
            out["q_positions"] = _rows(f["q_positions"], q_ranges, axis=0).astype(np.int64)
        else:
            out["q_positions"] = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in q_ranges])
    for name in [n for n in ("q", "k", "v", "do") if n in out]:
        if not np.isfinite(out[name]).all():
            bad = np.argwhere(~np.isfinite(out[name]))[0]
            rows = np.concatenate([np.arange(a, b) for a, b in (kv_ranges if name in "kv" else q_ranges)])
            raise HpcattnError(f"input {path!r}: {name} holds NaN or Inf (first at row {rows[bad[1]]})")
    pos = out["q_positions"]
    if pos.size and (pos.min() < 0 or pos.max() >= meta["N"]):
        raise HpcattnError(f"input {path!r}: q_positions must lie in [0, {meta['N']}), "
                           f"got values in [{pos.min()}, {pos.max()}]")
    return out


def read_csr(path, meta, qpos):
    """The explicit mask's rows min(qpos)..max(qpos): one hyperslab of mask/indptr and the
    matching slice of mask/indices, validated (masks.check_csr) before any index is used."""
    from .masks import CsrRows, check_csr
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


def write_rows(comm, tmp, final, q_range, arrays):
    """Collective: create `tmp` and write this rank's rows of `arrays`
    (name -> (array, global shape, axis of the rows[, row ranges])); rows go to q_range unless
    the entry names its own ranges; a range is a (start, stop) pair or a list of them.

    Serial-HDF5 path: rank 0 creates the file, ranks write their slabs in rank order.
    """
    problem = None
    if comm.rank == 0:
        try:
            with h5py.File(tmp, "w") as f:
                for name, (arr, shape, *_) in arrays.items():
                    f.create_dataset(name, shape=shape, dtype=arr.dtype)
        except OSError as e:
            problem = f"cannot create output {final!r}: {e}"
    agree(comm, problem)
    for r in range(comm.size):
        problem = None
        if comm.rank == r:
            try:
                with phase("write"), h5py.File(tmp, "r+") as f:
                    for name, (arr, _, axis, *own) in arrays.items():
                        at = 0
                        for a, b in _ranges(own[0] if own else q_range):
                            index = [slice(None)] * arr.ndim
                            index[axis] = slice(a, b)
                            src = list(index)
                            src[axis] = slice(at, at + b - a)
                            f[name][tuple(index)] = arr[tuple(src)]
                            at += b - a
            except OSError as e:
                problem = f"cannot write output {final!r}: {e}"
        agree(comm, problem)


def finish(comm, tmp, final, stats, attrs):
    """Collective: record every rank's `stats` and the `attrs`, set complete = 1 (last) and
    rename tmp -> final. Returns the list of per-rank stats on rank 0, None elsewhere."""
    gathered = comm.gather_object(stats)
    problem = None
    if comm.rank == 0:
        try:
            with phase("write stats"), h5py.File(tmp, "r+") as f:
                g = f.create_group("stats")
                for key in gathered[0]:
                    g.create_dataset(key, data=np.array([s[key] for s in gathered]))
                for key, val in attrs.items():
                    f.attrs[key] = val
                f.attrs["complete"] = 1
            os.replace(tmp, final)
        except OSError as e:
            problem = f"cannot finish output {final!r}: {e}"
    agree(comm, problem)
    return gathered


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass
