"""`hpcattn run`: read each rank's hyperslab, compute, write one complete result file."""
import argparse
import math
import time

import numpy as np

from .. import __version__, faults, profile
from ..api import attention, attention_backward
from ..arrays import to_host
from ..errors import HpcattnError, collectively
from ..gpu import device
from ..io import h5io, outofcore, results
from ..io.validate import paths
from ..masks import parse
from ..dist.variants import pick
from ..partition import segments

ZIGZAG_VARIANTS = ("auto", "ring", "burst")  # ring-style variants: causal runs use zigzag


def run(in_path, out_path, mask_spec, comm, variant="auto", backward=False, ranks_per_node=None,
        transport="auto", max_memory=None, resume=False, compression=None):
    """Collective over comm (an hpcattn Comm). Returns (per-rank stats list on rank 0, else
    None; the output's attributes). backward: also read `do` and write dq, dk, dv. The
    backend is cupy when a GPU is seen (HPCATTN_BACKEND overrides); each rank then takes its
    node-local device before allocating anything. Runs of bounded-reach masks stream
    query-row chunks through read, compute and write stages (io/outofcore.py: `streams` says
    which); so does a run whose shard would not fit in `max_memory` bytes per rank (default:
    this node's available memory shared by its ranks), or with `resume`, out of core; with
    `backward` too, where the mask has no global rows (outofcore.streams). Other runs read the
    shard, call the distributed attention and write the result."""
    clock = results.Clock()
    backend = collectively(comm, device.chosen_backend)
    if backend == "cupy":
        device.setup(comm.mpi)
    transport = collectively(comm, comm.use_transport, transport, backend)
    collectively(comm, paths, in_path, out_path)
    mask = collectively(comm, parse, mask_spec)
    meta = collectively(comm, h5io.read_meta, in_path, need_do=backward)
    P, r = comm.size, comm.rank
    layout = "zigzag" if mask.causal and variant in ZIGZAG_VARIANTS else "contiguous"
    q_range, kv_range = segments(meta["Nq"], P, r, layout), segments(meta["N"], P, r, layout)
    budget = max_memory or int(0.7 * outofcore.available_bytes() * comm.nodes() / P)
    need = outofcore.in_core_bytes(meta, sum(b - a for a, b in q_range), sum(b - a for a, b in kv_range))
    # fixed-width (a pickled count's size depends on its magnitude: per-rank bytes would move with N)
    over = resume or int(comm.allreduce(np.array([need], dtype=np.int64), "max")[0]) > budget
    if over or outofcore.streams(mask, meta, P, variant, backward):
        name = "outofcore" if over else pick(mask, meta["Nq"], meta["N"], P)
        return outofcore.run(in_path, out_path, mask, meta, comm, budget, resume, compression,
                             out_of_core=over, variant=name, backend=backend,
                             transport="file" if over else transport, clock=clock, backward=backward)
    phases = {"startup_s": time.perf_counter() - clock.wall}
    shard = collectively(comm, h5io.read_shard, in_path, meta, q_range, kv_range, backward, phases)
    mask = mask.bind(n_keys=meta["N"])
    if "csr" in mask.needs:  # only this rank's query rows of the explicit mask, validated
        mask = mask.bind(csr=collectively(comm, h5io.read_csr, in_path, meta, shard["q_positions"]))
    faults.point("read", r)

    stats = {}
    scale = 1 / math.sqrt(meta["D"])
    common = dict(mask=mask, comm=comm, variant=variant, q_positions=shard["q_positions"],
                  scale=scale, layout=layout, ranks_per_node=ranks_per_node)
    xp = device.xp(backend)
    t = time.perf_counter()
    q, k, v = (xp.asarray(shard[a]) for a in "qkv")
    phases["upload_s"] = time.perf_counter() - t
    t_attn = time.perf_counter()
    o, lse = attention(q, k, v, stats=stats, **common)
    attn_s = time.perf_counter() - t_attn  # the attention call alone (no I/O): decode latency
    grads, back = {}, None
    if backward:
        back, before = {}, comm.counters()
        t = time.perf_counter()
        do = xp.asarray(shard["do"])
        phases["upload_s"] += time.perf_counter() - t
        dq, dk, dv = attention_backward(q, k, v, o, lse, do, stats=back, **common)
        t = time.perf_counter()
        dq, dk, dv = to_host(dq), to_host(dk), to_host(dv)
        phases["download_s"] = time.perf_counter() - t
        stats["compute_s"] += back["compute_s"]
        back.update({key: comm.counters()[key] - before[key] for key in ("bytes_sent", "bytes_received")})
        B, N, Hkv = meta["B"], meta["N"], meta["Hkv"]
        grads = {"dq": (dq, (B, meta["Nq"], meta["H"], meta["D"]), 1),
                 "dk": (dk, (B, N, Hkv, meta["D"]), 1, kv_range),
                 "dv": (dv, (B, N, Hkv, meta["D"]), 1, kv_range)}

    t = time.perf_counter()
    o, lse = to_host(o), to_host(lse)
    phases["download_s"] = phases.get("download_s", 0.0) + time.perf_counter() - t
    t_write = time.perf_counter()
    B, Nq, H, D = meta["B"], meta["Nq"], meta["H"], meta["D"]
    tmp = h5io.temp_name(comm, out_path)
    try:
        faults.point("write", r)
        hdf5 = h5io.write_rows(comm, tmp, out_path, q_range, {
            "o": (o, (B, Nq, H, D), 1),
            "lse": (lse, (B, H, Nq), 2), **grads,
        }, compression=compression)
        phases["write_s"] = time.perf_counter() - t_write
        held = [x for x in (*shard.values(), o, lse, *(g[0] for g in grads.values())) if hasattr(x, "nbytes")]
        rank_stats = results.rank_stats(
            comm, clock, compute_s=stats["compute_s"], attn_s=attn_s, edges=stats["edges"],
            io_s=phases["read_s"] + phases["check_s"] + phases["write_s"],
            q_rows=sum(b - a for a, b in q_range), kv_rows=sum(b - a for a, b in kv_range), backward=back,
            phases=phases, buffer_bytes=sum(x.nbytes for x in held))
        attrs = results.attributes(
            comm, variant=stats["variant"], mask=mask.spec, backend=backend, transport=transport,
            scale=scale, in_path=in_path, hdf5=hdf5, layout=layout, ranks_per_node=ranks_per_node,
            ring_levels=stats.get("ring_levels"), variant_backward=back["variant"] if backward else None)
        faults.point("finish", r)
        return h5io.finish(comm, tmp, out_path, rank_stats, attrs), attrs
    except BaseException:
        h5io.remove_quietly(tmp)
        raise


