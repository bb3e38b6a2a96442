"""Check and time kernels/attend_bwd_wgmma.cu's Hopper (sm_90a) kernels against
kernels/attend_bwd_mma.cu's on the same inputs: attend_bwd_kv_wg against attend_bwd_kv (dk, dv)
and attend_bwd_q_wg against attend_bwd_q (dq and the edge count), each launched as
hpcattn.gpu.backward._tensor launches it. Correctness at small sizes: several masks, G = 1 and
2, uneven row counts, positions none (row r at r), sorted with gaps (and a key offset) or
shuffled (rows_unsorted's fallback), float16 and bfloat16, D = 64 and 128, gradients added into
float32 sums and written in the input dtype: max absolute and relative difference of dk, dv and
dq, the same bits on a rerun, and the edge count exactly attend_bwd_q's (and the mask's). Then
ms per launch of each kernel alone (CUDA events, median of 5) on large head-major float16
inputs and the speed-up. A FAIL line and exit status 1 on any mismatch; one JSON line per
figure.
    PYTHONPATH=$PWD python3 jobs/wgmma_bwd_check.py [--shapes 2:4:1,2:3:1] [--qshapes 2:4:1,3:6:1]
        [--cases window:256:262144:64]"""
import argparse
import json
import math
import sys

import cupy as cp
import numpy as np

from gpu_bench import timed  # jobs/ is on the path when this runs as a script
from hpcattn.gpu import encode, forward, loader
from hpcattn.gpu.shapes import (BWD_SHAPES, BWD_WG_Q_SHAPES, BWD_WG_SHAPES, CTYPES, bwd_names, bwd_smem, bwd_wg_name,
                                bwd_wg_q_name, bwd_wg_q_smem, bwd_wg_smem, bwd_wg_threads)
from hpcattn.gpu.tma import TensorMaps
from hpcattn.masks import parse

MASKS = ("window:256", "causal", "causal+window:512", "block:128", "global:3+window:64", "dilated:32:4")
# max |new - ref| / max |ref's share|: both round P and dS alike, only the MMAs' summation order
# differs; an output rounding in the input dtype is up to 2^-11 (float16) or 2^-8 (bfloat16)
TOL = {"float16": 2e-3, "bfloat16": 8e-3}


def halves(shape, dtype, r):
    """Standard normal values in float16, or as bfloat16 bit patterns (uint16), rounded."""
    x = r.standard_normal(shape, dtype=cp.float32)
    if dtype == "float16":
        return x.astype(cp.float16)
    return ((x.view(cp.uint32) + 0x8000) >> 16).astype(cp.uint16)


def as_f32(x):
    """float32 values of float16, float32 or bfloat16 bits (uint16)."""
    if x.dtype == cp.uint16:
        return (x.astype(cp.uint32) << 16).view(cp.float32)
    return x.astype(cp.float32)


def tensor_maps(cache, ct, args, nk, key_rows):
    """The TmaMaps argument (hpcattn.gpu.tma) of args' q, k, v and do (head-major, rows at 0 ..
    n - 1) as a key-major Hopper kernel with blocks of key_rows keys reads them; the maps of each
    shape built once in cache."""
    q, k = args[0], args[2]
    key = q.shape, nk, key_rows, ct
    if key not in cache:
        cache[key] = TensorMaps(ct, q.shape, nk, forward.row_strides(q), forward.row_strides(k), key_rows)
    return cache[key](q, k, args[3], args[4])


