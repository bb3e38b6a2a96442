"""The public entry points beside the kernels alone and FlexAttention, in one process.

For each N and D, in alternating rounds on the same inputs: the forward kernel alone
(`local.attend` on head-major arrays: what `hpcattn bench` times), `hpcattn.attention` on the
caller's (1, N, H, D) arrays with MPI.COMM_SELF (what a user calls), FlexAttention
(torch.compile'd, same device, dtype and mask) and, for dense causal on a GPU, PyTorch SDPA's
forward (its default backend); then the backward kernel alone
(`grad.backward`) beside `hpcattn.attention_backward`. Medians per side, in ms, and the
ratios api / kernel. A sample is as many calls back to back as fill 20 ms (a loop's cost per
call, launch overhead included). Every side's output is checked against the kernel's.

    python jobs/api_bench.py --device cpu --seqs 4096,65536,262144 --dims 64,128 --heads 2
    python3 jobs/api_bench.py --device gpu --seqs 4096,65536,262144,1048576 --heads 8
    python3 jobs/api_bench.py --device gpu --seqs 16384,65536 --dims 128,64 --mask causal --peers sdpa
"""
import argparse
import json
import math
import time

import numpy as np
from mpi4py import MPI

import hpcattn
from hpcattn.cpu import grad, local
from hpcattn.masks import parse


def timer(xp):
    """A clock that waits for the device first (GPU) so each side is charged its own work."""
    def now():
        if xp is not np:
            xp.cuda.Device().synchronize()
        return time.perf_counter()
    return now


def flex_call(xp, q, k, v, spec, n, scale):
    """FlexAttention over the same mask (None where PyTorch is missing or has no mask_mod)."""
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    from hpcattn.commands.bench import _mask_mod
    mod = _mask_mod(parse(spec, n_keys=n), n, torch)
    dev = "cuda" if xp is not np else "cpu"
    tq, tk, tv = (torch.as_tensor(x).to(dev).transpose(1, 2).contiguous() for x in (q, k, v))
    bm = create_block_mask(mod, None, None, n, n, device=dev, _compile=True)
    fn = torch.compile(flex_attention, dynamic=False)

    def call():
        with torch.no_grad():
            return fn(tq, tk, tv, block_mask=bm, scale=scale)
    return call


def sdpa_call(xp, q, k, v, spec, scale):
    """PyTorch SDPA's forward (its default backend) on the GPU for dense causal, else None."""
    if spec != "causal" or xp is np:
        return None
    import torch
    tq, tk, tv = (torch.as_tensor(x).transpose(1, 2).contiguous() for x in (q, k, v))

    def call():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=scale)
    return call


