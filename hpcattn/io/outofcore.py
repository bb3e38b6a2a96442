"""Streaming runs: a rank's query rows go through memory in chunks, read - compute - write.

One path serves every forward run whose mask has bounded reach (window, dilated, block, causal,
plus global tokens), in memory or out of core (`streams` says which runs that fit in memory
take it). A chunk of query rows needs only the keys that `Mask.spans` names, which each rank
reads straight from the input file (no MPI traffic), so host memory is bounded by the chunk
size, not the shard: two sets of reusable buffers (aligned; pinned on the GPU backend) for the
chunks being read and computed, two for those being computed and written.

Per rank, three stages overlap (threads: os.preadv and os.pwrite release the GIL, h5py only
partly):
- read (a thread): chunk i+1's q rows, positions and key spans into a free buffer set, then
  their value check (validate.values: bit patterns, a cache-sized block at a time);
- compute (the calling thread): chunk i, on the GPU as upload, kernel, download;
- write (a thread): chunk i-1's o and lse in place into the output's preallocated chunks
  (h5io.Output.put, no rank waits for another), then its done flag. Under parallel HDF5 (or
  with compression) the writes are collective (or rank-ordered) and stay in the calling thread.
Ranks agree once per step on any rank's problem (a bad value, a failed read or write), so a
bad input ends the run on every rank before any result-looking file exists.

Chunks of `rows` query rows form one global grid, rank r taking an even contiguous share. A
resumable run (out of core, or `--resume`) writes OUT.partial with the dataset `chunks_done`;
`run --resume` reopens it and skips done chunks. Other runs write under a temporary name.
"""
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

from ..api import from_heads, heads
from ..arrays import aligned_empty
from ..cpu import grad
from ..cpu.local import attend
from ..dist.variants import pick
from ..errors import HpcattnError, agree, collectively
from ..gpu import device
from ..merge import empty_state, merge
from ..partition import even_shard
from ..profile import phase
from . import h5io, results, validate

MAX_CHUNK_ROWS = 1 << 22   # upper bound on rows per chunk: progress and resume granularity
MIN_CHUNK_ROWS = 256
CHUNK_BYTES = 16 << 20     # q bytes per chunk where memory allows: enough chunks to overlap stages
PIECE_BYTES = 1 << 19      # reads are checked a piece of this size at a time, still in cache
LOG_EVERY_S = 10.0  # plain progress lines (not a terminal): at most one per this many seconds
CRASH_VAR = "HPCATTN_TEST_CRASH_AFTER_CHUNKS"  # test hook: every rank exits after k chunks
READ_TRACK, WRITE_TRACK = 2, 3  # profile tracks of the read and write threads


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


def streams(mask, meta, ranks, variant, backward):
    """True when a run that fits in memory streams too: variant auto, a bounded mask,
    self-attention (every key is some query's own, so the chunks' key spans read and check
    every key), and one rank or a shape where `auto` picks sparse (the halos then come from
    the file instead of the neighbours); with the backward, no global rows (they reach, and
    are reached by, every key)."""
    if variant != "auto" or not bounded(mask) or meta["positions"] or (backward and global_rows(mask)):
        return False
    return ranks == 1 or pick(mask, meta["Nq"], meta["N"], ranks) == "sparse"


def row_bytes(meta, backward=False):
    """Host bytes one query row costs while streaming: its q, k and v rows in two input buffer
    sets, its o (file dtype) and lse (float32) in two output sets; with the backward also its
    do rows in the input sets, dq, dk and dv rows in the output sets and float32 dk, dv sums."""
    isz = np.dtype(meta["dtype"]).itemsize
    B, H, Hkv, D = meta["B"], meta["H"], meta["Hkv"], meta["D"]
    grads = (H * D * isz * 2 + (H + 2 * Hkv) * D * isz * 2 + 2 * Hkv * D * 8) if backward else 0
    return B * (2 * ((H + 2 * Hkv) * D * isz + H * (D * isz + 4)) + grads)


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


