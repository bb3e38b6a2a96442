"""Local-kernel benchmark on one GPU: hpcattn's CUDA kernel, float16 and bfloat16,
D = 64 and 128, window masks, N from 64K up; useful TFLOP/s (4*edges*D per head) and achieved
bandwidth against the device-copy and GEMM ceilings measured in the same run; PyTorch SDPA,
FlexAttention (timed in rounds alternating with hpcattn's kernel) and FlashAttention's
window_size side by side where importable; the longest
in-HBM window:256 D=64 context (measured first, with o in the input dtype and positions
derived on the device, before PyTorch holds any memory). Writes JSON to argv[1] (and prints one line per figure)."""
import argparse
import json
import math
import os
import sys
import time
import traceback

import cupy as cp
import numpy as np

from hpcattn.gpu import forward, loader
from hpcattn.masks import parse


def per_call(fn, reps=10):
    """Milliseconds per call of fn over reps back-to-back calls, by CUDA events (one round of
    the alternating rounds that compare two sides in one process)."""
    a, b = cp.cuda.Event(), cp.cuda.Event()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return cp.cuda.get_elapsed_time(a, b) / reps


def settle(label, limit_s=60):
    """Waits for the work queued on the current stream by polling an event, so that a kernel
    that never ends (a deadlock in a form under test) ends the job after limit_s with a line
    naming it, where a blocking wait would leave it silent until killed."""
    done = cp.cuda.Event()
    done.record()
    t0 = time.perf_counter()
    while not done.done:
        if time.perf_counter() - t0 > limit_s:
            print(f"HANG: {label} still running after {limit_s} s; exiting", flush=True)
            os._exit(3)
        time.sleep(0.01)


def timed(fn, reps=5, warm=1):
    """Median seconds of fn() over reps, by CUDA events on the current stream."""
    for _ in range(warm):
        fn()
    cp.cuda.get_current_stream().synchronize()
    out = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return float(np.median(out))


def ceilings():
    x = cp.empty(2**30, dtype=cp.uint8)
    y = cp.empty_like(x)
    copy_s = timed(lambda: cp.copyto(y, x))
    n = 8192
    a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
    gemm_s = timed(lambda: a @ a)
    out = {"copy_GBps": 2 * 2**30 / copy_s / 1e9, "gemm_fp16_cupy_TFLOPs": 2 * n**3 / gemm_s / 1e12}
    try:
        import torch
        t = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        s = timed(lambda: t @ t)
        out["gemm_bf16_torch_TFLOPs"] = 2 * n**3 / s / 1e12
    except Exception as e:
        out["torch"] = f"not usable: {type(e).__name__}: {e}"
    return out


def bf16(x):
    u = x.view(cp.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cp.uint16)


def make(N, H, D, dtype):
    """Device q (1,H,1,N,D), k, v (1,H,N,D) of dtype (bfloat16 as uint16 bits), filled in
    chunks so that no float32 copy of a whole array is ever held."""
    out = []
    for shape in ((1, H, 1, N, D), (1, H, N, D), (1, H, N, D)):
        a = cp.empty(shape, dtype=cp.uint16 if dtype == "bfloat16" else dtype)
        flat = a.reshape(-1)
        for i in range(0, flat.size, 1 << 26):
            x = cp.random.standard_normal(min(1 << 26, flat.size - i), dtype=cp.float32)
            flat[i:i + x.size] = bf16(x) if dtype == "bfloat16" else x.astype(dtype)
        out.append(a)
    return out


def ours(N, H, D, dtype, spec, kind="auto"):
    """(go, rate): one call of forward.attend (run once here), and the figures of a time for it."""
    q, k, v = make(N, H, D, dtype)
    mask, qpos, scale = parse(spec), np.arange(N, dtype=np.int64), 1 / math.sqrt(D)

    def go():
        return forward.attend(q, qpos, k, v, 0, mask, scale, bf16=dtype == "bfloat16", kernel_kind=kind)
    edges = go()[2]
    nbytes = 3 * N * H * D * 2 + N * H * D * 4 + N * H * 4

    def rate(s):
        return {"s": s, "edges_per_head": edges, "useful_TFLOPs": 4 * edges * D * H / s / 1e12,
                "GBps": nbytes / s / 1e9}
    return go, rate


_FLEX = {}


def window_mod(w):
    """FlexAttention mask_mod of window:w (|i - j| <= w)."""
    def mod(b, h, i, j):
        return (i - j <= w) & (j - i <= w)
    return mod


ROUNDS = 5  # rounds of timing that alternate Flex and hpcattn's kernel (a drifting clock hits both)


