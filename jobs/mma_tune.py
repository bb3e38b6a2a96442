"""Shape sweep of the tensor-core forward (kernels/attend_mma.cu) on one GPU: every candidate
(warps per block, 16-row MMA tiles per warp, q fragments in registers, K/V
buffers, blocks per SM asked of the register allocator) on the same inputs,
window:W over N tokens, H heads, float16; useful TFLOP/s and the largest difference from the
first candidate's output. Picks hpcattn.gpu.shapes.MMA_SHAPES; prints one JSON line per candidate.
    python3 jobs/mma_tune.py [--seq N] [--heads H] [--window W] [--dims 64,128]"""
import argparse
import json
import math

import cupy as cp
import numpy as np

from gpu_bench import timed  # jobs/ is on the path when this runs as a script
from hpcattn.gpu import encode, forward, loader
from hpcattn.gpu.shapes import MK, mma_name, mma_smem
from hpcattn.masks import parse

CANDIDATES = [(2, 2, True, 3, 1), (4, 1, True, 2, 1), (4, 1, True, 3, 1), (4, 1, False, 2, 1), (4, 1, False, 3, 3),
              (4, 2, False, 3, 2)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=1 << 20)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--dims", default="64,128")
    p.add_argument("--mask", default=None, help="a mask spec instead of window:W")
    p.add_argument("--shapes", default=None, help="candidates as W:RM:Q:ST:MINB/... (Q = 0 or 1)")
    a = p.parse_args()
    N, H = a.seq, a.heads
    mask = parse(a.mask or f"window:{a.window}")
    cands = CANDIDATES if not a.shapes else [(int(w), int(r), bool(int(q)), int(st), int(mb)) for w, r, q, st, mb
                                              in (x.split(":") for x in a.shapes.split("/"))]
    words = cp.asarray(encode.mask_words(mask))
    qpos = cp.arange(N, dtype=cp.int64)
    for D in map(int, a.dims.split(",")):
        shapes = [s for s in cands if not (s[2] and 16 * s[0] * s[1] > 2 * MK)]
        names = [mma_name("__half", D, "float", s) for s in shapes]
        mod = loader.build("attend_mma.cu", names)
        q = cp.random.standard_normal((1, H, 1, N, D), dtype=cp.float32).astype(cp.float16)
        k = cp.random.standard_normal((1, H, N, D), dtype=cp.float32).astype(cp.float16)
        v = cp.random.standard_normal((1, H, N, D), dtype=cp.float32).astype(cp.float16)
        first = None
        for shape, name in zip(shapes, names):
            w, rm = shape[:2]
            f = mod.get_function(name)
            smem = mma_smem(D, shape)
            if smem > 48 * 1024:
                f.max_dynamic_shared_size_bytes = smem
            o = cp.empty((1, H, 1, N, D), dtype=cp.float32)
            lse = cp.empty((1, H, 1, N), dtype=cp.float32)
            edges = cp.zeros(1, dtype=cp.uint64)
            rows = 16 * w * rm

            def go():
                edges.fill(0)
                f(((N + rows - 1) // rows, H), (32 * w,),
                  (q, qpos, k, v, o, lse, edges, words, np.int32(N), np.int32(N), np.int32(1), np.int64(0),
                   np.float32(1 / math.sqrt(D)), np.int64(0)) + forward.stride_args(q, k, o, H),
                  shared_mem=smem)
            s = timed(go)
            ne = int(edges.get()[0])
            diff = 0.0 if first is None else float(cp.abs(o - first).max())
            if first is None:
                first = o
            print(json.dumps({"mask": mask.spec, "N": N, "D": D, "shape": shape, "s": s, "edges_per_head": ne,
                              "useful_TFLOPs": 4 * ne * D * H / s / 1e12, "max_diff_vs_first": diff,
                              "finite": bool(cp.isfinite(o).all())}), flush=True)


if __name__ == "__main__":
    main()