def case(xp, n, H, D, spec, rounds, backward, peers=("flex", "sdpa")):
    rng = np.random.default_rng(0)
    q, k, v, do = (xp.asarray(rng.standard_normal((1, n, H, D), dtype=np.float32).astype(np.float16))
                   for _ in range(4))
    heads = [xp.ascontiguousarray(x.transpose(0, 2, 1, 3))[:, :, None] for x in (q, k, v, do)]
    qh, kh, vh, doh = heads[0], heads[1][:, :, 0], heads[2][:, :, 0], heads[3]
    mask, scale, pos = parse(spec, n_keys=n), 1 / math.sqrt(D), np.arange(n)
    oh = xp.empty_like(qh)
    sides = {"kernel": lambda: local.attend(qh, pos, kh, vh, 0, mask, scale, out=oh),
             "attention": lambda: hpcattn.attention(q, k, v, mask=spec, comm=MPI.COMM_SELF)}
    calls = {"flex": flex_call(xp, q, k, v, spec, n, scale) if "flex" in peers else None,
             "sdpa": sdpa_call(xp, q, k, v, spec, scale) if "sdpa" in peers else None}
    sides.update((peer, call) for peer, call in calls.items() if call is not None)
    o, lse = hpcattn.attention(q, k, v, mask=spec, comm=MPI.COMM_SELF)
    if backward:
        lse_h = lse.reshape(1, H, 1, n)
        oh2 = xp.ascontiguousarray(o.transpose(0, 2, 1, 3))[:, :, None]
        delta = grad.row_delta(doh, oh2)
        sides["bwd kernel"] = lambda: grad.backward(qh, pos, kh, vh, 0, mask, scale, doh, lse_h, delta)
        sides["attention_backward"] = lambda: hpcattn.attention_backward(q, k, v, o, lse, do, mask=spec,
                                                                         comm=MPI.COMM_SELF)
    outs = {name: fn() for name, fn in sides.items()}  # first calls: compilation, caches
    ref = xp.asarray(outs["kernel"][0])[:, :, 0].transpose(0, 2, 1, 3).astype(np.float32)
    err = {"attention": float(abs(outs["attention"][0].astype(np.float32) - ref).max())}
    for peer in ("flex", "sdpa"):
        if peer in outs:
            err[peer] = float(abs(xp.asarray(outs[peer].float().transpose(1, 2).contiguous()) - ref).max())
    now, times = timer(xp), {name: [] for name in sides}
    reps = {}  # calls per sample, back to back as a loop calls them: >= 20 ms a sample
    for name, fn in sides.items():
        t = now()
        fn()
        reps[name] = max(1, min(1000, int(0.02 / max(now() - t, 1e-6))))
    for _ in range(rounds):
        for name, fn in sides.items():
            t = now()
            for _ in range(reps[name]):
                fn()
            times[name].append((now() - t) / reps[name])
    med = {name: float(np.median(ts)) * 1e3 for name, ts in times.items()}
    if xp is not np:  # the kernel's device time alone: the stream is kept busy before it, so no
        # host time shows between the events; the API's cost per call less this is its fixed cost
        blocker, dev = xp.empty(1 << 28, dtype=xp.float32), []
        for _ in range(rounds):
            blocker.fill(0)
            start, end = xp.cuda.Event(), xp.cuda.Event()
            start.record()
            sides["kernel"]()
            end.record()
            end.synchronize()
            dev.append(xp.cuda.get_elapsed_time(start, end))
        med["kernel on device"] = float(np.median(dev))
    row = {"N": n, "H": H, "D": D, "mask": spec, "ms": med, "max_abs_diff_vs_kernel": err,
           "api/kernel": med["attention"] / med["kernel"]}
    if "kernel on device" in med:
        row["api fixed cost us"] = (med["attention"] - med["kernel on device"]) * 1e3
    for peer in ("flex", "sdpa"):
        if peer in med:
            row[f"{peer}/api"] = med[peer] / med["attention"]
            row[f"{peer}/kernel"] = med[peer] / med["kernel"]
    if backward:
        row["api_bwd/kernel_bwd"] = med["attention_backward"] / med["bwd kernel"]
    return row


def profile_calls(xp, n, H, D, spec, calls):
    """cProfile of `calls` back-to-back hpcattn.attention calls (after warm-up), by own time."""
    import cProfile
    import pstats
    rng = np.random.default_rng(0)
    q, k, v = (xp.asarray(rng.standard_normal((1, n, H, D), dtype=np.float32).astype(np.float16))
               for _ in range(3))
    for _ in range(20):
        hpcattn.attention(q, k, v, mask=spec, comm=MPI.COMM_SELF)
    now = timer(xp)
    t = now()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        hpcattn.attention(q, k, v, mask=spec, comm=MPI.COMM_SELF)
    prof.disable()
    print(f"# {calls} calls at N = {n}: {(now() - t) / calls * 1e6:.1f} us each under cProfile", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--seqs", default="4096,65536,262144")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--mask", default="window:256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--peers", default="flex,sdpa", help="of flex,sdpa (SDPA: dense causal on a GPU only)")
    ap.add_argument("--profile", type=int, default=0, metavar="CALLS",
                    help="first: cProfile CALLS calls of hpcattn.attention at the first N and D (where "
                         "the fixed cost goes), top 25 functions by own time")
    a = ap.parse_args()
    if a.device == "gpu":
        import cupy as xp
    else:
        xp = np
    if a.profile:
        profile_calls(xp, int(a.seqs.split(",")[0]), a.heads, int(a.dims.split(",")[0]), a.mask, a.profile)
    for n in map(int, a.seqs.split(",")):
        for D in map(int, a.dims.split(",")):
            print(json.dumps(case(xp, n, a.heads, D, a.mask, a.rounds, a.backward, a.peers.split(","))), flush=True)


if __name__ == "__main__":
    main()
