"""The GPU backward beside PyTorch's, in one process, in alternating rounds on the same inputs.

Sides, for each (mask, N, D, dtype) on (1, N, H, D) tensors:
  kernel       gpu.backward on head-major arrays (its "auto" kernels; a component figure);
               --kinds adds "kernel KIND" for each kernel_kind named (mma, wgmma, fused, fused-fixed, ...)
  api          hpcattn.attention_backward on the caller's arrays (MPI.COMM_SELF): what a user calls;
               with --kinds also "api KIND": the same with "auto" meaning KIND on Hopper (a candidate
               default, measured where the user calls it)
  flex / sdpa  FlexAttention's backward (torch.compile'd, same block mask) or, for dense causal,
               PyTorch SDPA's (its default backend): torch.autograd.grad of a kept forward graph
Medians in ms, useful TFLOP/s (2.5 x the forward's 4 * edges * D per head), the ratios peer / side
(> 1: hpcattn faster), the largest relative difference of dq, dk, dv from the peer's, and, per
row, dq's: the median over the later half of the rows of each row's largest difference over its
largest |dq| (the whole gradient's is set by the early rows, whose dq is largest).
--forward adds the forward kernel (local.attend) and the peer's forward.

    python3 jobs/bwd_bench.py --cases window:256:262144:64,window:256:262144:128,causal:16384:128 --dtypes float16,bfloat16
"""
import argparse
import json
import math
import time

import cupy as cp
import numpy as np
import torch
from mpi4py import MPI

import hpcattn
from hpcattn import api
from hpcattn.cpu import local
from hpcattn.gpu import backward as gb
from hpcattn.gpu.backward import backward as gpu_backward
from hpcattn.masks import parse
from hpcattn.torch import _array, _tensor


def peer_grad(spec, n, q, k, v, do):
    """(name, forward(), backward() -> (dq, dk, dv)) of PyTorch's attention with the same mask."""
    tq, tk, tv = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    if spec == "causal":
        name = "sdpa"

        def fwd():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        from hpcattn.commands.bench import _mask_mod
        name = "flex"
        bm = create_block_mask(_mask_mod(parse(spec, n_keys=n), n, torch), None, None, n, n, device="cuda",
                               _compile=True)
        fn = torch.compile(flex_attention, dynamic=False)

        def fwd():
            return fn(tq, tk, tv, block_mask=bm)
    o = fwd()
    tdo = do.transpose(1, 2)

    def bwd():
        return [g.transpose(1, 2) for g in torch.autograd.grad(o, (tq, tk, tv), tdo, retain_graph=True)]

    def fwd_only():
        with torch.no_grad():
            return fwd()
    return name, fwd_only, bwd


def as_auto(kind, fn):
    """fn with gpu.backward's "auto" meaning kind on Hopper, as if kind were its default (with a
    cache of the API's launches of its own)."""
    launches = {}

    def run():
        saved = gb.HOPPER_AUTO, api._launches
        gb.HOPPER_AUTO, api._launches = kind, launches
        try:
            return fn()
        finally:
            gb.HOPPER_AUTO, api._launches = saved
    return run


