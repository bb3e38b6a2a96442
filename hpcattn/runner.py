"""`hpcattn run`: read each rank's hyperslab, compute, write one complete result file."""
import math
import time

import numpy as np

from . import __version__, faults, h5io
from .api import attention
from .errors import collectively
from .masks import parse
from .partition import even_shard
from .validate import paths


def run(in_path, out_path, mask_spec, comm, variant="auto"):
    """Collective over comm (an hpcattn Comm). Returns (per-rank stats list on rank 0, else
    None; the output's attributes)."""
    t_start = time.perf_counter()
    collectively(comm, paths, in_path, out_path)
    mask = collectively(comm, parse, mask_spec)
    meta = collectively(comm, h5io.read_meta, in_path)
    P, r = comm.size, comm.rank
    q_range, kv_range = even_shard(meta["Nq"], P, r), even_shard(meta["N"], P, r)
    shard = collectively(comm, h5io.read_shard, in_path, meta, q_range, kv_range)
    io_s = time.perf_counter() - t_start
    faults.point("read", r)

    stats = {}
    scale = 1 / math.sqrt(meta["D"])
    o, lse = attention(shard["q"], shard["k"], shard["v"], mask=mask, comm=comm, variant=variant,
                       q_positions=shard["q_positions"], scale=scale, stats=stats)

    t_write = time.perf_counter()
    B, Nq, H, D = meta["B"], meta["Nq"], meta["H"], meta["D"]
    tmp = h5io.temp_name(comm, out_path)
    try:
        faults.point("write", r)
        h5io.write_rows(comm, tmp, out_path, q_range, {
            "o": (o, (B, Nq, H, D), 1),
            "lse": (lse, (B, H, Nq), 2),
        })
        io_s += time.perf_counter() - t_write
        rank_stats = {**comm.counters(), "compute_s": stats["compute_s"], "io_s": io_s,
                      "wall_s": time.perf_counter() - t_start, "edges": stats["edges"],
                      "q_rows": q_range[1] - q_range[0], "kv_rows": kv_range[1] - kv_range[0]}
        attrs = {"variant": stats["variant"], "mask": mask_spec, "ranks": P, "nodes": comm.nodes(),
                 "backend": "numpy", "transport": "mpi", "hpcattn_version": __version__,
                 "scale": scale, "input": str(in_path)}
        faults.point("finish", r)
        return h5io.finish(comm, tmp, out_path, rank_stats, attrs), attrs
    except BaseException:
        h5io.remove_quietly(tmp)
        raise


def summary(per_rank, attrs):
    """One line for people: the slowest rank's times and the largest per-rank traffic."""
    def top(key):
        return max(s[key] for s in per_rank)
    return (f"hpcattn run: {attrs['ranks']} rank(s), variant {attrs['variant']}, mask {attrs['mask']}: "
            f"wall {top('wall_s'):.2f} s (compute {top('compute_s'):.2f} s, comm {top('comm_s'):.2f} s, "
            f"io {top('io_s'):.2f} s), max bytes sent/rank {top('bytes_sent') / 2**20:.1f} MiB, "
            f"edges {sum(s['edges'] for s in per_rank):,}")
