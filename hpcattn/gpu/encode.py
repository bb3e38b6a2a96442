"""What the GPU kernels are given, checked on the host before any launch: the inputs' dtypes
and shapes, a mask's implicit terms as device words (kernels/mask.cuh), its listed terms (left to
attend_rows), query positions, and device copies of those reused while the same host object is
passed again."""
import functools

import numpy as np

from ..arrays import is_device
from ..errors import HpcattnError
from .loader import cupy
from .shapes import BQ, CTYPES, bucket

MAX_TERMS = 8  # HPCATTN_MAX_TERMS in kernels/mask.cuh
_copies = {}
_runs = {}  # run_start's last array and its answer


def dtype_name(x, bf16=False):
    """'float32' | 'float16' | 'bfloat16' for an array. CuPy has no bfloat16 dtype: bfloat16
    data travels as uint16 bit patterns (e.g. a torch tensor's memory) with bf16=True."""
    name = _name(x.dtype)
    if bf16 and name == "uint16":
        return "bfloat16"
    return name


@functools.lru_cache(maxsize=32)
def _name(dtype):
    return dtype.name  # NumPy builds it anew on every read


def listed_terms(mask):
    """The terms whose edges are lists of columns (random, csr: `Term.listed`)."""
    return [t for t in mask.terms if t.listed]


def mask_words(mask):
    """The device encoding of a mask's implicit terms and causal flag (kernels/mask.cuh):
    int64 [n, causal, (kind, a, b)*n, zeros to MAX_TERMS]. Listed terms (random, csr) are left
    to attend_rows."""
    words, n = [], 0
    for t in mask.terms:
        if t.listed:
            continue
        n += 1
        code = t.device_words()
        if code is None:
            raise HpcattnError(f"mask term {t!r} of {mask.spec!r} has no GPU kernel yet")
        words += list(code)
    if n > MAX_TERMS:
        raise HpcattnError(f"mask {mask.spec!r} has {n} terms; the GPU kernels take {MAX_TERMS}")
    words += [0] * (3 * MAX_TERMS - len(words))  # fixed length: a warp reads it in one step
    return np.array([n, int(mask.causal), *words], dtype=np.int64)


def window_only(mask):
    """Whether the mask's implicit part is one full or window term, causal or not (dense causal
    among them): what attend_fwd_wgmma's WIN forms take."""
    words = mask_words(mask)
    return bool(words[0] == 1 and words[2] in (0, 1))


def device_copy(tag, host, make=np.asarray):
    """A device copy of make(host), reused while the same object is passed again (the ring
    passes the same positions and mask every hop)."""
    cp = cupy()
    key = (tag, cp.cuda.Device().id)
    hit = _copies.get(key)
    if hit is None or hit[0] is not host:
        hit = _copies[key] = (host, cp.asarray(make(host)))
    return hit[1]


def device_positions(qpos):
    """The query positions on the device (checked on the host once per array); every launcher
    shares this one copy."""
    return device_copy("qpos", qpos, positions)


def run_start(qpos):
    """qpos[0] where host positions are a run (qpos[r] = qpos[0] + r, as a contiguous shard's
    rows are), else None (device positions are not looked at: that would synchronise); checked
    once per array, as device_positions copies it once. The tensor-core kernels then derive
    row r's position from the start, with no position loads."""
    hit = _runs.get(0)
    if hit is None or hit[0] is not qpos:
        a = None if is_device(qpos) else np.asarray(qpos)
        run = a is not None and a.ndim == 1 and a.size > 0 and bool((np.diff(a) == 1).all())
        hit = _runs[0] = (qpos, int(a[0]) if run else None)
    return hit[1]


def device_mask(mask):
    """The mask's words on the device; every launcher shares this one copy."""
    return device_copy("mask", mask, mask_words)


def check(q, qpos, k, v, k0, bf16):
    """(C type, head-dim bucket) of q, k, v after checking their dtypes, shapes, positions and
    key offset against what the kernels take."""
    B, Hkv, G, nq, D = q.shape
    names = {dtype_name(x, bf16) for x in (q, k, v)}
    if len(names) != 1 or not names <= set(CTYPES):
        raise HpcattnError(f"GPU kernels take one dtype of {', '.join(CTYPES)}; got {', '.join(sorted(names))}")
    if k.shape != v.shape or k.shape[:2] != (B, Hkv) or k.shape[3] != D:
        raise HpcattnError(f"k {k.shape} / v {v.shape} do not match q {q.shape}")
    if B * Hkv * G > 65535 or nq >= 2**31 - BQ or k.shape[2] >= 2**31:
        raise HpcattnError(f"shape {q.shape} x {k.shape} exceeds the GPU kernels' grid")
    if qpos is not None:  # None: row r at position r, derived on the device
        qpos = qpos if is_device(qpos) else np.asarray(qpos)
        if qpos.shape != (nq,) or qpos.dtype != np.int64:
            raise HpcattnError(f"qpos must be int64 of shape ({nq},), got {qpos.dtype} {qpos.shape}")
    if not 0 <= k0 < 2**62:
        raise HpcattnError(f"key offset {k0} outside [0, 2**62)")
    return CTYPES[names.pop()], bucket(D)


def positions(qpos):
    """Query positions checked (once per array) for the device: host arrays are copied there,
    device arrays (a caller's CuPy q_positions) used as they are."""
    qpos = qpos if is_device(qpos) else np.asarray(qpos)
    if qpos.size and (qpos.min() < 0 or qpos.max() >= 2**62):
        raise HpcattnError(f"query positions must lie in [0, 2**62); got [{qpos.min()}, {qpos.max()}]")
    return qpos
