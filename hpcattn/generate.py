"""`hpcattn gen`: reproducible random inputs, written in row chunks so size is bounded by disk."""
import os
import shutil

import h5py
import numpy as np

from . import __version__
from .api import DTYPES
from .errors import HpcattnError
from .masks import parse

CHUNK_ELEMS = 1 << 24


def generate(path, seq, queries=None, batch=1, heads=1, kv_heads=None, head_dim=64,
             dtype="float32", seed=0, backward=False, mask=None):
    """Write q, k, v (standard normal), q_positions when queries < seq (the last `queries`
    positions: decoding), and do with backward. Same arguments give the same file."""
    kv_heads = heads if kv_heads is None else kv_heads
    queries = seq if queries is None else queries
    if dtype not in DTYPES:
        raise HpcattnError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, val, lo in (("--seq", seq, 1), ("--queries", queries, 1), ("--batch", batch, 1),
                          ("--heads", heads, 1), ("--kv-heads", kv_heads, 1), ("--head-dim", head_dim, 1)):
        if val < lo:
            raise HpcattnError(f"{name} must be >= {lo}, got {val}")
    if queries > seq:
        raise HpcattnError(f"--queries ({queries}) cannot exceed --seq ({seq})")
    if heads % kv_heads:
        raise HpcattnError(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads})")
    if mask is not None:
        parse(mask)
    need = np.dtype(dtype).itemsize * batch * head_dim * (queries * heads * (2 if backward else 1)
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
        for i, (name, shape) in enumerate(shapes.items()):
            rng = np.random.default_rng([seed, i])
            ds = f.create_dataset(name, shape=shape, dtype=dtype)
            rows = max(1, CHUNK_ELEMS // (batch * shape[2] * head_dim))
            for r0 in range(0, shape[1], rows):
                r1 = min(shape[1], r0 + rows)
                ds[:, r0:r1] = rng.standard_normal((batch, r1 - r0, *shape[2:]), dtype=np.float32).astype(dtype)
        if queries != seq:
            f["q_positions"] = np.arange(seq - queries, seq, dtype=np.int64)
        f.attrs.update({"generator": f"hpcattn gen {__version__}", "seq": seq, "queries": queries,
                        "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                        "dtype": dtype, "seed": seed, "backward": int(backward), "mask": mask or ""})