def case(spec, n, H, D, dtype, rounds, forward, kinds):
    g = torch.Generator(device="cpu").manual_seed(0)
    tdt = getattr(torch, dtype)
    q, k, v, do = (torch.randn((1, n, H, D), generator=g).to(tdt).cuda() for _ in range(4))
    aq, ak, av, ado = map(_array, (q, k, v, do))
    mask, scale = parse(spec, n_keys=n), 1 / math.sqrt(D)
    o, lse = hpcattn.attention(aq, ak, av, mask=spec, comm=MPI.COMM_SELF)
    bf16 = dtype == "bfloat16"
    # head-major (B, Hkv, G, n, D) copies for the kernel alone; bfloat16 as its uint16 bits
    hm = [_array(x.transpose(1, 2).contiguous().view(torch.int16 if bf16 else tdt).unsqueeze(2))
          for x in (q, k, v, do)]
    qh, kh, vh, doh = hm[0], hm[1][:, :, 0], hm[2][:, :, 0], hm[3]
    if bf16:
        qh, kh, vh, doh = (x.view(cp.uint16) for x in (qh, kh, vh, doh))
    lse_h, pos = lse.reshape(1, H, 1, n), np.arange(n, dtype=np.int64)
    delta = _array((do.float() * _tensor(o).float()).sum(-1).transpose(1, 2).contiguous().unsqueeze(2))
    peer, peer_fwd, peer_bwd = peer_grad(spec, n, q, k, v, do)
    sides = {"kernel": lambda: gpu_backward(qh, pos, kh, vh, 0, mask, scale, doh, lse_h, delta, bf16=bf16),
             "api": lambda: hpcattn.attention_backward(aq, ak, av, o, lse, ado, mask=spec, comm=MPI.COMM_SELF),
             peer: peer_bwd}
    for kind in kinds:
        sides[f"kernel {kind}"] = lambda kind=kind: gpu_backward(qh, pos, kh, vh, 0, mask, scale, doh, lse_h, delta,
                                                                 bf16=bf16, kernel_kind=kind)
        if kind == "wgmma" or kind in gb.FUSED:
            sides[f"api {kind}"] = as_auto(kind, sides["api"])
    if forward and not bf16:  # local.attend reads bfloat16 only from the API's arrays
        sides["fwd kernel"] = lambda: local.attend(qh, pos, kh, vh, 0, mask, scale, out=cp.empty_like(qh))
        sides[f"{peer} fwd"] = peer_fwd
    first = {name: fn() for name, fn in sides.items()}  # compilation, caches
    edges = first["kernel"][3]
    ref = [x.float() for x in first[peer]]
    diff, rows = {}, {}
    for name in (s for s in sides if s != peer and "fwd" not in s):
        got = [_tensor(x).float() for x in first[name][:3]]
        if not name.startswith("api"):
            got = [got[0][:, :, 0].transpose(1, 2), got[1].transpose(1, 2), got[2].transpose(1, 2)]
        diff[name] = {w: float((a - b).abs().max() / b.abs().max()) for w, a, b in zip(("dq", "dk", "dv"), got, ref)}
        a, b = got[0][:, n // 2:], ref[0][:, n // 2:]  # the later rows: more keys, more cancellation
        rows[name] = float(((a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-30)).median())
    times = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    med = {name: float(np.median(ts)) * 1e3 for name, ts in times.items()}
    flop = 2.5 * 4 * edges * D * H
    row = {"mask": spec, "N": n, "H": H, "D": D, "dtype": dtype, "ms": med, "edges_per_head": edges,
           "bwd TFLOP/s": {s: flop / med[s] * 1e-9 for s in sides if "fwd" not in s},
           f"{peer}/kernel": med[peer] / med["kernel"], f"{peer}/api": med[peer] / med["api"],
           **{f"{peer}/{s}": med[peer] / med[s] for s in sides if s.startswith("api ")},
           "max rel diff vs peer": diff, "dq row diff vs peer": rows}
    if forward and not bf16:
        row["fwd TFLOP/s"] = {s: 4 * edges * D * H / med[s] * 1e-9 for s in ("fwd kernel", f"{peer} fwd")}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="window:256:262144:64,window:256:262144:128,causal:16384:128",
                    help="comma-separated MASK:N:D (MASK may hold colons: the last two fields are N, D)")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--forward", action="store_true")
    ap.add_argument("--kinds", default="", help="comma-separated kernel_kinds timed beside auto, e.g. mma,fused-fixed")
    a = ap.parse_args()
    for c in a.cases.split(","):
        spec, n, D = c.rsplit(":", 2)
        for dtype in a.dtypes.split(","):
            print(json.dumps(case(spec, int(n), a.heads, int(D), dtype, a.rounds, a.forward,
                                  [k for k in a.kinds.split(",") if k])), flush=True)


if __name__ == "__main__":
    main()
