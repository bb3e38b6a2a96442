"""A training step's attention through hpcattn.torch beside PyTorch's, in one process.

For each N and D, in alternating rounds on the same bfloat16 tensors (1, N, H, D): forward +
backward of `hpcattn.torch.attention` (one rank, COMM_SELF) and of the peer with the same mask:
FlexAttention (torch.compile'd) on CUDA; on the CPU, where FlexAttention has no backward,
scaled_dot_product_attention with the mask as a dense boolean matrix (N^2 bytes: small N only).
Each step is a backward of sum(o * do). Medians in ms, the ratio peer / hpcattn (> 1: hpcattn
faster), and the largest difference of o and of dq between the two.

    python jobs/torch_bench.py --device cpu --seqs 4096,16384 --dims 64 --heads 2
    python3 jobs/torch_bench.py --device cuda --seqs 262144,1048576 --dims 64,128 --heads 8
"""
import argparse
import json
import time

import torch
from mpi4py import MPI

import hpcattn.torch as ht
from hpcattn.masks import parse


def flex_step(spec, n, dev):
    """f(q, k, v) -> o by FlexAttention over the mask (tensors (1, N, H, D))."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from hpcattn.commands.bench import _mask_mod
    bm = create_block_mask(_mask_mod(parse(spec, n_keys=n), n, torch), None, None, n, n, device=dev,
                           _compile=True)  # uncompiled, it builds the dense N x N mask first
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              block_mask=bm).transpose(1, 2)


def sdpa_step(spec, n, dev):
    """f(q, k, v) -> o by SDPA with the mask as a dense boolean matrix."""
    import numpy as np
    mask = parse(spec, n_keys=n)
    allowed = torch.from_numpy(mask.allowed(np.arange(n)[:, None], np.arange(n)[None, :])).to(dev)
    return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed).transpose(1, 2)


def case(dev, n, H, D, spec, rounds):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn((1, n, H, D), generator=g).to(torch.bfloat16).to(dev) for _ in range(4))
    peer = "flex" if dev == "cuda" else "sdpa dense mask"
    sides = {"hpcattn": lambda q, k, v: ht.attention(q, k, v, mask=spec, comm=MPI.COMM_SELF),
             peer: (flex_step if dev == "cuda" else sdpa_step)(spec, n, dev)}

    def step(fn):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        o = fn(*leaves)
        o.backward(do)
        return o, leaves[0].grad

    def now():
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    first = {name: step(fn) for name, fn in sides.items()}  # compilation, caches
    times = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            t = now()
            step(fn)
            times[name].append(now() - t)
    med = {name: sorted(ts)[len(ts) // 2] * 1e3 for name, ts in times.items()}
    diff = {what: float((first["hpcattn"][i].float() - first[peer][i].float()).abs().max())
            for i, what in enumerate(("o", "dq"))}
    return {"N": n, "H": H, "D": D, "mask": spec, "dtype": "bfloat16", "device": dev, "ms fwd+bwd": med,
            f"{peer}/hpcattn": med[peer] / med["hpcattn"], "max_abs_diff": diff}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--seqs", default="4096,16384")
    ap.add_argument("--dims", default="64")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--mask", default="window:256")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    for n in map(int, a.seqs.split(",")):
        for D in map(int, a.dims.split(",")):
            print(json.dumps(case(a.device, n, a.heads, D, a.mask, a.rounds)), flush=True)


if __name__ == "__main__":
    main()
