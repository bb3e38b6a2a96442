"""Out-of-core runs: stream a rank's rows through memory in query chunks with key halos.

For masks of bounded reach (window, dilated, block, causal, plus global tokens) a chunk of
query rows needs only the keys that `Mask.spans` names, so memory is bounded by the chunk
size, not the shard. Each rank reads its chunks' rows and key halos straight from the input
file (no MPI traffic), reading chunk k+1 in a background thread while chunk k computes, and
writes `o`/`lse` of each finished chunk into the partial output, then marks the chunk done
in the dataset `chunks_done`. `run --resume` reopens that partial file and skips done chunks.
"""
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

from ..api import from_heads, to_heads
from ..cpu.local import attend
from ..errors import HpcattnError, agree, collectively
from ..merge import empty_state, merge
from ..partition import even_shard
from . import h5io, results

MAX_CHUNK_ROWS = 1 << 22   # upper bound on rows per chunk: progress and resume granularity
MIN_CHUNK_ROWS = 256
LOG_EVERY_S = 10.0  # plain progress lines (not a terminal): at most one per this many seconds
CRASH_VAR = "HPCATTN_TEST_CRASH_AFTER_CHUNKS"  # test hook: every rank exits after k chunks


def bounded(mask):
    """True when every term reaches a bounded key range (global tokens allowed)."""
    return mask.reach() is not None


def global_rows(mask):
    """G of the widest global term: query positions below it reach every key."""
    return mask.global_rows()


def halo(mask):
    """Keys a query reaches on either side of its own position (global keys aside; terms of
    unbounded reach, which `bounded` rules out, count 0)."""
    return max((r for r in (t.reach() for t in mask.terms) if r is not None), default=0)


def row_bytes(meta):
    """Bytes of memory one query row costs while streaming: its q and k/v rows in the file
    dtype (read, prefetched, head-major copy) and the float32 o/lse with merge temporaries."""
    isz = np.dtype(meta["dtype"]).itemsize
    B, H, Hkv, D = meta["B"], meta["H"], meta["Hkv"], meta["D"]
    return B * ((H + 2 * Hkv) * D * isz * 3 + H * (D + 1) * 4 * 4 + H * D * isz)


def in_core_bytes(meta, nq, nkv):
    """Rough peak memory of the in-core path for a shard of nq query and nkv key rows: the
    shard, its head-major copy, ring buffers, float32 o and merge temporaries."""
    isz = np.dtype(meta["dtype"]).itemsize
    B, H, Hkv, D = meta["B"], meta["H"], meta["Hkv"], meta["D"]
    return nq * B * H * (D * (2 * isz + 12) + 8) + nkv * B * Hkv * D * isz * 8