def flex_window(q, k, v, w, rate, rival=None):
    """FlexAttention over window:w, compiled: the block mask is built by create_block_mask with
    _compile=True and B = H = None (blockwise, never an N x N mask: without _compile run 10
    asked for 512 GiB at N = 262144), flex_attention itself under torch.compile (eager flex
    is a dense reference path). Checked once against SDPA with an explicit mask on the first
    rows, so a fast time cannot come from skipped work. Timed in ROUNDS rounds, each followed
    by one of `rival` (hpcattn's call) when given: medians of both ("s", "rival_s")."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        # one compilation per (N, D, dtype): past dynamo's default limit of 8 the call falls
        # back to eager flex, which is dense (run 11's bf16 rows asked for 32 TiB)
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    N = q.shape[2]
    t = time.perf_counter()
    bm = create_block_mask(window_mod(w), None, None, N, N, device="cuda", _compile=True)
    torch.cuda.synchronize()
    build = time.perf_counter() - t
    flex = _FLEX["fn"]
    s, s_rival = [], []
    for _ in range(ROUNDS):
        s.append(timed(lambda: flex(q, k, v, block_mask=bm), reps=3))
        if rival is not None:
            s_rival.append(timed(rival, reps=3))
    r = min(N, 2048)
    got = flex(q, k, v, block_mask=bm)[:, :, :r].float()
    i = torch.arange(r, device="cuda")[:, None]
    j = torch.arange(min(N, r + w), device="cuda")[None, :]
    want = F.scaled_dot_product_attention(q[:, :, :r].float(), k[:, :, :j.shape[1]].float(),
                                          v[:, :, :j.shape[1]].float(), attn_mask=(i - j).abs() <= w)
    err = float((got - want).abs().max() / want.abs().max())
    blocks = bm.kv_num_blocks.sum().item() + (bm.full_kv_num_blocks.sum().item()
                                              if bm.full_kv_num_blocks is not None else 0)
    return {**rate(float(np.median(s))), "block_mask_s": build, "first_rows_rel_err": err,
            "kv_blocks_visited": int(blocks), "block_size": list(bm.BLOCK_SIZE),
            **({"rival_s": float(np.median(s_rival))} if s_rival else {})}


def peers(N, H, D, dtype, w, rival=None):
    """PyTorch SDPA (dense causal, as a dense ceiling), FlexAttention sliding window (timed
    alternately with `rival`, see flex_window), FlashAttention window_size: seconds, where
    importable."""
    out = {}
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:
        return {"torch": f"not importable: {e}"}
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=tdt) for _ in range(3))
    edges = N * (2 * w + 1) - w * (w + 1)  # |i - j| <= w within [0, N), N > w

    def rate(s, e=edges):
        return {"s": s, "useful_TFLOPs": 4 * e * D * H / s / 1e12}
    try:
        if N > 262144:
            raise RuntimeError("skipped above N = 262144 (dense: N^2 work)")
        s = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps=3)
        out["sdpa_dense_causal"] = rate(s, N * (N + 1) // 2)
    except Exception as e:
        out["sdpa_dense_causal"] = f"not run: {type(e).__name__}: {str(e)[:200]}"
    try:
        out["flex_window"] = flex_window(q, k, v, w, rate, rival)
    except Exception as e:
        out["flex_window"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    try:
        from flash_attn import flash_attn_func
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        s = timed(lambda: flash_attn_func(qt, kt, vt, window_size=(w, w)), reps=3)
        out["flash_attn_window"] = rate(s)
    except Exception as e:
        out["flash_attn_window"] = f"not usable: {type(e).__name__}: {str(e)[:120]}"
    torch.cuda.empty_cache()
    return out


def lean(N, D, spec, dtype="float16", in_place=True):
    """One run of forward.attend_lean (positions derived, o in the input dtype) at N tokens, one
    head: 2*D*4 + 4 bytes per token (516 at D = 64), 2*D*3 + 4 (388) with o written over q."""
    q, k, v = make(N, 1, D, dtype)
    out = q if in_place else cp.empty_like(q)  # one o for every timed call, not one per call
    res = {}

    def go():
        res["out"] = forward.attend_lean(q, 0, k, v, 0, parse(spec), 1 / math.sqrt(D), bf16=dtype == "bfloat16",
                                         out=out)
    s = timed(go, reps=1)
    edges = int(res["out"][2])  # a device count
    return {"s": s, "edges_per_head": edges, "useful_TFLOPs": 4 * edges * D / s / 1e12,
            "in_place": in_place, "bytes_per_token": 2 * D * (3 if in_place else 4) + 4, "device_bytes_used": cp.get_default_memory_pool().used_bytes()}


def longest(spec="window:256", D=64, start=2**24, budget_s=120, resolution=0.02, in_place=False):
    """The longest N that runs in HBM: double from `start` until out of memory, then bisect
    between the last N that ran and the first that did not, to `resolution` (relative) or
    until the time budget ends; every probe frees the memory pool first."""
    ok, bad, N, t0, best = 0, None, start, time.perf_counter(), None
    while time.perf_counter() - t0 < budget_s:
        cp.get_default_memory_pool().free_all_blocks()
        try:
            r = lean(N, D, spec, in_place=in_place)
            ok, best = N, {"N": N, **r}
            print(f"longest {spec} D={D}: N={N:,} ran in {r['s']:.3f} s", flush=True)
        except cp.cuda.memory.OutOfMemoryError:
            bad = N
            print(f"longest {spec} D={D}: N={N:,} out of memory", flush=True)
        if bad is not None and bad - ok <= resolution * ok:
            break
        N = 2 * N if bad is None else (ok + bad) // 2 // 65536 * 65536
        if N <= ok:
            break
    cp.get_default_memory_pool().free_all_blocks()
    if best is not None:
        best["first_out_of_memory"] = bad
        best["seconds_probing"] = time.perf_counter() - t0
    return best


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("json_out")
    p.add_argument("--sizes", default="65536,262144,1048576")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--longest-budget", type=float, default=120)
    p.add_argument("--no-peers", action="store_true", help="time hpcattn only")
    p.add_argument("--budget", type=float, default=400, help="seconds for the table; rows past it are skipped")
    args = p.parse_args(argv)
    res = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    # first, before PyTorch (imported below) takes its context and cached blocks: 160M tokens
    # of window:256 D=64 need 516 bytes each, within 1 GB of an 80 GB card's free memory
    try:
        for key, in_place in (("longest_window256_D64", False), ("longest_window256_D64_o_over_q", True)):
            res[key] = longest(budget_s=args.longest_budget / 2, in_place=in_place) \
                if args.longest_budget > 0 else None
            print(json.dumps({key: res[key]}), flush=True)
    except Exception:
        res["longest_window256_D64"] = traceback.format_exc()
    res.update(ceilings=ceilings(), runs=[])
    print(json.dumps(res["ceilings"]), flush=True)
    gemm = res["ceilings"].get("gemm_bf16_torch_TFLOPs", res["ceilings"]["gemm_fp16_cupy_TFLOPs"])
    spec = f"window:{args.window}"

    def figures(r):
        return {**r, "of_gemm": r["useful_TFLOPs"] / gemm, "of_copy": r["GBps"] / res["ceilings"]["copy_GBps"]}
    t_start = time.perf_counter()
    for dtype in ("float16", "bfloat16"):
        for D in (64, 128):
            for N in map(int, args.sizes.split(",")):
                row = {"dtype": dtype, "D": D, "N": N, "H": args.heads, "mask": spec}
                if time.perf_counter() - t_start > args.budget:
                    res["skipped"] = res.get("skipped", []) + [row]
                    continue
                rival = None  # (kind, go, rate) of the first kernel that runs: timed alternately with Flex
                for kind in ("wgmma", "mma", "simt"):
                    if (kind == "simt" and N > 262144) or (kind == "wgmma" and not loader.wgmma_available()):
                        continue
                    try:
                        call = ours(N, args.heads, D, dtype, spec, kind)
                        row[f"hpcattn_{kind}"] = figures(call[1](timed(call[0], reps=3)))
                        rival = rival or (kind, *call)
                    except Exception as e:
                        row[f"hpcattn_{kind}"] = f"failed: {type(e).__name__}: {e}"
                    call = None  # frees this kernel's inputs unless they are the rival's
                    cp.get_default_memory_pool().free_all_blocks()
                if not args.no_peers:
                    row["peers"] = peers(N, args.heads, D, dtype, args.window, rival and rival[1])
                    flex = row["peers"].get("flex_window")
                    if isinstance(flex, dict) and "rival_s" in flex:  # the figures of the alternated rounds
                        kind, _, rate = rival
                        row[f"hpcattn_{kind}"] = figures(rate(flex.pop("rival_s")))
                        row["vs_flex"] = {"kernel": kind, "rounds": ROUNDS,
                                          "ratio": flex["s"] / row[f"hpcattn_{kind}"]["s"]}
                rival = None
                cp.get_default_memory_pool().free_all_blocks()
                res["runs"].append(row)
                print(json.dumps(row), flush=True)
    with open(args.json_out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
