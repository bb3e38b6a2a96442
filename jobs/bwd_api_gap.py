"""Where the one-rank API backward's time goes: CUDA events around each kernel launch inside
hpcattn.attention_backward, around the whole call, and perf_counter around it (host time to
return, and the whole call), beside the peer's backward (SDPA for causal, FlexAttention else;
jobs/bwd_bench.py's peer_grad), in alternating rounds in one process; float16, (1, N, 8, D);
medians in ms, one JSON line per case.

    PYTHONPATH=$PWD python3 jobs/bwd_api_gap.py [causal:16384:128,window:256:262144:64]
"""
import json
import sys
import time

import cupy as cp
import numpy as np
import torch
from mpi4py import MPI

import hpcattn
from bwd_bench import peer_grad  # jobs/ is on the path when this runs as a script
from hpcattn.gpu import backward, loader
from hpcattn.torch import _array

launches = []  # (kernel name, start event, end event) of the call being timed


class Timed:
    """A compiled kernel whose every launch is bracketed by CUDA events (into `launches`)."""

    def __init__(self, fn, name):
        self.fn, self.name = fn, name

    def __call__(self, *args, **kwargs):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        self.fn(*args, **kwargs)
        b.record()
        launches.append((self.name, a, b))


def case(spec, n, D, H=8, rounds=7):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn((1, n, H, D), generator=g).half().cuda() for _ in range(4))
    aq, ak, av, ado = map(_array, (q, k, v, do))
    o, lse = hpcattn.attention(aq, ak, av, mask=spec, comm=MPI.COMM_SELF)
    peer, _, peer_bwd = peer_grad(spec, n, q, k, v, do)
    sides = {"api": lambda: hpcattn.attention_backward(aq, ak, av, o, lse, ado, mask=spec, comm=MPI.COMM_SELF),
             peer: peer_bwd}
    for fn in sides.values():
        fn()
    ms = {f"{s} {how}": [] for s in sides for how in ("events", "perf_counter")}
    ms["api host"], per_kernel = [], {}
    for _ in range(rounds):
        for side, fn in sides.items():
            torch.cuda.synchronize()
            launches.clear()
            a, b = cp.cuda.Event(), cp.cuda.Event()
            t = time.perf_counter()
            a.record()
            fn()
            host = time.perf_counter()
            b.record()
            b.synchronize()
            ms[f"{side} perf_counter"].append((time.perf_counter() - t) * 1e3)
            ms[f"{side} events"].append(cp.cuda.get_elapsed_time(a, b))
            if side == "api":
                ms["api host"].append((host - t) * 1e3)
                for name, s, e in launches:
                    per_kernel.setdefault(name, []).append(cp.cuda.get_elapsed_time(s, e))
    row = {"case": f"{spec}:{n}:{D}", **{k: float(np.median(x)) for k, x in ms.items()}}
    row["kernels"] = {name: float(np.median(x)) for name, x in per_kernel.items()}
    return row


def main():
    # the kernels gpu/backward.py looks up (its launch objects keep them), each launch timed
    backward.kernel = lambda name: Timed(loader.kernel(name), name)
    backward.kernel_with_smem = lambda name, smem: Timed(loader.kernel_with_smem(name, smem), name)
    backward.launch = lambda name, grid, smem, args, threads=loader.THREADS: Timed(
        loader.kernel_with_smem(name, smem), name)(grid, (threads,), args, shared_mem=smem)
    for c in (sys.argv[1] if len(sys.argv) > 1 else "causal:16384:128,window:256:262144:64").split(","):
        spec, n, D = c.rsplit(":", 2)
        print(json.dumps(case(spec, int(n), int(D))), flush=True)


if __name__ == "__main__":
    main()