def available_bytes():
    """MemAvailable of this node (Linux), else a conservative 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def chunk_rows(meta, mask, budget):
    """Rows per chunk so that two chunks in flight (plus key halos) fit in `budget` bytes."""
    per_row = row_bytes(meta)
    extra = (2 * halo(mask) + global_rows(mask)) * per_row
    rows = (budget // 2 - extra - (64 << 20)) // per_row
    return int(max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows)))


class Source:
    """Row ranges of q, k, v (and q_positions) from the input file. Contiguous unfiltered
    datasets are read with os.preadv at their byte offset, which releases the GIL so a
    background read overlaps compute; other layouts go through h5py."""

    def __init__(self, path, meta):
        self.path, self.meta = path, meta
        self.file = h5py.File(path, "r")
        self.fd = os.open(path, os.O_RDONLY)
        self.raw = {}
        for name in ("q", "k", "v"):
            ds = self.file[name]
            offset = ds.id.get_offset() if ds.chunks is None else None
            native = h5io.native_bytes(ds)
            if offset is not None and native is not None and not ds.compression:
                self.raw[name] = (offset, ds.shape, native)

    def rows(self, name, a, b):
        """(B, b-a, ...) rows a..b-1 of dataset `name` along the sequence axis."""
        if name not in self.raw:
            return h5io.read(self.file[name], np.s_[:, a:b])
        offset, shape, dtype = self.raw[name]
        B, N = shape[:2]
        row = int(np.prod(shape[2:])) * dtype.itemsize
        out = np.empty((B, b - a, *shape[2:]), dtype)
        for i in range(B):
            view = memoryview(out[i].reshape(-1).view(np.uint8))  # bytes (bfloat16 has no buffer format)
            pos, done = offset + (i * N + a) * row, 0
            while done < len(view):
                n = os.preadv(self.fd, [view[done:done + (1 << 30)]], pos + done)
                if n <= 0:
                    raise HpcattnError(f"input {self.path!r}: short read of {name!r} (truncated file?)")
                done += n
        return out

    def positions(self, a, b):
        if self.meta["positions"]:
            return self.file["q_positions"][a:b].astype(np.int64)
        return np.arange(a, b, dtype=np.int64)

    def close(self):
        os.close(self.fd)
        self.file.close()


class Chunk:
    """One chunk of query rows with the keys it needs, as read (possibly in a thread)."""

    def __init__(self, index, a, b):
        self.index, self.a, self.b = index, a, b
        self.q = self.pos = self.keys = None
        self.spans, self.read_s, self.problem = [], 0.0, None


def read_chunk(src, mask, index, a, b, key_limit):
    """Read query rows [a, b), their positions, and (when they fit in key_limit rows) the key
    spans the non-global rows reach. Input problems are recorded, not raised (agreed later)."""
    t = time.perf_counter()
    c = Chunk(index, a, b)
    try:
        c.q, c.pos = src.rows("q", a, b), src.positions(a, b)
        N = src.meta["N"]
        if c.pos.size and (c.pos.min() < 0 or c.pos.max() >= N):
            c.problem = (f"input {src.path!r}: q_positions must lie in [0, {N}), got values in "
                         f"[{c.pos.min()}, {c.pos.max()}]")
        elif not np.isfinite(c.q).all():
            c.problem = f"input {src.path!r}: q holds NaN or Inf (rows {a}..{b - 1})"
        else:
            local = c.pos[c.pos >= global_rows(mask)]
            if local.size:
                c.spans = mask.spans(int(local.min()), int(local.max()), 0, N)
            if sum(s1 - s0 for s0, s1 in c.spans) <= key_limit:
                c.keys = [(s0, src.rows("k", s0, s1), src.rows("v", s0, s1)) for s0, s1 in c.spans]
                for s0, k, v in c.keys:
                    if not (np.isfinite(k).all() and np.isfinite(v).all()):
                        c.problem = f"input {src.path!r}: k or v holds NaN or Inf (rows {s0}..{s0 + k.shape[1] - 1})"
    except OSError as e:
        c.problem = f"cannot read input {src.path!r}: {e}"
    c.read_s = time.perf_counter() - t
    return c


def _key_blocks(src, spans, key_limit, st):
    """Key blocks of at most key_limit rows over `spans`, read now (the rare wide case)."""
    for s0, s1 in spans:
        for b0 in range(s0, s1, key_limit):
            b1 = min(s1, b0 + key_limit)
            t = time.perf_counter()
            k, v = src.rows("k", b0, b1), src.rows("v", b0, b1)
            st["io_s"] += time.perf_counter() - t
            st["kv_rows"] += b1 - b0
            yield b0, k, v


def _attend_blocks(qh, pos, blocks, mask, scale, hkv, st):
    """Merge the local kernel's partials of head-major queries qh over key blocks."""
    o = lse = None
    for k0, k, v in blocks:
        kh, vh = to_heads(k, hkv)[:, :, 0], to_heads(v, hkv)[:, :, 0]
        po, pl, edges = attend(qh, pos, kh, vh, k0, mask, scale)
        st["edges"] += edges
        o, lse = (po, pl) if o is None else merge(o, lse, po, pl)
    if o is None:
        o, lse = empty_state(np, qh.shape[:-1], qh.shape[-1])
    return o, lse


