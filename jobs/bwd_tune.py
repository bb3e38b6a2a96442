"""Shape sweep of the tensor-core backward (kernels/attend_bwd_mma.cu) on one GPU: each kernel
alone (attend_bwd_kv: warps, K/V in registers, blocks per SM; attend_bwd_q: warps, q/dO in
registers, K/V buffers, blocks per SM) on the same head-major float16 inputs; ms per launch
(CUDA events, median of 5 after a warm-up) and useful TFLOP/s of the whole backward if the other kernel took
no time. Picks hpcattn.gpu.shapes.BWD_SHAPES; one JSON line per candidate.
    python3 jobs/bwd_tune.py --cases window:256:262144:64,window:256:262144:128,causal:16384:128"""
import argparse
import json
import math

import cupy as cp
import numpy as np

from gpu_bench import timed  # jobs/ is on the path when this runs as a script
from hpcattn.gpu import encode, loader
from hpcattn.gpu.shapes import BWD_SHAPES, bwd_names, bwd_smem
from hpcattn.masks import parse

KV = {64: [(4, True, 1), (8, True, 1), (4, False, 3), (4, True, 3), (8, False, 1), (2, True, 5)],
      128: [(4, False, 1), (8, False, 1), (2, False, 2), (4, False, 3)]}
Q = [(4, True, 2, 1), (4, True, 3, 1), (8, True, 2, 1), (4, False, 2, 3), (4, True, 2, 3), (2, True, 2, 4),
     (4, False, 3, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="window:256:262144:64,window:256:262144:128,causal:16384:128")
    ap.add_argument("--heads", type=int, default=8)
    a = ap.parse_args()
    H = a.heads
    for c in a.cases.split(","):
        spec, n, D = c.rsplit(":", 2)
        n, D = int(n), int(D)
        mask = parse(spec, n_keys=n)
        base = BWD_SHAPES[D]
        kv_shapes = [s + base[3:] for s in KV[D]]
        q_shapes = [base[:3] + s for s in Q]
        kv_names = [bwd_names("__half", D, "float", s)[0] for s in kv_shapes]
        q_names = [bwd_names("__half", D, "float", s)[1] for s in q_shapes]
        mod = loader.build("attend_bwd_mma.cu", kv_names + q_names)
        q, do = (cp.random.standard_normal((1, H, 1, n, D), dtype=cp.float32).astype(cp.float16) for _ in range(2))
        k, v = (cp.random.standard_normal((1, H, n, D), dtype=cp.float32).astype(cp.float16) for _ in range(2))
        lse = cp.full((1, H, 1, n), 8.0, cp.float32)
        delta = cp.zeros((1, H, 1, n), cp.float32)
        edges = cp.zeros(1, cp.uint64)
        words = cp.asarray(encode.mask_words(mask))
        scale = 1 / math.sqrt(D)
        edges_per_head = int(mask.allowed(np.arange(min(n, 4096))[:, None], np.arange(n)[None, :]).sum()
                             * (n / min(n, 4096))) if spec != "causal" else n * (n + 1) // 2
        flop = 2.5 * 4 * edges_per_head * D * H
        strides = tuple(np.int64(x) for x in (n * D, n * D, D, n * D, n * D, D)) + (np.int32(H),)
        tail = (np.int32(n), np.int32(n), np.int32(1), np.int64(0), np.float32(scale), np.int64(0)) + strides
        args = (q, np.uintp(0), k, v, do, lse, delta)
        for kind, shapes, names in (("kv", kv_shapes, kv_names), ("q", q_shapes, q_names)):
            for shape, name in zip(shapes, names):
                f = mod.get_function(name)
                smem = bwd_smem(D, shape)[0 if kind == "kv" else 1]
                f.max_dynamic_shared_size_bytes = smem
                if kind == "kv":
                    w = shape[0]
                    dk, dv = cp.zeros_like(k, cp.float32), cp.zeros_like(k, cp.float32)
                    call = lambda: f((-(-n // (16 * w)), H), (32 * w,), args + (dk, dv, words, np.uintp(0)) + tail,
                                     shared_mem=smem)
                else:
                    w = shape[3]
                    dq = cp.zeros_like(q, cp.float32)
                    call = lambda: f((-(-n // (16 * w)), H), (32 * w,), args + (dq, edges, words) + tail,
                                     shared_mem=smem)
                ms = timed(call) * 1e3
                print(json.dumps({"case": c, "kernel": kind, "shape": shape, "ms": ms,
                                  "TFLOP/s if alone": flop / ms * 1e-9}), flush=True)


if __name__ == "__main__":
    main()