def summary(per_rank, attrs):
    """One line for people: the slowest rank's times, where they went, and the largest
    per-rank traffic."""
    def top(key):
        return max(s[key] for s in per_rank)

    def each(*keys):
        return ", ".join(f"{key[:-2].replace('startup', 'start-up').replace('wait', 'waiting')} {top(key):.2f}"
                         for key in keys)
    return (f"hpcattn run: {attrs['ranks']} rank(s), variant {attrs['variant']}, mask {attrs['mask']}: "
            f"wall {top('wall_s'):.2f} s (compute {top('compute_s'):.2f} s, comm {top('comm_s'):.2f} s, "
            f"io {top('io_s'):.2f} s: {each('read_s', 'check_s', 'write_s')}; "
            f"{each('startup_s', 'upload_s', 'download_s', 'wait_s')} s), "
            f"max bytes sent/rank {top('bytes_sent') / 2**20:.1f} MiB, "
            f"edges {sum(s['edges'] for s in per_rank):,} (slowest rank {balance(per_rank):.3f}x the mean)")


def balance(per_rank):
    """The compute balance: the busiest rank's edges over the mean (1.0 = perfect)."""
    edges = [s["edges"] for s in per_rank]
    mean = sum(edges) / len(edges)
    return max(edges) / mean if mean else 1.0


def add_parser(sub):
    r = sub.add_parser("run", help="compute attention (run under mpiexec/srun for P ranks)")
    r.add_argument("input")
    r.add_argument("output")
    r.add_argument("--mask", required=True, help="mask spec, e.g. causal+window:256")
    r.add_argument("--variant", default="auto", choices=["auto", "ring", "burst", "tree", "sparse"])
    r.add_argument("--backward", action="store_true")
    r.add_argument("--ranks-per-node", type=int)
    r.add_argument("--transport", default="auto", choices=["auto", "mpi", "host", "nccl"])
    r.add_argument("--profile", metavar="TRACE.json")
    r.add_argument("--max-memory", metavar="BYTES", type=_bytes,
                   help="memory per rank (e.g. 8G); a shard larger than this streams out of core")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted out-of-core run from OUT.h5.partial")
    r.add_argument("--compress", choices=["gzip", "lzf"], help="compress o and lse chunks")
    return r


def _bytes(text):
    """'8G', '512M', '1000000' -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().rstrip("IB") or "0"
    try:
        val = float(t[:-1]) * units[t[-1]] if t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 8G, 512M)") from None
    if val <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return int(val)


def cmd_run(args, comm):
    from ..arrays import keep_freed_memory
    from ..dist.variants import VARIANTS
    keep_freed_memory()
    unsupported = [(flag, val) for flag, val, ok in (
        ("--variant", args.variant, args.variant == "auto" or args.variant in VARIANTS),
        ) if not ok]
    if unsupported:
        flag, val = unsupported[0]
        raise HpcattnError(f"{flag} {val} is not available in hpcattn {__version__} yet", collective=True)
    profile.enable(bool(args.profile))
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        raise HpcattnError(f"--ranks-per-node must be >= 1, got {args.ranks_per_node}", collective=True)
    per_rank, attrs = run(args.input, args.output, args.mask, comm, args.variant, args.backward,
                          args.ranks_per_node, args.transport, args.max_memory,
                          args.resume, args.compress)
    if comm.rank == 0:
        print(summary(per_rank, attrs))
    if args.profile:
        profile.write_trace(comm, args.profile)
    return 0