class Kv:
    """One key-major kernel (name, blocks of `keys` keys, `threads` threads, smem bytes), launched
    as _tensor launches attend_bwd_kv: grid (ceil(nk / keys), B Hkv); ctype: attend_bwd_kv_wg's
    element type where it reads by TMA (its tensor maps passed last), else None."""

    def __init__(self, f, keys, threads, smem, ctype=None):
        self.f, self.keys, self.threads, self.smem, self.ctype, self.maps = f, keys, threads, smem, ctype, {}
        if smem > 48 * 1024:
            f.max_dynamic_shared_size_bytes = smem

    def __call__(self, args, dk, dv, words, unsorted, tail, nk, BHkv):
        maps = (tensor_maps(self.maps, self.ctype, args, nk, self.keys),) if self.ctype else ()
        self.f((-(-nk // self.keys), BHkv), (self.threads,), args + (dk, dv, words, unsorted) + tail + maps,
               shared_mem=self.smem)


class Qm:
    """One query-major kernel (name, blocks of `rows` query rows, `threads` threads, smem bytes),
    launched as _tensor launches it: grid (ceil(nq / rows), B Hkv G), or ceil(nq / rows) B Hkv G
    blocks on a 1-D grid (`flat`: attend_bwd_q_wg's heavy-first order)."""

    def __init__(self, f, rows, threads, smem, flat=False):
        self.f, self.rows, self.threads, self.smem, self.flat = f, rows, threads, smem, flat
        if smem > 48 * 1024:
            f.max_dynamic_shared_size_bytes = smem

    def __call__(self, args, dq, edges, words, tail, nq, heads):
        grid = (-(-nq // self.rows) * heads,) if self.flat else (-(-nq // self.rows), heads)
        self.f(grid, (self.threads,), args + (dq, edges, words) + tail, shared_mem=self.smem)


def q_kernels(mod, ct, D, otype, qshapes):
    """(reference attend_bwd_q, [(shape, attend_bwd_q_wg from mod)]) for one dtype, head dim and
    output type."""
    wq = BWD_SHAPES[D][3]
    ref = Qm(loader.kernel(bwd_names(ct, D, otype)[1]), 16 * wq, 32 * wq, bwd_smem(D)[1])
    return ref, [(s, Qm(mod.get_function(bwd_wg_q_name(ct, D, otype, s)), 64 * s[0], bwd_wg_threads(s),
                        bwd_wg_q_smem(D, s), flat=True)) for s in qshapes]


def kernels(mod, ct, D, otype, shapes):
    """(reference attend_bwd_kv, [(shape, attend_bwd_kv_wg from mod)]) for one dtype, head dim
    and output type."""
    wk = BWD_SHAPES[D][0]
    ref = Kv(loader.kernel(bwd_names(ct, D, otype)[0]), 16 * wk, 32 * wk, bwd_smem(D)[0])
    return ref, [(s, Kv(mod.get_function(bwd_wg_name(ct, D, otype, s)), 64 * s[0], bwd_wg_threads(s),
                        bwd_wg_smem(D, s), ct)) for s in shapes]


def tail_args(nq, nk, G, k0, scale, q, k, heads):
    return ((np.int32(nq), np.int32(nk), np.int32(G), np.int64(k0), np.float32(scale), np.int64(0))
            + tuple(np.int64(x) for x in (*forward.row_strides(q), *forward.row_strides(k))) + (np.int32(heads),))


def compare(row, names, got, want, again, init, otype, dtype):
    """Adds name_diff, _rel, _rerun_same, _finite to row for each gradient; whether all pass."""
    ok = True
    for i, name in enumerate(names):
        a, b, c = got[i], want[i], again[i]
        a32, b32 = as_f32(a), as_f32(b)
        diff = float(cp.abs(a32 - b32).max())
        grad = b32 - init[i] if otype == "float" else b32  # this launch's share
        rel = diff / max(float(cp.abs(grad).max()), 1e-30)
        same = bool((a.view(cp.uint8) == c.view(cp.uint8)).all())
        finite = bool(cp.isfinite(a32).all())
        row.update({f"{name}_diff": diff, f"{name}_rel": rel, f"{name}_rerun_same": same, f"{name}_finite": finite})
        ok = ok and rel <= TOL[dtype] and same and finite
    return ok


def cases(dtype, D):
    """The correctness pass's inputs for one dtype and head dim, one per mask of MASKS, G = 1 and
    2 and positions none (row r at r), sorted with gaps (and a key offset) or shuffled: (spec,
    mask, words, G, pos, nq, nk, k0, Hkv, qpos, q, k, args, unsorted, tail, r), args and tail as
    the kernels take them, r the generator whose next draws give the float32 sums to add into."""
    bf, scale = dtype == "bfloat16", 1 / math.sqrt(D)
    for spec in MASKS:
        mask = parse(spec)
        words = cp.asarray(encode.mask_words(mask))
        for G in (1, 2):
            for pos in ("none", "gaps", "shuffled"):
                nq, Hkv = 3001, 2
                r = cp.random.default_rng(nq + 7 * G + D)
                nk, k0 = (nq, 0) if pos == "none" else (nq + 1234, 100)
                q, do = (halves((1, Hkv, G, nq, D), dtype, r) for _ in range(2))
                k, v = (halves((1, Hkv, nk, D), dtype, r) for _ in range(2))
                hp = np.random.default_rng(nq)
                qpos = (np.arange(nq) if pos == "none" else
                        np.sort(hp.choice(k0 + nk + 300, nq, replace=False))).astype(np.int64)
                if pos == "shuffled":
                    qpos = hp.permutation(qpos)
                o, lse, _ = forward.attend(q, qpos, k, v, k0, mask, scale, bf16=bf, kernel_kind="mma")
                lse, delta = cp.ascontiguousarray(lse), (as_f32(do) * o).sum(-1)
                if pos == "none":
                    dpos, unsorted = np.uintp(0), np.uintp(0)
                else:
                    dpos, unsorted = cp.asarray(qpos), cp.zeros(1, dtype=cp.int32)
                    loader.launch("rows_unsorted", (min(1024, -(-nq // 256)),), 0,
                                  (dpos, np.int32(nq), unsorted), threads=256)
                args = (q, dpos, k, v, do, lse, delta)
                tail = tail_args(nq, nk, G, k0, scale, q, k, Hkv * G)
                yield spec, mask, words, G, pos, nq, nk, k0, Hkv, qpos, q, k, args, unsorted, tail, r


def check(mod, dtype, D, shapes, qshapes, failures):
    ct = CTYPES[dtype]
    for otype in ("float", ct):
        ref, news = kernels(mod, ct, D, otype, shapes)
        qref, qnews = q_kernels(mod, ct, D, otype, qshapes)
        for c in cases(dtype, D):
            spec, mask, words, G, pos, nq, nk, k0, Hkv, qpos, q, k, args, unsorted, tail, r = c
            init = r.standard_normal((2,) + k.shape, dtype=cp.float32)  # what TO = float adds into
            qinit = r.standard_normal((1,) + q.shape, dtype=cp.float32)

            def run(kv):
                if otype == "float":
                    dk, dv = init[0].copy(), init[1].copy()
                else:
                    dk, dv = (cp.full(k.shape, 0xFFFF, cp.uint16).view(k.dtype) for _ in range(2))  # NaN
                kv(args, dk, dv, words, unsorted, tail, nk, Hkv)
                return dk, dv

            def run_q(qk):
                if otype == "float":
                    dq = qinit[0].copy()
                else:
                    dq = cp.full(q.shape, 0xFFFF, cp.uint16).view(q.dtype)  # NaN
                edges = cp.zeros(1, dtype=cp.uint64)
                qk(args, dq, edges, words, tail, nq, Hkv * G)
                return (dq,), int(edges.get()[0])

            want = run(ref)
            for shape, kv in news:
                got, again = run(kv), run(kv)
                row = {"check": spec, "kernel": "attend_bwd_kv_wg", "dtype": dtype, "D": D, "TO": otype,
                       "G": G, "positions": pos, "shape": shape}
                ok = compare(row, ("dk", "dv"), got, want, again, init, otype, dtype)
                print(json.dumps(row), flush=True)
                if not ok:
                    failures.append(row)
                    print(f"FAIL {json.dumps(row)}", flush=True)

            qwant, ewant = run_q(qref)
            # one head's edges (the kernels count head 0's): the mask's pairs
            emask = int(mask.allowed(qpos[:, None], k0 + np.arange(nk)[None, :]).sum())
            for shape, qk in qnews:
                (got, egot), (again, eagain) = run_q(qk), run_q(qk)
                row = {"check": spec, "kernel": "attend_bwd_q_wg", "dtype": dtype, "D": D, "TO": otype,
                       "G": G, "positions": pos, "shape": shape, "edges": egot, "edges_ref": ewant,
                       "edges_mask": emask}
                ok = compare(row, ("dq",), got, qwant, again, qinit, otype, dtype)
                ok = ok and egot == ewant == eagain == emask
                print(json.dumps(row), flush=True)
                if not ok:
                    failures.append(row)
                    print(f"FAIL {json.dumps(row)}", flush=True)


def bench_inputs(case):
    """The timed launches' inputs for MASK:N:D: (spec, n, D, H, mask, words, q, k, args, tail),
    float16, H = 8, head-major, rows at 0 .. n - 1."""
    spec, n, D = case.rsplit(":", 2)
    n, D = int(n), int(D)
    H, scale = 8, 1 / math.sqrt(D)
    mask = parse(spec, n_keys=n)
    words = cp.asarray(encode.mask_words(mask))
    r = cp.random.default_rng(0)
    q, do = (halves((1, H, 1, n, D), "float16", r) for _ in range(2))
    k, v = (halves((1, H, n, D), "float16", r) for _ in range(2))
    lse = cp.full((1, H, 1, n), 8.0, cp.float32)  # P below 1 for these inputs, as a real lse gives
    delta = cp.zeros((1, H, 1, n), cp.float32)
    args = (q, np.uintp(0), k, v, do, lse, delta)
    return spec, n, D, H, mask, words, q, k, args, tail_args(n, n, 1, 0, scale, q, k, H)


def bench(mod, case, shapes, qshapes):
    spec, n, D, H, mask, words, q, k, args, tail = bench_inputs(case)
    rows = min(n, 4096)
    edges = int(mask.allowed(np.arange(rows)[:, None], np.arange(n)[None, :]).sum() * (n / rows)) \
        if spec != "causal" else n * (n + 1) // 2
    flop = 4 * 2 * edges * D * H  # S^T, dP^T, dV, dK
    for otype in ("float", "__half"):
        ref, news = kernels(mod, "__half", D, otype, shapes)
        dk, dv = (cp.zeros(k.shape, cp.float32 if otype == "float" else cp.float16) for _ in range(2))
        ms_ref = timed(lambda: ref(args, dk, dv, words, np.uintp(0), tail, n, H)) * 1e3
        print(json.dumps({"bench": case, "H": H, "TO": otype, "kernel": "attend_bwd_kv", "shape": BWD_SHAPES[D][:3],
                          "ms": ms_ref, "TFLOP/s": flop / ms_ref * 1e-9}), flush=True)
        for shape, kv in news:
            ms = timed(lambda: kv(args, dk, dv, words, np.uintp(0), tail, n, H)) * 1e3
            print(json.dumps({"bench": case, "H": H, "TO": otype, "kernel": "attend_bwd_kv_wg", "shape": shape,
                              "ms": ms, "TFLOP/s": flop / ms * 1e-9, "speedup": ms_ref / ms}), flush=True)
            print(f"{case} TO={otype} wg{shape}: {ms:.3f} ms vs attend_bwd_kv {ms_ref:.3f} ms, "
                  f"speed-up {ms_ref / ms:.2f}x", flush=True)
        qref, qnews = q_kernels(mod, "__half", D, otype, qshapes)
        qflop = 3 * 2 * edges * D * H  # S, dP, dQ
        dq = cp.zeros(q.shape, cp.float32 if otype == "float" else cp.float16)
        count = cp.zeros(1, dtype=cp.uint64)
        ms_ref = timed(lambda: qref(args, dq, count, words, tail, n, H)) * 1e3
        print(json.dumps({"bench": case, "H": H, "TO": otype, "kernel": "attend_bwd_q", "shape": BWD_SHAPES[D][3:],
                          "ms": ms_ref, "TFLOP/s": qflop / ms_ref * 1e-9}), flush=True)
        for shape, qk in qnews:
            ms = timed(lambda: qk(args, dq, count, words, tail, n, H)) * 1e3
            print(json.dumps({"bench": case, "H": H, "TO": otype, "kernel": "attend_bwd_q_wg", "shape": shape,
                              "ms": ms, "TFLOP/s": qflop / ms * 1e-9, "speedup": ms_ref / ms}), flush=True)
            print(f"{case} TO={otype} q_wg{shape}: {ms:.3f} ms vs attend_bwd_q {ms_ref:.3f} ms, "
                  f"speed-up {ms_ref / ms:.2f}x", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", default="64,128")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--shapes", default="", help="NWG:ST:MINB of attend_bwd_kv_wg, comma-separated "
                   "(default: shapes.BWD_WG_SHAPES)")
    p.add_argument("--qshapes", default="", help="NWG:ST:MINB of attend_bwd_q_wg, comma-separated "
                   "(default: shapes.BWD_WG_Q_SHAPES)")
    p.add_argument("--cases", default="window:256:262144:64,window:256:262144:128,causal:16384:128",
                   help="timed MASK:N:D, comma-separated (empty: none)")
    a = p.parse_args()
    if cp.cuda.Device().compute_capability != "90":
        print(f"FAIL the Hopper kernels need compute capability 9.0, not {cp.cuda.Device().compute_capability}")
        sys.exit(1)
    custom = [tuple(int(x) for x in s.split(":")) for s in a.shapes.split(",") if s]
    qcustom = [tuple(int(x) for x in s.split(":")) for s in a.qshapes.split(",") if s]
    dims, cases = [int(d) for d in a.dims.split(",")], [c for c in a.cases.split(",") if c]
    shapes = {D: custom or [BWD_WG_SHAPES[D]] for D in set(dims) | {int(c.rsplit(":", 1)[1]) for c in cases}}
    qshapes = {D: qcustom or [BWD_WG_Q_SHAPES[D]] for D in shapes}
    ctypes = {CTYPES[d] for d in a.dtypes.split(",")} | {"__half"}
    names = sorted({bwd_wg_name(ct, D, o, s) for ct in ctypes for D in shapes for o in ("float", ct)
                    for s in shapes[D]}
                   | {bwd_wg_q_name(ct, D, o, s) for ct in ctypes for D in shapes for o in ("float", ct)
                      for s in qshapes[D]})
    mod = loader.build("attend_bwd_wgmma.cu", names)  # one NVRTC run for every kernel below
    failures = []
    for dtype in a.dtypes.split(","):
        for D in dims:
            check(mod, dtype, D, shapes[D], qshapes[D], failures)
    print(f"{'FAIL' if failures else 'OK'}: {len(failures)} mismatching checks", flush=True)
    for case in cases:
        D = int(case.rsplit(":", 1)[1])
        bench(mod, case, shapes[D], qshapes[D])
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
