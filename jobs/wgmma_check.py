"""Check and time kernels/attend_wgmma.cu's shapes (hpcattn.gpu.shapes.WG_SHAPES' fields) against
attend_fwd_mma on the same inputs: max difference of o and lse, equal edge counts, useful
TFLOP/s per shape (N tokens, H heads, window:256 by default), after a correctness pass over
several masks, query positions and uneven row counts at a small size.
    PYTHONPATH=$PWD python3 jobs/wgmma_check.py --shapes 2:5:1:1,3:8:1:0"""
import argparse
import json
import math

import cupy as cp
import numpy as np

from gpu_bench import settle, timed  # jobs/ is on the path when this runs as a script
from hpcattn.gpu import encode, forward, loader
from hpcattn.gpu.shapes import CTYPES, WG_SHAPES, wg_name, wg_smem
from hpcattn.masks import parse


def inputs(N, H, D, dtype, seed=0):
    r = cp.random.default_rng(seed)
    mk = lambda *s: r.standard_normal(s, dtype=cp.float32).astype(cp.float16)  # noqa: E731
    q, k, v = mk(1, H, 1, N, D), mk(1, H, N, D), mk(1, H, N, D)
    if dtype == "bfloat16":  # bfloat16 bit patterns of the same values, rounded
        q, k, v = (((x.astype(cp.float32).view(cp.uint32) + 0x8000) >> 16).astype(cp.uint16) for x in (q, k, v))
    return q, k, v