def compute_chunk(src, c, mask, scale, meta, key_limit, st):
    """(o (B, n, H, D) in the input dtype, lse (B, H, n) float32) of one chunk."""
    B, H, Hkv, D, N = meta["B"], meta["H"], meta["Hkv"], meta["D"], meta["N"]
    qh = to_heads(c.q, Hkv)
    G = global_rows(mask)
    glob = c.pos < G
    local = ~glob
    o, lse = empty_state(np, qh.shape[:-1], D)
    if local.any():
        qs = qh if glob.sum() == 0 else qh[:, :, :, local]
        blocks = c.keys if c.keys is not None else _key_blocks(src, c.spans, key_limit, st)
        lo, ll = _attend_blocks(qs, c.pos[local], blocks, mask, scale, Hkv, st)
        if glob.any():
            o[:, :, :, local], lse[:, :, :, local] = lo, ll
        else:
            o, lse = lo, ll
    if glob.any():  # global query rows reach every key: stream the whole sequence
        go, gl = _attend_blocks(qh[:, :, :, glob], c.pos[glob], _key_blocks(src, [(0, N)], key_limit, st),
                                mask, scale, Hkv, st)
        o[:, :, :, glob], lse[:, :, :, glob] = go, gl
    return from_heads(o, meta["dtype"]), np.ascontiguousarray(lse.reshape(B, H, -1))


