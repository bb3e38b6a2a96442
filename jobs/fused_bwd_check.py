"""Check and time kernels/attend_bwd_fused.cu's attend_bwd_fused_wg (Hopper, sm_90a: dk, dv and
the dq shares in one key-major pass) against attend_bwd_kv_wg + attend_bwd_q_wg on the same
inputs (jobs/wgmma_bwd_check.py's cases: six masks, G = 1 and 2, positions none, sorted with
gaps or shuffled, float16 and bfloat16, D = 64 and 128, dk and dv added into float32 sums and
written in the input dtype): dk, dv and dq (float32 sums) within TOL of attend_bwd_kv_wg's and
attend_bwd_q_wg's shares (the fused kernel walks the query tiles in reverse order), the ORDERED
kernel's dk, dv and dq the same bits on a rerun, the edge count attend_bwd_q_wg's; each check for
both dq paths (red.global.add from registers, and "bulk": staged in shared memory, added into
dq tiles by bulk reductions and then into dq by tile_rows_out; without ORDERED the tiles are
fixed-point, "fixed", which must rerun bit for bit too), the ordered bulk kernel's dk and dv also
the same bits as the ordered red.global.add kernel's. Then ms per call (CUDA events,
median of 5; bulk: with the tiles' memset and tile_rows_out) of the fused kernel, ordered
(with the memset of its turn counters) and atomic, with bulk ordered and fixed, and of
attend_bwd_kv_wg + attend_bwd_q_wg, on large head-major float16 inputs, and the speed-up. A
FAIL line and exit status 1 on any mismatch; one JSON line per figure.
    PYTHONPATH=$PWD python3 jobs/fused_bwd_check.py [--dims 64,128] [--dtypes float16,bfloat16]
        [--cases window:256:262144:128,causal:16384:128,window:256:262144:64] [--dq red,bulk]
(--dtypes '' times without checking; NVRTC compiles only the kernels named, a minute or more each)"""
import argparse
import json
import math
import sys

import cupy as cp
import numpy as np

from gpu_bench import timed  # jobs/ is on the path when this runs as a script
from hpcattn.gpu import loader
from hpcattn.gpu.backward import RowScales
from hpcattn.gpu.forward import NULL, row_strides
from hpcattn.gpu.shapes import (BWD_WG_Q_SHAPES, BWD_WG_SHAPES, CTYPES, bwd_fused_name, bwd_fused_shape,
                                bwd_fused_smem, bwd_wg_threads)
from wgmma_bwd_check import TOL, bench_inputs, cases, kernels, q_kernels, tensor_maps


# each form's name by (ordered, bulk)
FORMS = {(True, False): "ordered", (False, False): "atomic", (True, True): "ordered bulk", (False, True): "fixed"}