def run(f, smem, shape, q, qpos, k, v, mask, N, nk, scale, k0=0, qp=True):
    nwg = shape[0]
    H = q.shape[1]
    o = cp.zeros((1, H, 1, N, q.shape[-1]), dtype=q.dtype if shape[4] else cp.float32)
    lse = cp.zeros((1, H, 1, N), dtype=cp.float32)
    edges = cp.zeros(1, dtype=cp.uint64)
    words = cp.asarray(encode.mask_words(mask))
    qd = cp.asarray(qpos) if qp else None

    def go():
        edges.fill(0)
        items = (N + 64 * nwg - 1) // (64 * nwg) * H
        ctas = min(items, loader.sm_count() * shape[2])
        f((ctas,), (128 * (nwg + 1),),
          (q, qd if qd is not None else np.uintp(0), k, v, o, lse, edges, words, np.int32(N), np.int32(nk),
           np.int32(1), np.int64(k0), np.float32(scale), np.int64(0)) + forward.stride_args(q, k, o, H)
          + (np.int32(H),), shared_mem=smem)
    return go, o, lse, edges


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=1 << 20)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mask", default="window:256")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--dtypes", default="float16")
    p.add_argument("--shapes", default="3:8:1:0,2:5:1:1",
                   help="NWG:ST:MINB:QREG[:TO[:KT[:WIN]]] (TO 1: o in the input dtype; KT: tiles per step, 1 "
                        "or 2; WIN 1: the form for one full or window term, only with such masks), comma-separated")
    a = p.parse_args()
    shapes = [tuple(x + [0, 1, 0][len(x) - 4:]) for x in ([int(v) for v in s.split(":")] for s in a.shapes.split(","))]
    optin = cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    for dtype in a.dtypes.split(","):
        ct = CTYPES[dtype]
        for D in map(int, a.dims.split(",")):
            # a shape's shared memory may fit one head dim and not the other (the kernel's own
            # static shared memory is under 1 KiB)
            fit = [sh for sh in shapes if wg_smem(D, (sh[0], sh[1], sh[2], bool(sh[3]))) + 1024 <= optin]
            for sh in sorted(set(shapes) - set(fit)):
                print(json.dumps({"skipped": sh, "D": D, "why": f"more shared memory than the {optin} bytes a block may have"}))
            names = [wg_name(ct, D, ct if sh[4] else "float", (sh[0], sh[1], sh[2], bool(sh[3])), kt=sh[5], win=bool(sh[6]))
                     for sh in fit]
            mod = loader.build("attend_wgmma.cu", names) if names else None
            scale = 1 / math.sqrt(D)
            bf = dtype == "bfloat16"
            # correctness at a small size: several masks, positions, uneven rows, a key offset
            for spec, N, nk, k0, shift in (("window:256", 1000, 1000, 0, 0), ("causal+window:100", 777, 900, 50, 60),
                                           ("dilated:40:3+global:5", 513, 600, 0, 0), ("block:96+causal", 300, 300, 0, 0),
                                           ("full", 200, 333, 0, 0), ("causal", 600, 650, 0, 40)):
                q = inputs(N, 2, D, dtype, seed=N)[0]
                _, k, v = inputs(nk, 2, D, dtype, seed=nk)
                mask = parse(spec)
                qpos = np.sort(np.random.default_rng(N).choice(np.arange(k0 + shift, k0 + nk + shift), N,
                                                               replace=False)).astype(np.int64)
                ref = forward.attend(q, qpos, k, v, k0, mask, scale, bf16=bf, kernel_kind="mma")
                for shape, name in zip(fit, names):
                    if shape[6] and not encode.window_only(mask):
                        continue  # WIN takes one full or window term
                    f = mod.get_function(name)
                    smem = wg_smem(D, (shape[0], shape[1], shape[2], bool(shape[3])))
                    f.max_dynamic_shared_size_bytes = smem
                    go, o, lse, edges = run(f, smem, shape, q, qpos, k, v, mask, N, nk, scale, k0)
                    go()
                    settle(f"{name} on {spec}")
                    fin = bool(cp.isfinite(o).all())
                    o_diff = -1.0 if bf and shape[4] else float(cp.abs(o.astype(cp.float32) - ref[0]).max())
                    print(json.dumps({"check": spec, "dtype": dtype, "D": D, "shape": shape, "o_diff": o_diff,
                                      "lse_diff": float(cp.nanmax(cp.abs(cp.where(cp.isinf(ref[1]), 0, lse - ref[1])))),
                                      "lse_inf_same": bool((cp.isinf(lse) == cp.isinf(ref[1])).all()), "finite": fin,
                                      "edges_equal": int(edges.get()[0]) == ref[2]}), flush=True)
            N, H = a.seq, a.heads
            q, k, v = inputs(N, H, D, dtype)
            mask, qpos = parse(a.mask), np.arange(N, dtype=np.int64)
            ref = forward.attend(q, qpos, k, v, 0, mask, scale, bf16=bf, kernel_kind="mma")
            s_ref = timed(lambda: forward.attend(q, qpos, k, v, 0, mask, scale, bf16=bf, kernel_kind="mma"))
            useful = 4 * ref[2] * D * H
            print(json.dumps({"bench": a.mask, "N": N, "H": H, "dtype": dtype, "D": D, "kernel": "mma", "s": s_ref,
                              "TFLOPs": useful / s_ref / 1e12}), flush=True)
            if loader.wgmma_available():  # as hpcattn runs it: shapes.WG_SHAPES, a position array
                s_wg = timed(lambda: forward.attend(q, qpos, k, v, 0, mask, scale, bf16=bf, kernel_kind="wgmma"))
                print(json.dumps({"bench": a.mask, "N": N, "H": H, "dtype": dtype, "D": D, "kernel": "attend wgmma",
                                  "shape": WG_SHAPES[D], "s": s_wg, "TFLOPs": useful / s_wg / 1e12}), flush=True)
            for shape, name in zip(fit, names):
                f = mod.get_function(name)
                smem = wg_smem(D, (shape[0], shape[1], shape[2], bool(shape[3])))
                f.max_dynamic_shared_size_bytes = smem
                go, o, lse, edges = run(f, smem, shape, q, qpos, k, v, mask, N, N, scale, qp=False)
                s = timed(go)
                o_diff = -1.0 if bf and shape[4] else float(cp.abs(o.astype(cp.float32) - ref[0]).max())
                print(json.dumps({"bench": a.mask, "N": N, "H": H, "dtype": dtype, "D": D, "kernel": "wgmma",
                                  "shape": shape, "s": s, "TFLOPs": useful / s / 1e12, "o_diff": o_diff,
                                  "edges_equal": int(edges.get()[0]) == ref[2]}), flush=True)
                del o, lse


if __name__ == "__main__":
    main()