class Progress:
    """tqdm bar on rank 0 when stderr is a terminal, else one plain log line per chunk."""

    def __init__(self, comm, total, done):
        self.on = comm.rank == 0
        self.total, self.count, self.t0 = total, done, time.perf_counter()
        self.last = -1e9
        self.bar = None
        if self.on and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, unit="chunk", desc="hpcattn run (rank 0)")

    def step(self, rows, st):
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.on and (time.perf_counter() - self.last > LOG_EVERY_S or self.count == self.total):
            self.last = time.perf_counter()
            dt = self.last - self.t0
            print(f"hpcattn run: rank 0 chunk {self.count}/{self.total} done ({rows} rows, {dt:.1f} s; "
                  f"compute {st['compute_s']:.1f} s, io {st['io_s']:.1f} s, waited on reads "
                  f"{st['io_wait_s']:.1f} s)", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def partial_name(final):
    """The partial output of an out-of-core run: fixed, so `--resume` can find it."""
    return f"{final}.partial"


def _resume_state(comm, partial, ident, nchunks):
    """Done flags from a partial file made for the same run, or a clear error."""
    problem, done = None, None
    if comm.rank == 0:
        try:
            with h5py.File(partial, "r") as f:
                for key, val in ident.items():
                    have = f.attrs.get(key)
                    if have is None or str(have) != str(val):
                        problem = (f"cannot resume from {partial!r}: it was made with {key} = {have!r}, "
                                   f"this run has {val!r}; rerun without --resume")
                        break
                else:
                    done = f["chunks_done"][...].astype(bool)
                    if done.shape != (nchunks,):
                        problem = f"cannot resume from {partial!r}: chunks_done has the wrong shape"
        except (OSError, KeyError) as e:
            problem = f"cannot resume from {partial!r}: {e}"
    agree(comm, problem)
    return comm.bcast_object(done)


def run(in_path, out_path, mask, meta, comm, budget, resume=False, compression=None):
    """Collective out-of-core run; same return as commands.run.run. Chunks of `rows` query rows
    form one global grid (so resume does not depend on the rank count); rank r takes an even
    contiguous share of the chunks and walks them in lockstep with the others (a rank with
    fewer chunks still takes part in every collective write)."""
    clock = results.Clock()
    if not bounded(mask):
        raise HpcattnError(f"the shard does not fit in memory ({budget / 2**30:.2f} GiB per rank) and mask "
                           f"{mask.spec!r} has unbounded reach; use more ranks or a window/dilated/block mask",
                           collective=True)
    B, Nq, H, D, N = meta["B"], meta["Nq"], meta["H"], meta["D"], meta["N"]
    partial = partial_name(out_path)
    rows = chunk_rows(meta, mask, budget)
    have = comm.bcast_object(os.path.exists(partial) if comm.rank == 0 else None)
    if resume and have and comm.rank == 0:
        with h5py.File(partial, "r") as f:
            rows = int(f.attrs.get("ooc_rows", rows))
    rows = comm.bcast_object(rows)
    nchunks = max(1, math.ceil(Nq / rows))
    key_limit = max(rows + 2 * halo(mask) + 1, 2 * rows)
    ident = {"ooc_input": os.path.abspath(in_path), "ooc_mask": mask.spec, "ooc_rows": rows,
             "ooc_shape": f"{B},{Nq},{H},{D},{N},{np.dtype(meta['dtype']).name}"}
    datasets = {"o": ((B, Nq, H, D), meta["dtype"], 1), "lse": ((B, H, Nq), np.float32, 2),
                "chunks_done": ((nchunks,), np.uint8, 0)}
    if resume and have:
        done = _resume_state(comm, partial, ident, nchunks)
        out = h5io.Output(comm, partial, out_path, datasets, mode="r+")
    else:
        done = np.zeros(nchunks, dtype=bool)
        out = h5io.Output(comm, partial, out_path, datasets, mode="w", compression=compression)
        out.set_attrs(ident)
    out.keep_open()
    c0, c1 = even_shard(nchunks, comm.size, comm.rank)
    mine = [c for c in range(c0, c1) if not done[c]]
    steps = max(comm.allgather_object(len(mine)))
    st = {"compute_s": 0.0, "io_s": 0.0, "io_wait_s": 0.0, "edges": 0, "kv_rows": 0}
    crash_after = int(os.environ.get(CRASH_VAR, "0") or 0)
    scale = 1 / math.sqrt(D)
    src = collectively(comm, Source, in_path, meta)
    progress = Progress(comm, c1 - c0, (c1 - c0) - len(mine))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcattn-read")
    try:
        def fetch(i):
            if i >= len(mine):
                return None
            c = mine[i]
            return pool.submit(read_chunk, src, mask, c, c * rows, min(Nq, (c + 1) * rows), key_limit)

        pending = fetch(0)
        for step in range(steps):
            t = time.perf_counter()
            chunk = pending.result() if pending is not None else None
            st["io_wait_s"] += time.perf_counter() - t
            pending = fetch(step + 1)  # read chunk k+1 while chunk k computes
            agree(comm, chunk.problem if chunk else None)
            items = []
            if chunk is not None:
                st["io_s"] += chunk.read_s
                st["kv_rows"] += sum(k.shape[1] for _, k, _ in chunk.keys or ())
                t = time.perf_counter()
                o, lse = compute_chunk(src, chunk, mask, scale, meta, key_limit, st)
                st["compute_s"] += time.perf_counter() - t
                items = [("o", (chunk.a, chunk.b), o), ("lse", (chunk.a, chunk.b), lse)]
            t = time.perf_counter()
            out.write(items)  # data first, then its done flag: a crash never marks unwritten rows
            out.write([("chunks_done", (chunk.index, chunk.index + 1), np.ones(1, np.uint8))] if chunk else [])
            st["io_s"] += time.perf_counter() - t
            if chunk is not None:
                progress.step(chunk.b - chunk.a, st)
            if crash_after and step + 1 >= crash_after:
                comm.barrier()
                os._exit(75)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
        src.close()
    out.close()
    q_rows = sum(min(Nq, (c + 1) * rows) - c * rows for c in mine)
    rank_stats = results.rank_stats(
        comm, clock, compute_s=st["compute_s"], io_s=st["io_s"], attn_s=st["compute_s"], edges=st["edges"],
        q_rows=q_rows, kv_rows=st["kv_rows"], io_wait_s=st["io_wait_s"], chunks=len(mine),
        chunks_resumed=(c1 - c0) - len(mine))
    attrs = results.attributes(
        comm, variant="outofcore", mask=mask.spec, backend="numpy", transport="file", scale=scale,
        in_path=in_path, hdf5=out.hdf5, out_of_core=True, chunk_rows=rows, resumed=done.any())
    return h5io.finish(comm, partial, out_path, rank_stats, attrs, drop=("chunks_done",)), attrs