def chunk_rows(meta, mask, budget, ranks=1, backward=False):
    """Rows per chunk: what the chunks in flight (plus key halos and the kernel's working set)
    leave of `budget` bytes, at most about CHUNK_BYTES of q, cut so that every rank gets the
    same number of chunks of nearly the same size."""
    per_row = row_bytes(meta, backward)
    extra = (2 * halo(mask) + global_rows(mask)) * per_row
    fit = (budget - extra - (64 << 20)) // per_row
    B, H, D, Nq = meta["B"], meta["H"], meta["D"], meta["Nq"]
    want = max(1, CHUNK_BYTES // (B * H * D * np.dtype(meta["dtype"]).itemsize))
    per_rank = -(-Nq // ranks)
    even = -(-per_rank // -(-per_rank // want))
    return int(max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, fit, even)))


class Source:
    """Row ranges of q, k, v (and q_positions) from the input file. Contiguous unfiltered
    datasets are read with os.preadv at their byte offset straight into the caller's buffer,
    which releases the GIL so a background read overlaps compute; other layouts go through
    h5py."""

    def __init__(self, path, meta):
        self.path, self.meta = path, meta
        self.file = h5py.File(path, "r")
        self.fd = os.open(path, os.O_RDONLY)
        self.raw = {}
        for name in ("q", "k", "v", "do")[:4 if meta["do"] else 3]:
            ds = self.file[name]
            offset = ds.id.get_offset() if ds.chunks is None else None
            native = h5io.native_bytes(ds)
            if offset is not None and native is not None and not ds.compression:
                self.raw[name] = (offset, ds.shape, native)

    def rows(self, name, a, b, out=None, check=None):
        """(B, b-a, ...) rows a..b-1 of dataset `name` along the sequence axis, into `out`
        (contiguous, that shape) when given. check(rows, row0), when given, sees every piece
        of about PIECE_BYTES right after its read, while it is still in cache."""
        if name not in self.raw:
            got = h5io.read(self.file[name], np.s_[:, a:b])
            if out is not None:
                out[...] = got
            if check is not None:
                check(got, a)
            return got if out is None else out
        offset, shape, dtype = self.raw[name]
        B, N = shape[:2]
        row = int(np.prod(shape[2:])) * dtype.itemsize
        if out is None:
            out = np.empty((B, b - a, *shape[2:]), dtype)
        step = max(1, PIECE_BYTES // row)
        for i in range(B):
            view = memoryview(out[i].reshape(-1).view(np.uint8))  # bytes (bfloat16 has no buffer format)
            for r0 in range(0, b - a, step):
                r1 = min(b - a, r0 + step)
                pos, done, piece = offset + (i * N + a + r0) * row, 0, view[r0 * row:r1 * row]
                while done < len(piece):
                    n = os.preadv(self.fd, [piece[done:]], pos + done)
                    if n <= 0:
                        raise HpcattnError(f"input {self.path!r}: short read of {name!r} (truncated file?)")
                    done += n
                if check is not None:
                    check(out[i:i + 1, r0:r1], a + r0)
        return out

    def positions(self, a, b):
        if self.meta["positions"]:
            return self.file["q_positions"][a:b].astype(np.int64)
        return np.arange(a, b, dtype=np.int64)

    def close(self):
        os.close(self.fd)
        self.file.close()


def _host_empty(xp, n, dtype):
    """n items of reusable host memory: aligned, and pinned on the GPU backend (fast, async
    copies), as bytes viewed in dtype (bfloat16 has no CuPy type)."""
    dtype = np.dtype(dtype)
    if xp is np:
        return aligned_empty(np, (n,), dtype)
    import cupyx
    return cupyx.empty_pinned(n * dtype.itemsize, np.uint8).view(dtype)


def _shaped(flat, shape):
    """The first prod(shape) items of a flat buffer as a contiguous array of that shape."""
    return flat[:int(np.prod(shape, dtype=np.int64))].reshape(shape)


class Buffers:
    """One chunk's reusable host arrays: input (q and do rows, key rows, check scratch) or
    output (o, lse, dq)."""

    def __init__(self, xp, meta, rows, key_rows, side, backward=False):
        B, H, Hkv, D, dt = meta["B"], meta["H"], meta["Hkv"], meta["D"], meta["dtype"]
        if side == "in":
            self.q = _host_empty(xp, B * rows * H * D, dt)
            if backward:
                self.do = _host_empty(xp, B * rows * H * D, dt)
            self.k, self.v = (_host_empty(xp, B * key_rows * Hkv * D, dt) for _ in "kv")
            most = max(rows * H, key_rows * Hkv) * D  # elements of one batch index
            self.scratch = np.empty(min(validate.CHECK_ELEMS, most), f"u{np.dtype(dt).itemsize}")
        else:
            self.o = _host_empty(xp, B * rows * H * D, dt)
            self.lse = _host_empty(xp, B * H * rows, np.float32)
            if backward:
                self.dq = _host_empty(xp, B * rows * H * D, dt)

    def nbytes(self):
        return sum(x.nbytes for x in vars(self).values())


class Chunk:
    """One chunk of query rows with the keys it needs, as read (in the read thread). `own`:
    its rows are this rank's (else rows next to them whose gradients reach this rank's keys)."""

    def __init__(self, index, a, b, own=True):
        self.index, self.a, self.b, self.own = index, a, b, own
        self.q = self.do = self.pos = self.keys = None
        self.spans, self.read_s, self.check_s, self.upload_s, self.problem = [], 0.0, 0.0, 0.0, None


def read_chunk(src, mask, item, key_limit, buf):
    """Read item (index, a, b, own)'s query rows [a, b) (and their do rows when `buf` has room
    for them), their positions and (when they fit in key_limit rows) the key spans the
    non-global rows reach into `buf`, and check them. Input problems are recorded, not raised
    (the ranks agree on them)."""
    c = Chunk(*item)
    a, b = c.a, c.b
    meta, path = src.meta, src.path
    B, H, Hkv, D, N = meta["B"], meta["H"], meta["Hkv"], meta["D"], meta["N"]
    t = time.perf_counter()
    try:
        with phase("read", READ_TRACK):
            c.q = src.rows("q", a, b, _shaped(buf.q, (B, b - a, H, D)), _checker(path, "q", buf.scratch, c))
            if hasattr(buf, "do"):
                c.do = src.rows("do", a, b, _shaped(buf.do, (B, b - a, H, D)), _checker(path, "do", buf.scratch, c))
            c.pos = src.positions(a, b)
            validate.positions(path, c.pos, N)
            local = c.pos[c.pos >= global_rows(mask)]
            if local.size:
                c.spans = mask.spans(int(local.min()), int(local.max()), 0, N)
            if sum(s1 - s0 for s0, s1 in c.spans) <= key_limit:
                c.keys, at = [], 0
                for s0, s1 in c.spans:
                    k, v = (src.rows(x, s0, s1, _shaped(flat[B * at * Hkv * D:], (B, s1 - s0, Hkv, D)),
                                     _checker(path, x, buf.scratch, c)) for x, flat in (("k", buf.k), ("v", buf.v)))
                    c.keys.append((s0, k, v))
                    at += s1 - s0
        c.read_s = time.perf_counter() - t - c.check_s
    except HpcattnError as e:
        c.problem = str(e)
    except OSError as e:
        c.problem = f"cannot read input {path!r}: {e}"
    return c


def _checker(path, name, scratch, c):
    """check(rows, row0) for Source.rows: validate.values on bit patterns, timed into c.check_s."""
    def check(rows, row0):
        t = time.perf_counter()
        try:
            validate.values(path, name, rows, row0, scratch)
        finally:
            c.check_s += time.perf_counter() - t
    return check


def _key_blocks(src, spans, key_limit, st):
    """Key blocks of at most key_limit rows over `spans`, read and checked now (the rare wide
    case, and the global rows' pass over every key); a bad value raises HpcattnError here, on
    this rank only (the compute stage turns it into a problem the ranks agree on)."""
    for s0, s1 in spans:
        for b0 in range(s0, s1, key_limit):
            b1 = min(s1, b0 + key_limit)
            t = time.perf_counter()
            k, v = src.rows("k", b0, b1), src.rows("v", b0, b1)
            st["read_s"] += time.perf_counter() - t
            t = time.perf_counter()
            validate.values(src.path, "k", k, b0)
            validate.values(src.path, "v", v, b0)
            st["check_s"] += time.perf_counter() - t
            st["kv_rows"] += b1 - b0
            yield b0, k, v


class Device:
    """The compute stage's array module and its host <-> device copies. On the host the copies
    are the arrays themselves. On the GPU each copy has its own stream, so copies overlap the
    kernels of the chunks before and after: `stage` (read thread) puts a chunk's rows into one
    of two reusable device buffer sets, once the kernels that read that set last are done;
    `down` starts a result's copy into a pinned buffer, which the write stage waits for
    (`take` hands it the copies started). `up` and `host` stay synchronous (the rare key-block
    pass, the dk and dv rows)."""

    def __init__(self, xp, st):
        self.xp, self.st, self.gpu = xp, st, xp is not np
        self.started, self.landed_s = [], []  # downloads not yet handed out; seconds of those landed
        if self.gpu:
            self.device = xp.cuda.Device()
            self.up_stream, self.down_stream = (xp.cuda.Stream(non_blocking=True) for _ in "ud")
            self.twins, self.free = {}, {}  # slot -> {buffer name: device twin}, slot -> event

    def stage(self, c, buf, slot):
        """(read thread) Chunk c's q, do and key rows, read into host buffer set `buf`, on the
        device in slot's buffers; c is returned with device arrays in their place."""
        if not self.gpu or c.problem:
            return c
        t = time.perf_counter()
        with phase("upload", READ_TRACK), self.device, self.up_stream as s:
            if slot in self.free:
                s.wait_event(self.free[slot])
            twins = self.twins.setdefault(slot, {})

            def up(x, name):
                flat = getattr(buf, name)
                if name not in twins:
                    twins[name] = self.xp.empty(flat.size, flat.dtype)
                at = (x.ctypes.data - flat.ctypes.data) // x.itemsize  # x is a view of flat
                y = twins[name][at:at + x.size].reshape(x.shape)
                y.set(x, stream=s)
                return y
            c.q = up(c.q, "q")
            c.do = None if c.do is None else up(c.do, "do")
            c.keys = None if c.keys is None else [(k0, up(k, "k"), up(v, "v")) for k0, k, v in c.keys]
            s.synchronize()
        c.upload_s = time.perf_counter() - t
        return c

    def done(self, slot):
        """(compute thread) The kernels queued so far are the last to read slot's buffers."""
        if self.gpu:
            self.free[slot] = self.xp.cuda.Event(disable_timing=True)
            self.free[slot].record()

    def up(self, x):
        if not self.gpu:
            return x
        t = time.perf_counter()
        y = self.xp.asarray(x)
        self.st["upload_s"] += time.perf_counter() - t
        return y

    def down(self, x, out):
        """Copy x into the host buffer out: at once on the host, started on the GPU."""
        if not self.gpu:
            if x is not out:
                out[...] = x
            return
        x = self.xp.ascontiguousarray(x)
        ev = [self.xp.cuda.Event() for _ in range(3)]
        ev[0].record()  # x is complete on the compute stream
        self.down_stream.wait_event(ev[0])
        ev[1].record(self.down_stream)
        x.get(out=out, stream=self.down_stream, blocking=False)
        ev[2].record(self.down_stream)
        self.started.append((x, ev[1], ev[2]))  # x is kept alive until its copy has landed

    def take(self):
        """A wait() for the downloads started since the last take (the write stage calls it
        before it reads their buffers)."""
        started, self.started = self.started, []

        def wait():
            for _, start, end in started:
                with phase("download", WRITE_TRACK):
                    end.synchronize()
                self.landed_s.append(self.xp.cuda.get_elapsed_time(start, end) / 1e3)
            started.clear()
        return wait

    def fold(self):
        """(compute thread, outside the compute stage) Count the landed downloads' seconds."""
        while self.landed_s:
            self.st["download_s"] += self.landed_s.pop()

    def host(self, x):
        """x on the host (a new array on the GPU backend)."""
        if not self.gpu:
            return x
        t = time.perf_counter()
        y = x.get()
        self.st["download_s"] += time.perf_counter() - t
        return y


def _attend_blocks(dev, qh, pos, blocks, mask, scale, hkv, st):
    """Merged partials (float32) of head-major queries qh over key blocks."""
    o = lse = None
    for k0, k, v in blocks:
        kh, vh = heads(dev.up(k), hkv)[:, :, 0], heads(dev.up(v), hkv)[:, :, 0]
        po, pl, edges = attend(qh, pos, kh, vh, k0, mask, scale)
        st["edges"] += int(edges)
        o, lse = (po, pl) if o is None else merge(o, lse, po, pl)
    if o is None:
        o, lse = empty_state(dev.xp, qh.shape[:-1], qh.shape[-1])
    return o, lse


def compute_chunk(src, c, mask, scale, meta, key_limit, st, dev, buf):
    """o (B, n, H, D) in the input dtype and lse (B, H, n) float32 of one chunk, as arrays of
    the compute stage, and (own rows) their copies started into `buf`. One key block (a
    window's span): the kernel writes o in place, as the in-memory call does, so the bits do
    not depend on the chunk size; several blocks merge in float32."""
    B, H, Hkv, D, N = meta["B"], meta["H"], meta["Hkv"], meta["D"], meta["N"]
    n, xp = c.b - c.a, dev.xp
    o_host, lse_host = _shaped(buf.o, (B, n, H, D)), _shaped(buf.lse, (B, H, n))
    q = dev.up(c.q)
    qh = heads(q, Hkv)
    G = global_rows(mask)
    glob = c.pos < G
    if not glob.any() and c.keys is not None and len(c.keys) == 1:
        (k0, k, v), = c.keys
        o = o_host if xp is np else xp.empty((B, n, H, D), q.dtype)
        _, lse, edges = attend(qh, c.pos, heads(dev.up(k), Hkv)[:, :, 0], heads(dev.up(v), Hkv)[:, :, 0],
                               k0, mask, scale, out=heads(o, Hkv))
        st["edges"] += int(edges)
    else:
        local = ~glob
        oh, lse = empty_state(xp, qh.shape[:-1], D)
        if local.any():
            blocks = c.keys if c.keys is not None else _key_blocks(src, c.spans, key_limit, st)
            sel = slice(None) if glob.sum() == 0 else xp.asarray(np.flatnonzero(local))
            lo, ll = _attend_blocks(dev, qh[:, :, :, sel], c.pos[local], blocks, mask, scale, Hkv, st)
            oh[:, :, :, sel], lse[:, :, :, sel] = lo, ll
        if glob.any():  # global query rows reach every key: stream the whole sequence
            sel = xp.asarray(np.flatnonzero(glob))
            go, gl = _attend_blocks(dev, qh[:, :, :, sel], c.pos[glob], _key_blocks(src, [(0, N)], key_limit, st),
                                    mask, scale, Hkv, st)
            oh[:, :, :, sel], lse[:, :, :, sel] = go, gl
        o = from_heads(oh, meta["dtype"])
    lse = lse.reshape(B, H, n)
    if c.own:
        dev.down(o, o_host)
        dev.down(lse, lse_host)
    return o, lse


class KeyGrads:
    """dk and dv of this rank's keys [lo, end): float32 sums over the query chunks that reach
    them, added in chunk order (so the same chunk grid gives the same bits), handed out in the
    file's layout and dtype once no later chunk can reach them. Partial sums for other ranks'
    keys are dropped: those ranks compute them from the same rows."""

    def __init__(self, dev, meta, lo, end):
        B, Hkv, D = meta["B"], meta["Hkv"], meta["D"]
        self.dev, self.dtype, self.lo, self.end = dev, meta["dtype"], lo, end
        self.sums = [dev.xp.zeros((B, Hkv, 0, D), np.float32) for _ in "kv"]

    def add(self, k0, dk, dv):
        """Add the partial sums (B, Hkv, n, D) of keys k0 .. k0+n-1."""
        a, b = max(k0, self.lo), min(k0 + dk.shape[2], self.end)
        if a < b:
            self._cover(b)
            for acc, part in zip(self.sums, (dk, dv)):
                acc[:, :, a - self.lo:b - self.lo] += part[:, :, a - k0:b - k0]

    def _cover(self, b):
        """Extend the sums with zeros to key b (keys no query reaches keep zero gradients)."""
        have = self.lo + self.sums[0].shape[2]
        if b > have:
            B, Hkv, _, D = self.sums[0].shape
            zeros = self.dev.xp.zeros((B, Hkv, b - have, D), np.float32)
            self.sums = [self.dev.xp.concatenate([acc, zeros], axis=2) for acc in self.sums]

    def final(self, upto):
        """Output items ("dk"/"dv", (lo, upto), rows (B, n, Hkv, D)) of the keys before `upto`."""
        upto = min(upto, self.end)
        if upto <= self.lo:
            return []
        self._cover(upto)
        n, rows = upto - self.lo, (self.lo, upto)
        items = [(name, rows, self.dev.host(from_heads(acc[:, :, None, :n], self.dtype)))
                 for name, acc in zip(("dk", "dv"), self.sums)]
        self.sums = [acc[:, :, n:] for acc in self.sums]
        self.lo = upto
        return items


def backward_chunk(src, c, o, lse, mask, scale, meta, key_limit, st, dev, grads, buf):
    """The gradients of one chunk's rows, given its forward (o, lse from compute_chunk): dq
    (rows, file dtype; its copy started into `buf`; None for rows that are not this rank's)
    and its share of dk and dv, added into `grads` (KeyGrads)."""
    B, H, Hkv, D = meta["B"], meta["H"], meta["Hkv"], meta["D"]
    n = c.b - c.a
    qh, doh, oh = (heads(dev.up(x), Hkv) for x in (c.q, c.do, o))
    lse = lse.reshape(B, Hkv, H // Hkv, n)
    delta = grad.row_delta(doh, oh)
    dq = None
    for k0, k, v in (c.keys if c.keys is not None else _key_blocks(src, c.spans, key_limit, st)):
        kh, vh = heads(dev.up(k), Hkv)[:, :, 0], heads(dev.up(v), Hkv)[:, :, 0]
        dq, dk, dv, edges = grad.backward(qh, c.pos, kh, vh, k0, mask, scale, doh, lse, delta, dq)
        st["edges_backward"] += int(edges)
        grads.add(k0, dk, dv)
    if not c.own:
        return None
    out = _shaped(buf.dq, (B, n, H, D))
    if dq is None:  # rows that reach no key
        out[...] = 0
    else:
        dev.down(from_heads(dq, meta["dtype"]), out)
    return out


def work_items(mine, rows, Nq, share, h, backward):
    """(index, a, b, own) of the chunks this rank computes, in row order: its own chunks `mine`
    (grid indices) and, with the backward, pieces of at most `rows` rows within h of its share
    (`share`: its first and last row), whose gradients reach its keys."""
    def near(a, b):
        return [(-1, x, min(x + rows, b), False) for x in range(a, b, rows)]
    own = [(c, c * rows, min(Nq, (c + 1) * rows), True) for c in mine]
    A, Z = share
    if not backward or A >= Z:
        return own
    return near(max(0, A - h), A) + own + near(Z, min(Nq, Z + h))


class Progress:
    """tqdm bar on rank 0 when stderr is a terminal, else one plain log line per chunk (when
    `on`: out-of-core runs, which take long)."""

    def __init__(self, comm, total, done, on=True):
        self.on = on and comm.rank == 0
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
                  f"compute {st['compute_s']:.1f} s, read {st['read_s']:.1f} s, write {st['write_s']:.1f} s, "
                  f"waited {st['wait_s']:.1f} s)", file=sys.stderr, flush=True)

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


class Writer:
    """The write stage: each chunk's o and lse (and gradients), then (resumable runs) its done
    flag, in a thread while the next chunks compute, at most two chunks in flight (the two
    output buffer sets): in-place writes (Output.put, no rank waits for another), or under
    parallel HDF5 the collective writes (Output.write, every rank every step, on the output's
    own communicator). Where neither can run in a thread (compression; an MPI without
    MPI_THREAD_MULTIPLE), the collective or rank-ordered writes run in the calling thread."""

    def __init__(self, out, resumable, st):
        self.out, self.resumable, self.st = out, resumable, st
        self.collective = out.rows is None and out.collective_thread()
        threaded = out.rows is not None or self.collective
        self.pool = ThreadPoolExecutor(1, "hpcattn-write") if threaded else None
        self.flight = []  # futures of the chunks being written, oldest first

    def _put(self, data, flag, landed):
        landed()
        t = time.perf_counter()
        with phase("write", WRITE_TRACK):
            if self.collective:
                try:
                    self._write(data, flag)
                    problem = None
                except HpcattnError as e:  # agreed among the ranks' writers: each sees it at the same step
                    problem = str(e)
            else:  # data first: a crash never flags unwritten rows
                problem = self.out.put(data) or self.out.put(flag)
        self.st["write_s"] += time.perf_counter() - t
        return problem

    def _write(self, data, flag):
        """The collective writes of one step (every rank takes part), data before flags."""
        self.out.write(data)
        if self.resumable:
            self.out.write(flag)

    def submit(self, data, flag, landed):
        """Write a step's output items (name, rows, array), then its done flags (none: take
        part in the collective writes only), once landed() says their copies are in."""
        if self.pool is not None:
            if data or self.collective:
                self.flight.append(self.pool.submit(self._put, data, flag, landed))
            else:
                landed()
            return
        landed()
        t = time.perf_counter()
        with phase("write"):
            self._write(data, flag)
        self.st["write_s"] += time.perf_counter() - t

    def settle(self, keep):
        """Wait until at most `keep` chunks are in flight; the first problem of those done."""
        problem = None
        while len(self.flight) > keep:
            t = time.perf_counter()
            p = self.flight.pop(0).result()
            self.st["wait_s"] += time.perf_counter() - t
            problem = problem or p
        return problem

    def close(self, wait=True):
        """Stop the thread. wait=False: do not wait for a collective write the other ranks may
        never join (this rank failed alone)."""
        if self.pool is not None:
            self.pool.shutdown(wait=wait or not self.collective, cancel_futures=True)


def run(in_path, out_path, mask, meta, comm, budget, resume=False, compression=None, *,
        out_of_core=True, variant="outofcore", backend="numpy", transport="file", clock=None,
        backward=False):
    """Collective streaming run; same return as commands.run.run. out_of_core: the shard did
    not fit in `budget` (or --resume): the output is resumable (a forward run). variant,
    backend, transport: recorded in the attributes (the name `auto` gave, when in memory).
    Each rank walks its chunks in lockstep with the others (a rank with fewer chunks still
    takes part in every agreement and collective write). backward: also dq, dk and dv; a rank
    computes its keys' dk and dv from its own rows and the rows within the mask's reach of them
    (no exchange)."""
    clock = clock or results.Clock()
    if not bounded(mask):
        raise HpcattnError(f"the shard does not fit in memory ({budget / 2**30:.2f} GiB per rank) and mask "
                           f"{mask.spec!r} has unbounded reach; use more ranks or a window/dilated/block mask",
                           collective=True)
    why = backward and ("--resume applies to forward runs" if resume else
                        f"mask {mask.spec!r} has global rows" if global_rows(mask) else
                        "the input has q_positions" if meta["positions"] else None)
    if why:
        raise HpcattnError(f"--backward streams only self-attention without global rows, and this run "
                           f"does not fit in memory ({budget / 2**30:.2f} GiB per rank): {why}; use more ranks",
                           collective=True)
    B, Nq, H, D, N = meta["B"], meta["Nq"], meta["H"], meta["D"], meta["N"]
    resumable = (out_of_core or resume) and not backward
    partial = partial_name(out_path) if resumable else h5io.temp_name(comm, out_path)
    rows = chunk_rows(meta, mask, budget, comm.size, backward)
    have = resumable and comm.bcast_object(os.path.exists(partial) if comm.rank == 0 else None)
    if resume and have and comm.rank == 0:
        with h5py.File(partial, "r") as f:
            rows = int(f.attrs.get("ooc_rows", rows))
    rows = comm.bcast_object(rows) if resumable else rows
    nchunks = max(1, math.ceil(Nq / rows))
    key_limit = rows + 2 * (halo(mask) + 1) + global_rows(mask)  # a chunk's spans: its rows, halos, global keys
    ident = {"ooc_input": os.path.abspath(in_path), "ooc_mask": mask.spec, "ooc_rows": rows,
             "ooc_shape": f"{B},{Nq},{H},{D},{N},{np.dtype(meta['dtype']).name}"}
    datasets = {"o": ((B, Nq, H, D), meta["dtype"], 1), "lse": ((B, H, Nq), np.float32, 2)}
    if backward:
        Hkv = meta["Hkv"]
        datasets.update(dq=((B, Nq, H, D), meta["dtype"], 1), dk=((B, N, Hkv, D), meta["dtype"], 1),
                        dv=((B, N, Hkv, D), meta["dtype"], 1))
    if resumable:
        datasets["chunks_done"] = ((nchunks,), np.uint8, 0)
    out = None
    try:
        if resume and have:
            done = _resume_state(comm, partial, ident, nchunks)
            out = h5io.Output(comm, partial, out_path, datasets, mode="r+")
        else:
            done = np.zeros(nchunks, dtype=bool)
            out = h5io.Output(comm, partial, out_path, datasets, mode="w", compression=compression)
            if resumable:  # no flag set yet: written, not left to the file's never-filled chunks
                out.write([("chunks_done", (0, nchunks), np.zeros(nchunks, np.uint8))] if comm.rank == 0 else [])
                out.set_attrs(ident)
        out.keep_open()
        c0, c1 = even_shard(nchunks, comm.size, comm.rank)
        mine = [c for c in range(c0, c1) if not done[c]]
        st = _loop(comm, in_path, out, mask, meta, rows, key_limit, mine, (c0, c1), resumable, backend, clock,
                   backward)
        out.close()
        q_rows = sum(min(Nq, (c + 1) * rows) - c * rows for c in mine)
        rank_stats = results.rank_stats(
            comm, clock, compute_s=st["compute_s"], io_s=st["read_s"] + st["check_s"] + st["write_s"],
            attn_s=st["compute_s"], edges=st["edges"], q_rows=q_rows, kv_rows=st["kv_rows"],
            io_wait_s=st["io_wait_s"], chunks=len(mine), chunks_resumed=(c1 - c0) - len(mine),
            phases={key: st[key] for key in results.PHASES}, buffer_bytes=st["buffer_bytes"],
            backward={"edges": st["edges_backward"], "bytes_sent": 0, "bytes_received": 0} if backward else None)
        attrs = results.attributes(
            comm, variant=variant, mask=mask.spec, backend=backend, transport=transport,
            scale=1 / math.sqrt(D), in_path=in_path, hdf5=out.hdf5, out_of_core=out_of_core,
            chunk_rows=rows, resumed=done.any(), variant_backward=variant if backward else None)
        return h5io.finish(comm, partial, out_path, rank_stats, attrs,
                           drop=("chunks_done",) if resumable else ()), attrs
    except BaseException:
        if out is not None:
            out.release()
        if not resumable:  # an out-of-core run keeps OUT.partial for --resume
            h5io.remove_quietly(partial)
        raise


def _aside(st):
    """Seconds inside the compute stage that are not kernels: key-block reads and checks, copies."""
    return st["read_s"] + st["check_s"] + st["upload_s"] + st["download_s"]


def _loop(comm, in_path, out, mask, meta, rows, key_limit, mine, grid, resumable, backend, clock, backward):
    """The pipeline over this rank's chunks `mine` (of grid[0] .. grid[1]-1, its part of the
    grid) and, with the backward, the rows next to them; returns its timings and counts."""
    Nq, scale = meta["Nq"], 1 / math.sqrt(meta["D"])
    st = {key: 0.0 for key in results.PHASES + ("compute_s", "io_wait_s")}
    st.update(edges=0, edges_backward=0, kv_rows=0)
    share = (grid[0] * rows, min(Nq, grid[1] * rows))
    h = halo(mask)
    items = work_items(mine, rows, Nq, share, h, backward)
    steps = max(comm.allgather_object(len(items)))
    crash_after = int(os.environ.get(CRASH_VAR, "0") or 0)
    dev = Device(device.xp(backend), st)
    grads = KeyGrads(dev, meta, *share) if backward else None
    n_in, n_out = min(2, len(items)), min(2, len(items))
    ins = [Buffers(dev.xp, meta, rows, key_limit, "in", backward) for _ in range(n_in)]
    outs = [Buffers(dev.xp, meta, rows, key_limit, "out", backward) for _ in range(n_out)]
    st["buffer_bytes"] = sum(b.nbytes() for b in ins + outs)
    src = collectively(comm, Source, in_path, meta)
    progress = Progress(comm, grid[1] - grid[0], grid[1] - grid[0] - len(mine), on=resumable)
    reader = ThreadPoolExecutor(1, "hpcattn-read")
    writer = Writer(out, resumable, st)

    def fetch(i):
        if i >= len(items):
            return None
        return reader.submit(lambda: dev.stage(read_chunk(src, mask, items[i], key_limit, ins[i % 2]), ins[i % 2],
                                               i % 2))

    late = None  # a problem found while computing, agreed on at the next step
    alone = False  # this rank fails where the others may not: no waiting for collectives
    try:
        pending = fetch(0)
        st["startup_s"] = time.perf_counter() - clock.wall
        for step in range(steps):
            t = time.perf_counter()
            chunk = pending.result() if pending is not None else None
            st["io_wait_s"] += time.perf_counter() - t
            pending = fetch(step + 1)  # chunk i+1 is read while chunk i computes
            problem = late or (chunk.problem if chunk else None)
            problem = writer.settle(1) or problem  # chunk i-2's buffers are free again
            t = time.perf_counter()
            agree(comm, problem)
            st["wait_s"] += time.perf_counter() - t
            data, flag = [], []
            dev.fold()
            if chunk is not None:
                st["read_s"] += chunk.read_s
                st["check_s"] += chunk.check_s
                st["upload_s"] += chunk.upload_s
                st["kv_rows"] += sum(k.shape[1] for _, k, _ in chunk.keys or ())
                t, other = time.perf_counter(), _aside(st)
                try:
                    with phase("local"):
                        buf = outs[step % 2]
                        o, lse = compute_chunk(src, chunk, mask, scale, meta, key_limit, st, dev, buf)
                        rows_ab = (chunk.a, chunk.b)
                        if chunk.own:
                            data = [("o", rows_ab, _shaped(buf.o, o.shape)),
                                    ("lse", rows_ab, _shaped(buf.lse, lse.shape))]
                        if resumable and chunk.own:
                            flag = [("chunks_done", (chunk.index, chunk.index + 1), np.ones(1, np.uint8))]
                        if backward:
                            dq = backward_chunk(src, chunk, o, lse, mask, scale, meta, key_limit, st, dev, grads, buf)
                            data += [("dq", rows_ab, dq)] if chunk.own else []
                            # keys no later chunk reaches are done
                            data += grads.final(items[step + 1][1] - h if step + 1 < len(items) else share[1])
                except HpcattnError as e:  # a bad key met in a pass over key blocks: agreed next step
                    late, chunk, data, flag = str(e), None, [], []
                dev.done(step % 2)
                # the kernels alone: reads and checks of key blocks and copies inside are counted apart
                st["compute_s"] += time.perf_counter() - t - (_aside(st) - other)
            writer.submit(data, flag, dev.take())  # chunk i is written while chunk i+1 computes
            if chunk is not None and chunk.own:
                progress.step(chunk.b - chunk.a, st)
            if crash_after and step + 1 >= crash_after:
                writer.settle(0)
                comm.barrier()
                os._exit(75)
        problem = late or writer.settle(0)
        dev.fold()
        t = time.perf_counter()
        agree(comm, problem)
        st["wait_s"] += time.perf_counter() - t
    except BaseException as e:
        alone = not (isinstance(e, HpcattnError) and e.collective)
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.close(wait=not alone)
        progress.close()
        src.close()
    st["wait_s"] += st["io_wait_s"]
    return st