class Fused:
    """attend_bwd_fused_wg (ordered or not, bulk dq adds or not) for one dtype, head dim and
    output type, on its 1-D grid (ceil(nk / 64 NWG) B Hkv blocks), its turn counters zeroed first;
    tma: the kernel reads q, k, v, do by TMA (its tensor maps passed last; False: a tree from
    before)."""

    def __init__(self, mod, ct, D, otype, ordered, bulk=False, tma=True):
        shape = bwd_fused_shape(D, ordered, bulk)
        self.f, self.keys, self.threads = mod.get_function(bwd_fused_name(ct, D, otype, ordered, bulk=bulk)), \
            64 * shape[0], bwd_wg_threads(shape)
        self.smem, self.D, self.ordered, self.bulk, self.ct = bwd_fused_smem(D, ordered, bulk=bulk), D, ordered, bulk, ct
        self.rows = loader.kernel(f"tile_rows_out<float, {D}>") if bulk else None
        self.f.max_dynamic_shared_size_bytes = self.smem
        self.turns = cp.zeros(1, cp.int32)
        self.scales = {}  # BULK without ORDERED: a RowScales per shape, built once, not in every timed call
        self.maps = {} if tma else None  # TensorMaps per shape, likewise

    def __call__(self, args, dk, dv, dq, edges, words, unsorted, tail, nq, nk, BHkv, heads):
        tiles = (heads, -(-nq // 64), self.D // 64)  # a turn per (query head, query tile, 64-column slice)
        n = math.prod(tiles)
        if self.ordered:
            if self.turns.size < n:
                self.turns = cp.zeros(n, cp.int32)
            self.turns[:n].fill(0)
        acc = cp.zeros(tiles + (4096,), cp.float32) if self.bulk else dq  # BULK: dq tiles, then added into dq
        # BULK without ORDERED: fixed-point tiles, scaled from k, v, do, delta (tail[4]: the softmax scale)
        tscale = NULL
        if self.bulk and not self.ordered:
            key = args[4].shape, nk, row_strides(args[4]), row_strides(args[2]), float(tail[4])
            if key not in self.scales:
                self.scales[key] = RowScales(self.ct, *key)
            tscale = self.scales[key](args[2], args[3], args[4], args[6])
        maps = () if self.maps is None else (tensor_maps(self.maps, self.ct, args, nk, self.keys),)
        self.f((-(-nk // self.keys) * BHkv,), (self.threads,),
               args + (dk, dv, acc, edges, self.turns, tscale, words, unsorted) + tail + maps, shared_mem=self.smem)
        if self.bulk:
            self.rows((-(-heads * nq * self.D // 8 // 256),), (256,),
                      (acc, tscale, dq, np.int32(nq), np.int64(heads * nq), *(np.int64(0),) * 3, np.int32(heads)))


def rel_diff(a, b, base):
    """max |a - b| over max |b - base|, the share b holds (base: what it was added into, or 0)"""
    a, b = a.astype(cp.float32), b.astype(cp.float32)
    return float(cp.abs(a - b).max()) / max(float(cp.abs(b - base).max()), 1e-30)


def same_bits(a, b):
    return bool((a.view(cp.uint8) == b.view(cp.uint8)).all())


def check(wg, fmod, dtype, D, paths, failures):
    ct = CTYPES[dtype]
    _, [(_, qk)] = q_kernels(wg, ct, D, "float", [BWD_WG_Q_SHAPES[D]])
    for otype in ("float", ct):
        _, [(_, kv)] = kernels(wg, ct, D, otype, [BWD_WG_SHAPES[D]])
        fused = {(o, b): Fused(fmod, ct, D, otype, o, b) for o in (True, False) for b in paths}
        for c in cases(dtype, D):
            spec, _, words, G, pos, nq, nk, _, Hkv, _, q, k, args, unsorted, tail, r = c
            init = r.standard_normal((2,) + k.shape, dtype=cp.float32)  # what TO = float adds into
            qinit = r.standard_normal(q.shape, dtype=cp.float32)

            def grads():
                if otype == "float":
                    return init[0].copy(), init[1].copy()
                return tuple(cp.full(k.shape, 0xFFFF, cp.uint16).view(k.dtype) for _ in range(2))  # NaN

            dk, dv = grads()
            kv(args, dk, dv, words, unsorted, tail, nk, Hkv)
            dq, edges = qinit.copy(), cp.zeros(1, dtype=cp.uint64)
            qk(args, dq, edges, words, tail, nq, Hkv * G)
            base = init if otype == "float" else (0, 0)
            ordered_red = None  # the ordered red.global.add kernel's (dk, dv, dq): the bulk one's must match
            for bulk in paths:
                for ordered in (True, False):
                    runs = []
                    for _ in range(2):
                        fk, fv = grads()
                        fq, fe = qinit.copy(), cp.zeros(1, dtype=cp.uint64)
                        fused[ordered, bulk](args, fk, fv, fq, fe, words, unsorted, tail, nq, nk, Hkv, Hkv * G)
                        runs.append((fk, fv, fq, int(fe.get()[0])))
                    (fk, fv, fq, fe), again = runs
                    rel = rel_diff(fq, dq, qinit)
                    row = {"check": spec, "ordered": ordered, "bulk": bulk, "dtype": dtype, "D": D, "TO": otype,
                           "G": G, "positions": pos, "dk_rel": rel_diff(fk, dk, base[0]),
                           "dv_rel": rel_diff(fv, dv, base[1]), "dq_rel": rel, "dq_finite": bool(cp.isfinite(fq).all()),
                           "rerun_same": all(same_bits(a, b) for a, b in zip(runs[0][:3], again[:3])),
                           "edges": fe, "edges_ref": int(edges.get()[0])}
                    same_as_red = True
                    if ordered and not bulk:
                        ordered_red = runs[0][:3]
                    elif ordered and ordered_red is not None:
                        # dk, dv: the same sums; dq: the tiles sum the shares from zero, then add into dq
                        same_as_red = all(same_bits(a, b) for a, b in zip(ordered_red[:2], runs[0][:2]))
                        row["same_as_red"] = same_as_red
                    ok = (max(rel, row["dk_rel"], row["dv_rel"]) <= TOL[dtype] and row["dq_finite"]
                          and fe == row["edges_ref"] == again[3] and (row["rerun_same"] or not (ordered or bulk))
                          and same_as_red)
                    print(json.dumps(row), flush=True)
                    if not ok:
                        failures.append(row)
                        print(f"FAIL {json.dumps(row)}", flush=True)


def bench(wg, fmod, case, paths):
    _, n, D, H, _, words, q, k, args, tail = bench_inputs(case)
    _, [(_, kv)] = kernels(wg, "__half", D, "float", [BWD_WG_SHAPES[D]])
    _, [(_, qk)] = q_kernels(wg, "__half", D, "float", [BWD_WG_Q_SHAPES[D]])
    dk, dv = (cp.zeros(k.shape, cp.float32) for _ in range(2))
    dq, edges = cp.zeros(q.shape, cp.float32), cp.zeros(1, dtype=cp.uint64)

    def two():
        kv(args, dk, dv, words, np.uintp(0), tail, n, H)
        qk(args, dq, edges, words, tail, n, H)

    ms_two = timed(two) * 1e3
    print(json.dumps({"bench": case, "H": H, "kernel": "attend_bwd_kv_wg+attend_bwd_q_wg", "ms": ms_two}), flush=True)
    for bulk in paths:
        for ordered in (True, False):
            f = Fused(fmod, "__half", D, "float", ordered, bulk)
            ms = timed(lambda: f(args, dk, dv, dq, edges, words, np.uintp(0), tail, n, n, H, H)) * 1e3
            name = "attend_bwd_fused_wg " + FORMS[ordered, bulk]
            print(json.dumps({"bench": case, "H": H, "kernel": name, "ms": ms, "speedup": ms_two / ms}), flush=True)
            print(f"{case} {name}: {ms:.3f} ms vs kv_wg + q_wg {ms_two:.3f} ms, speed-up {ms_two / ms:.2f}x",
                  flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", default="64,128")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--dq", default="red,bulk", help="the dq paths: red (red.global.add), bulk (bulk reductions)")
    p.add_argument("--cases", default="window:256:262144:128,causal:16384:128,window:256:262144:64",
                   help="timed MASK:N:D, comma-separated (empty: none)")
    a = p.parse_args()
    if cp.cuda.Device().compute_capability != "90":
        print(f"FAIL the Hopper kernels need compute capability 9.0, not {cp.cuda.Device().compute_capability}")
        sys.exit(1)
    paths = [{"red": False, "bulk": True}[name] for name in a.dq.split(",")]
    dtypes, dims = [t for t in a.dtypes.split(",") if t], [int(d) for d in a.dims.split(",")]
    cases_ = [c for c in a.cases.split(",") if c]
    wanted = {(CTYPES[t], D, o) for t in dtypes for D in dims for o in ("float", CTYPES[t])}
    wanted |= {("__half", int(c.split(":")[-1]), "float") for c in cases_}
    wg = loader.build("attend_bwd_wgmma.cu")  # the default shapes' kernels, one NVRTC run each
    fmod = loader.build("attend_bwd_fused.cu", [bwd_fused_name(ct, D, o, ordered, bulk=b) for ct, D, o in sorted(wanted)
                                                for ordered in (True, False) for b in paths])
    failures = []
    for dtype in dtypes:
        for D in dims:
            check(wg, fmod, dtype, D, paths, failures)
    print(f"{'FAIL' if failures else 'OK'}: {len(failures)} mismatching checks", flush=True)
    for case in cases_:
        bench(wg, fmod, case, paths)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
