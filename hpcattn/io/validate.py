"""Checks on untrusted input beyond shapes: declared sizes, memory, values, positions, paths.

Every check returns nothing or raises HpcattnError with one sentence naming the problem; the
callers (h5io, commands.run) run them on every rank through `errors.collectively`, so a bad file
ends the job on every rank. Limits are stated in docs/LIMITS.md; keep the two in step.
"""
import os

import numpy as np

from ..errors import HpcattnError

MAX_TOKENS = 2**62     # positions, offsets and spans are int64 with head room for i - j, i + w
MAX_HEAD_DIM = 2**16   # with MAX_ABS: |scale * q.k| <= sqrt(D) * MAX_ABS**2 < float32 max
MAX_ABS = 1e18         # larger finite values can overflow float32 scores or sums
WORK_FACTOR = 4        # a rank holds about 4x its shard: input, head-major copies, ring buffers, o


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


def values(path, name, arr, row0):
    """No NaN or Inf, and magnitudes below MAX_ABS, in the rows of `name` starting at row0."""
    if arr.size == 0:
        return
    top = float(np.abs(arr).max())  # NaN if any NaN
    if top <= MAX_ABS:
        return
    finite = np.isfinite(arr)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][1]) + row0
        raise HpcattnError(f"input {path!r}: {name} holds NaN or Inf (first at row {row})")
    row = int(np.argwhere(np.abs(arr) > MAX_ABS)[0][1]) + row0
    raise HpcattnError(f"input {path!r}: {name} holds values beyond +-{MAX_ABS:.0e} (first at row "
                       f"{row}), which overflow float32 scores")


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
