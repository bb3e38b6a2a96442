"""Checks on untrusted input beyond shapes: declared sizes, memory, values, positions, paths.

Every check returns nothing or raises HpcattnError with one sentence naming the problem; the
callers (h5io, commands.run) run them on every rank through `errors.collectively`, so a bad file
ends the job on every rank. Limits are stated in docs/LIMITS.md; keep the two in step.
"""
import functools
import os

import numpy as np

from ..errors import HpcattnError

MAX_TOKENS = 2**62     # positions, offsets and spans are int64 with head room for i - j, i + w
MAX_HEAD_DIM = 2**16   # with MAX_ABS: |scale * q.k| <= sqrt(D) * MAX_ABS**2 < float32 max
MAX_ABS = 1e18         # larger finite values can overflow float32 scores or sums
WORK_FACTOR = 4        # a rank holds about 4x its shard: input, head-major copies, ring buffers, o
CHECK_ELEMS = 1 << 18  # elements per block of the value check: its scratch stays in L2 (fastest measured)


def physical_memory():
    """Bytes of physical memory of this node (0 when the OS will not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def dims(path, meta):
    """Every dimension at least 1, sequence lengths within int64 positions, head dim bounded."""
    for name in ("B", "Nq", "N", "H", "Hkv", "D"):
        if meta[name] < 1:
            raise HpcattnError(f"input {path!r}: {name} = {meta[name]}; every dimension of q, k, v "
                               "must be at least 1")
    for name in ("Nq", "N"):
        if meta[name] >= MAX_TOKENS:
            raise HpcattnError(f"input {path!r}: {name} = {meta[name]:,} tokens; hpcattn supports "
                               f"fewer than 2**62 (int64 positions)")
    if meta["D"] > MAX_HEAD_DIM:
        raise HpcattnError(f"input {path!r}: head dim D = {meta['D']:,} exceeds {MAX_HEAD_DIM:,}")


def fits(path, meta, q_range, kv_range, memory=None):
    """Refuse, before allocating anything, a shard whose working set exceeds this node's memory."""
    memory = physical_memory() if memory is None else memory
    item = max(4, np.dtype(meta["dtype"]).itemsize)  # the kernel works in float32
    nq, nk = (sum(b - a for a, b in ([r] if np.isscalar(r[0]) else r)) for r in (q_range, kv_range))
    shard = meta["B"] * (nq * meta["H"] + 2 * nk * meta["Hkv"]) * meta["D"] * item
    need = WORK_FACTOR * shard
    if memory and need > memory:
        raise HpcattnError(f"input {path!r}: this rank's shard ({nq:,} query and {nk:,} key rows of "
                           f"q {meta['B']}x{meta['Nq']:,}x{meta['H']}x{meta['D']}) needs about "
                           f"{need / 2**30:,.1f} GiB but the node has {memory / 2**30:,.1f} GiB; "
                           "use more ranks or a smaller input")


@functools.lru_cache(maxsize=8)
def _limit_bits(dtype):
    """(unsigned dtype of the same width, mask of all bits but the sign, bit pattern of the
    largest magnitude <= MAX_ABS) of a float dtype: IEEE magnitudes order like their bit
    patterns and NaN/Inf lie above every finite one, so one integer comparison finds NaN, Inf
    and values beyond MAX_ABS alike."""
    uint = np.dtype(f"u{dtype.itemsize}")
    with np.errstate(over="ignore"):
        top = np.array(MAX_ABS, np.float64).astype(dtype).view(uint)[()]
    while not float(np.array(top, uint).view(dtype)[()]) <= MAX_ABS:  # rounded up, or to Inf
        top -= 1
    return uint, uint.type((1 << (8 * dtype.itemsize - 1)) - 1), top


def values(path, name, arr, row0, scratch=None):
    """No NaN or Inf, and magnitudes below MAX_ABS, in the rows (axis 1) of `name` starting at
    row0. Tested on bit patterns a block of at most CHECK_ELEMS at a time (no float arithmetic,
    no temporary the size of arr); `scratch`: a reusable buffer of at least
    min(CHECK_ELEMS, row elements) items of the dtype's width. Only a failing block is looked
    at again as floats."""
    if arr.size == 0:
        return
    if not arr.dtype.isnative:  # bit patterns order like magnitudes in the machine's byte order only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    uint, absmask, top = _limit_bits(np.dtype(arr.dtype))
    if scratch is None:
        scratch = np.empty(min(CHECK_ELEMS, arr[0].size), uint)
    row = int(np.prod(arr.shape[2:], dtype=np.int64))
    for b in range(arr.shape[0]):
        flat = np.ascontiguousarray(arr[b]).reshape(-1)
        bits = flat.view(uint)
        for e0 in range(0, flat.size, CHECK_ELEMS):
            e1 = min(flat.size, e0 + CHECK_ELEMS)
            mag = np.bitwise_and(bits[e0:e1], absmask, out=scratch.view(uint)[:e1 - e0])
            if mag.max() > top:
                _refuse(path, name, flat[e0:e1], e0, row0, row)


def _refuse(path, name, block, e0, row0, row):
    """Raise for the first bad value of a block that starts at element e0 of rows (of `row`
    elements each) numbered from row0."""
    x = block.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        at = int(np.flatnonzero(~finite)[0])
        raise HpcattnError(f"input {path!r}: {name} holds NaN or Inf (first at row {row0 + (e0 + at) // row})")
    at = int(np.flatnonzero(np.abs(x) > MAX_ABS)[0])
    raise HpcattnError(f"input {path!r}: {name} holds values beyond +-{MAX_ABS:.0e} (first at row "
                       f"{row0 + (e0 + at) // row}), which overflow float32 scores")


def positions(path, raw, n):
    """q_positions (any integer dtype, as read) all in [0, n); checked before any cast."""
    if raw.size and (raw.min() < 0 or raw.max() >= n):
        raise HpcattnError(f"input {path!r}: q_positions must lie in [0, {n}), "
                           f"got values in [{raw.min()}, {raw.max()}]")


def paths(in_path, out_path):
    """The output must not be the input (the run would replace its own input) nor a directory."""
    if os.path.isdir(out_path):
        raise HpcattnError(f"output {out_path!r} is a directory")
    same = os.path.realpath(in_path) == os.path.realpath(out_path)
    if not same and os.path.exists(out_path) and os.path.exists(in_path):
        same = os.path.samefile(in_path, out_path)
    if same:
        raise HpcattnError(f"output {out_path!r} is the input file; choose another name")
