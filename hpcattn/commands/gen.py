"""`hpcattn gen`: reproducible random inputs, written in row chunks so size is bounded by disk."""
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

from .. import __version__
from ..errors import HpcattnError
from ..io import h5io
from ..io.h5io import FILE_DTYPES
from ..masks import Csr, parse
from .launch import on_root

CHUNK_ELEMS = 1 << 24


def generate(path, seq, queries=None, batch=1, heads=1, kv_heads=None, head_dim=64,
             dtype="float32", seed=0, backward=False, mask=None):
    """Write q, k, v (standard normal), q_positions when queries < seq (the last `queries`
    positions: decoding), and do with backward. Same arguments give the same file, whatever the
    thread count: each row chunk draws from its own stream."""
    kv_heads = heads if kv_heads is None else kv_heads
    queries = seq if queries is None else queries
    if dtype not in FILE_DTYPES:
        raise HpcattnError(f"--dtype must be one of {', '.join(FILE_DTYPES)}, got {dtype!r}")
    for name, val, lo in (("--seq", seq, 1), ("--queries", queries, 1), ("--batch", batch, 1),
                          ("--heads", heads, 1), ("--kv-heads", kv_heads, 1), ("--head-dim", head_dim, 1)):
        if val < lo:
            raise HpcattnError(f"{name} must be >= {lo}, got {val}")
    if queries > seq:
        raise HpcattnError(f"--queries ({queries}) cannot exceed --seq ({seq})")
    if heads % kv_heads:
        raise HpcattnError(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads})")
    edges = None
    if mask is not None:
        edges = csr_source(mask, seq)
    dtype = h5io.file_dtype(dtype)
    need = dtype.itemsize * batch * head_dim * (queries * heads * (2 if backward else 1)
                                                + 2 * seq * kv_heads)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise HpcattnError(f"cannot write {path!r}: folder {folder!r} does not exist")
    free = shutil.disk_usage(folder).free
    if need > free:
        raise HpcattnError(f"{path!r} would take {need / 2**30:,.1f} GiB but its disk has "
                           f"{free / 2**30:,.1f} GiB free")
    with h5py.File(path, "w") as f:
        shapes = {"q": (batch, queries, heads, head_dim), "k": (batch, seq, kv_heads, head_dim),
                  "v": (batch, seq, kv_heads, head_dim)}
        if backward:
            shapes["do"] = shapes["q"]
        workers = len(os.sched_getaffinity(0))
        with ThreadPoolExecutor(workers) as pool:
            for i, (name, shape) in enumerate(shapes.items()):
                ds = h5io.create(f, name, shape, dtype)
                rows = max(1, CHUNK_ELEMS // (batch * shape[2] * head_dim))
                starts = range(0, shape[1], rows)

                def chunk(c, i=i, shape=shape, rows=rows):
                    rng = np.random.default_rng([seed, i, c])
                    n = min(shape[1] - c * rows, rows)
                    return rng.standard_normal((batch, n, *shape[2:]), dtype=np.float32).astype(dtype)
                # chunks drawn in parallel from their own streams, written in order: a few in flight
                ahead = 2 * workers
                futures = [pool.submit(chunk, c) for c in range(min(ahead, len(starts)))]
                for c, r0 in enumerate(starts):
                    x = futures[c].result()
                    futures[c] = None
                    if c + ahead < len(starts):
                        futures.append(pool.submit(chunk, c + ahead))
                    h5io.write(ds, np.s_[:, r0:r0 + x.shape[1]], x)
        if edges is not None:
            write_csr(f, edges, seq)
        if queries != seq:
            f["q_positions"] = np.arange(seq - queries, seq, dtype=np.int64)
        f.attrs.update({"generator": f"hpcattn gen {__version__}", "seq": seq, "queries": queries,
                        "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                        "dtype": dtype.name, "seed": seed, "backward": int(backward), "mask": mask or ""})


def csr_source(spec, n):
    """For a spec with a csr term: the Mask whose edges gen writes as mask/ (the spec's other
    terms, with causal; e.g. random:328+csr is a 1% random density at N = 32768), else None."""
    m = parse(spec)
    if "csr" not in m.needs:
        return None
    other = m.subset(Csr, exclude=True)
    if other is None:
        raise HpcattnError(f"--mask {spec!r}: gen draws the csr edges from the spec's other terms; "
                           "add some, e.g. random:64+csr or window:8+global:2+csr")
    return other.bind(n_keys=n)


def write_csr(f, mask, n):
    """Write mask/indptr (n+1,) and mask/indices int64 for query positions 0..n-1, in row chunks."""
    g = f.create_group("mask")
    indptr = g.create_dataset("indptr", shape=(n + 1,), dtype=np.int64)
    indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int64,
                               chunks=(1 << 16,))
    rows, total = max(1, CHUNK_ELEMS // 64), 0
    indptr[0] = 0
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ip, ix = mask.columns(np.arange(r0, r1), 0, n)
        indices.resize((total + len(ix),))
        indices[total:] = ix
        indptr[r0 + 1:r1 + 1] = ip[1:] + total
        total += len(ix)
    g.attrs["from"] = mask.spec


def add_parser(sub):
    g = sub.add_parser("gen", help="write a random input file")
    g.add_argument("path")
    g.add_argument("--seq", type=int, required=True, help="keys N")
    g.add_argument("--queries", type=int, help="query rows (default N; fewer = decode at the end)")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--heads", type=int, default=1)
    g.add_argument("--kv-heads", type=int, help="default: --heads")
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--dtype", default="float32", choices=FILE_DTYPES)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backward", action="store_true", help="also write do")
    g.add_argument("--mask", help="mask spec (recorded; csr terms write an explicit mask)")
    return g


def cmd_gen(args, comm):
    on_root(comm, generate, args.path, args.seq, args.queries, args.batch, args.heads, args.kv_heads,
            args.head_dim, args.dtype, args.seed, args.backward, args.mask)
    return 0
