"""HDF5 input and output to the contract of DESIGN.md section 2.

Every rank reads only its hyperslab. Results are written under a temporary name and renamed
to the final one only after `complete` = 1 is set, so a failed run leaves no result-looking file.
This module knows nothing of the attention maths.
"""
import contextlib
import os
import uuid

import h5py
import numpy as np

from . import validate
from .api import check_shapes
from .errors import HpcattnError, agree

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
        meta = dict(B=B, Nq=Nq, N=N, H=H, Hkv=Hkv, D=D, dtype=q.dtype.newbyteorder("="),
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
            if do.shape != q.shape or do.dtype != q.dtype:
                raise HpcattnError(f"input {path!r}: do must match q {q.shape} {q.dtype}, "
                                   f"got {do.shape} {do.dtype}")
    return meta


def read_shard(path, meta, q_range, kv_range):
    """This rank's rows: q, q positions, k, v in native byte order; refused before reading when
    they cannot fit in memory, after reading when they hold NaN/Inf, huge values or bad positions."""
    (q0, q1), (k0, k1) = q_range, kv_range
    validate.fits(path, meta, q_range, kv_range)
    with _open(path) as f:
        # native byte order, whatever the file's
        out = {"q": f["q"][:, q0:q1], "k": f["k"][:, k0:k1], "v": f["v"][:, k0:k1]}
        out = {name: arr.astype(meta["dtype"], copy=False) for name, arr in out.items()}
        if meta["positions"]:
            raw = f["q_positions"][q0:q1]
            validate.positions(path, raw, meta["N"])
            out["q_positions"] = raw.astype(np.int64)
        else:
            out["q_positions"] = np.arange(q0, q1, dtype=np.int64)
    for name in ("q", "k", "v"):
        validate.values(path, name, out[name], q0 if name == "q" else k0)
    return out


def temp_name(comm, final):
    """A temporary path beside `final`, the same on every rank."""
    name = f"{final}.tmp-{uuid.uuid4().hex[:12]}" if comm.rank == 0 else None
    return comm.bcast_object(name)


def write_rows(comm, tmp, final, q_range, arrays):
    """Collective: create `tmp` and write this rank's rows of `arrays`
    (name -> (array, global shape, axis of the query rows)).

    Serial-HDF5 path: rank 0 creates the file, ranks write their slabs in rank order.
    """
    problem = None
    if comm.rank == 0:
        try:
            with h5py.File(tmp, "w") as f:
                for name, (arr, shape, _) in arrays.items():
                    f.create_dataset(name, shape=shape, dtype=arr.dtype)
        except OSError as e:
            problem = f"cannot create output {final!r}: {e}"
    agree(comm, problem)
    for r in range(comm.size):
        problem = None
        if comm.rank == r:
            try:
                with h5py.File(tmp, "r+") as f:
                    for name, (arr, _, axis) in arrays.items():
                        index = [slice(None)] * arr.ndim
                        index[axis] = slice(*q_range)
                        f[name][tuple(index)] = arr
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
            with h5py.File(tmp, "r+") as f:
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
