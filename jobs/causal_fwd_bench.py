"""The Hopper forward kernel alone on dense causal blocks (ring's and burst's diagonal and full
blocks in causal training) beside PyTorch SDPA's forward (its default backend), in alternating
rounds in one process: CUDA events over 10 back-to-back calls per side and round, medians of 5
rounds, useful TFLOP/s (4 x edges x D per head), float16, (1, 8, N, D). A component figure: the
public entry points add their per-call work (jobs/api_bench.py, jobs/bwd_bench.py).

--baseline FILE also times attend_fwd_wgmma compiled from FILE (an absolute path: the kernel
source of another commit, e.g. `git show REV:kernels/attend_wgmma.cu > /tmp/base.cu`, built
against today's kernels/*.cuh; or a directory: another commit's whole kernels/, headers and all)
on the same launch and checks that it gives the same bits; with --dense and a kernels/ directory
that holds attend_fwd_dense.cu, its dense kernel too ("dense baseline", in today's DENSE_SHAPES),
against today's dense kernel.

--sched 1,... also times attend_fwd_wgmma with each of those SCHED values (hpcattn.gpu.shapes.WG_SCHEDS;
1: ping-pong between consumer warpgroups) on the same launch, as "sched1", ...; their outputs must
have the same bits as SCHED 0's (a FAIL line otherwise).

--win also times attend_fwd_wgmma's forms for one full or window term (WIN; the mask must be
one): "win" (the default shape, the same bits as the kernel's or a FAIL line) and "win_kt2" (KT = 2,
two 64-key tiles per softmax step, in hpcattn.gpu.shapes.WG_KT2_SHAPES' shape): its softmax
steps differ, so its output is compared with the kernel's and SDPA's by the largest difference,
its edge count exactly (a FAIL line when the counts differ or it is further from SDPA than twice
the kernel, plus 1e-3).

--dense also times attend_fwd_dense (kernels/attend_fwd_dense.cu: 128-key tiles, what `auto`
takes for these masks over rows in one run) in hpcattn.gpu.shapes.DENSE_SHAPES' shape, as "dense",
and with --dense-shapes NWG:STK:STV:QREG,... in each of those as "dense NWG:STK:STV:QREG". Its
sums run in another order than the kernel's, so each is checked against the kernel: the same
edge count, o within 2e-3 and lse within 1e-3 of it, the same rows without edges, no NaN, and
the same bits on a rerun (a FAIL line otherwise).

    PYTHONPATH=$PWD python3 jobs/causal_fwd_bench.py [--cases causal:16384:128,...] [--baseline /tmp/base.cu]
        [--sched 1] [--win] [--dense [--dense-shapes 2:3:2:0,...]]
"""
import argparse
import copy
import json
import math
from pathlib import Path

import cupy as cp
import numpy as np
import torch

from gpu_bench import per_call, settle  # jobs/ is on the path when this runs as a script
from hpcattn.gpu import encode, forward, loader
from hpcattn.gpu.shapes import SMEM_MAX, WG_KT2_SHAPES, WG_SCHEDS, dense_name, dense_smem, wg_name
from hpcattn.masks import parse


def case(spec, n, D, baseline, scheds=(), win=False, dense=(), H=8, rounds=5):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.float16) for _ in range(3))
    qh, kh, vh = cp.asarray(q).reshape(1, H, 1, n, D), cp.asarray(k), cp.asarray(v)
    mask, scale = parse(spec, n_keys=n), 1 / math.sqrt(D)
    o = cp.empty_like(qh)
    strides = (forward.row_strides(qh), forward.row_strides(kh), forward.row_strides(o))
    form = lambda **kw: forward.Launch("wgmma", "__half", D, "__half", qh.shape, n, 0, 0, scale, mask,  # noqa: E731
                                       strides, **kw)  # the kernel, or another of its forms
    run = form()
    sides = {"kernel": run}
    if baseline:
        base = copy.copy(run)
        name, tree = wg_name("__half", D, "__half"), Path(baseline).is_dir()
        src = Path(baseline, "attend_wgmma.cu" if tree else "").read_text()
        for param in ("bool WIN", "int KT", "int SCHED"):  # a source from before these parameters: drop them
            if param not in src:
                name = name.rsplit(", ", 1)[0] + ">"
        mod = loader.build("attend_wgmma.cu", [name], kernel_dir=baseline) if tree else loader.build(baseline, [name])
        base.fn = mod.get_function(name)
        base.fn.max_dynamic_shared_size_bytes = run.smem
        sides["baseline"] = base
    for s in scheds:
        sides[f"sched{s}"] = form(sched=s)
    if win:
        if not encode.window_only(mask):
            raise SystemExit(f"--win: {spec} is not one full or window term")
        sides["win"] = form(win=True)
        sides["win_kt2"] = form(shape=WG_KT2_SHAPES[D], kt=2, win=True)
    for shape in dense:  # None: DENSE_SHAPES' shape
        alt = form(dense=True)
        if shape and dense_smem(D, shape) > SMEM_MAX:
            continue
        if shape:  # built here: loader knows DENSE_SHAPES' names only
            alt = copy.copy(alt)
            name, alt.grid, alt.smem, threads, _ = forward._wgmma_spec("__half", D, "__half", n, H, shape, dense=True)
            alt.fn, alt.block = loader.build("attend_fwd_dense.cu", [name]).get_function(name), (threads,)
            alt.fn.max_dynamic_shared_size_bytes = alt.smem
        sides["dense" + (f" {':'.join(str(int(x)) for x in shape)}" if shape else "")] = alt
    if "dense" in sides and baseline and Path(baseline, "attend_fwd_dense.cu").is_file():  # that tree's, same shape
        alt, name = copy.copy(sides["dense"]), dense_name("__half", D, "__half")
        alt.fn = loader.build("attend_fwd_dense.cu", [name], kernel_dir=baseline).get_function(name)
        alt.fn.max_dynamic_shared_size_bytes = alt.smem
        sides["dense baseline"] = alt
    outs, reruns = {}, {}
    for side, launch in sides.items():
        for store in (outs, reruns) if side.startswith("dense") else (outs,):
            out = cp.empty_like(qh)
            lse, edges = launch(qh, np.uintp(0), kh, vh, out)
            settle(f"{spec}:{n}:{D} {side}")
            store[side] = (out, lse, int(edges))
    edges = outs["kernel"][2]

    def same_bits(side, ref="kernel"):  # o, lse and the edge count of a side against the kernel's (or ref's)
        alt, ref_out = outs[side], outs[ref]
        return bool((alt[0] == ref_out[0]).all() and (alt[1] == ref_out[1]).all() and alt[2] == ref_out[2])
    fns = {side: (lambda launch=launch: launch(qh, np.uintp(0), kh, vh, o)) for side, launch in sides.items()}
    row = {"mask": spec, "N": n, "D": D, "H": H, "edges_per_head": edges}
    if spec == "causal":
        fns["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = fns["sdpa"]().float()
        got = torch.as_tensor(outs["kernel"][0].reshape(1, H, n, D), device="cuda").float()
        row["max abs diff vs sdpa"] = float((got - ref).abs().max())
    if win:
        row["win same bits"] = same = same_bits("win")
        if not same:
            print(f"FAIL {spec}:{n}:{D} win: output bits differ from the kernel's", flush=True)
        alt = outs["win_kt2"]
        diff = float(cp.abs(alt[0].astype(cp.float32) - outs["kernel"][0].astype(cp.float32)).max())
        row["win_kt2"] = {"max abs diff vs kernel": diff, "edges equal": alt[2] == edges,
                          "max lse diff vs kernel": float(cp.abs(alt[1] - outs["kernel"][1]).max())}
        if spec == "causal":
            got = torch.as_tensor(alt[0].reshape(1, H, n, D), device="cuda").float()
            row["win_kt2"]["max abs diff vs sdpa"] = far = float((got - ref).abs().max())
        if alt[2] != edges or (spec == "causal" and far > 2 * row["max abs diff vs sdpa"] + 1e-3):
            print(f"FAIL {spec}:{n}:{D} win_kt2: {row['win_kt2']}", flush=True)
    if baseline:
        row["baseline same bits"] = same_bits("baseline")
    if "dense baseline" in outs:
        row["dense baseline same bits"] = same = same_bits("dense baseline", "dense")
        if not same:
            print(f"FAIL {spec}:{n}:{D} dense baseline: output bits differ from the dense kernel's", flush=True)
    for side in reruns:
        (out, lse, got), ref = outs[side], outs["kernel"]
        fin = cp.isfinite(ref[1])
        row[side] = check = {"o diff": float(cp.abs(out.astype(cp.float32) - ref[0].astype(cp.float32)).max()),
                             "lse diff": float(cp.abs(cp.where(fin, lse - ref[1], 0)).max()), "edges equal": got == edges,
                             "rows without edges as the kernel's": bool((cp.isfinite(lse) == fin).all()),
                             "NaN": bool(cp.isnan(out).any() or cp.isnan(lse).any()),
                             "rerun same bits": bool((reruns[side][0] == out).all() and (reruns[side][1] == lse).all())}
        if (check["o diff"] > 2e-3 or check["lse diff"] > 1e-3 or not check["edges equal"] or check["NaN"]
                or not check["rows without edges as the kernel's"] or not check["rerun same bits"]):
            print(f"FAIL {spec}:{n}:{D} {side}: {check}", flush=True)
    for s in scheds:
        row[f"sched{s} same bits"] = same = same_bits(f"sched{s}")
        if not same:
            print(f"FAIL {spec}:{n}:{D} sched {s}: output bits differ from sched 0", flush=True)
    for fn in fns.values():
        fn()
    times = {side: [] for side in fns}
    for _ in range(rounds):
        for side, fn in fns.items():
            times[side].append(per_call(fn))
    med = {side: float(np.median(t)) for side, t in times.items()}
    row["ms"] = med
    row["TFLOP/s"] = {side: 4 * edges * D * H / ms * 1e-9 for side, ms in med.items()}
    if "sdpa" in med:
        row["kernel / sdpa"] = med["sdpa"] / med["kernel"]
        if "dense" in med:
            row["dense / sdpa"] = med["sdpa"] / med["dense"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="causal:16384:128,causal:65536:128,causal:16384:64,causal:65536:64,"
                                       "window:256:262144:128", help="MASK:N:D, comma-separated")
    ap.add_argument("--baseline", default="", help="another attend_wgmma.cu or kernels/ (absolute path), timed beside")
    ap.add_argument("--sched", default="", help="SCHED values of attend_fwd_wgmma, comma-separated, timed beside")
    ap.add_argument("--win", action="store_true", help="also time the WIN forms (KT 1 and 2) beside")
    ap.add_argument("--dense", action="store_true", help="also time attend_fwd_dense beside")
    ap.add_argument("--dense-shapes", default="", help="attend_fwd_dense's NWG:STK:STV:QREG, comma-separated, timed beside")
    a = ap.parse_args()
    dense = ((None,) if a.dense else ()) + tuple(
        tuple(int(x) if i < 3 else bool(int(x)) for i, x in enumerate(f.split(":"))) for f in a.dense_shapes.split(",") if f)
    scheds = tuple(int(x) for x in a.sched.split(",") if x.strip())
    if set(scheds) - set(WG_SCHEDS):
        ap.error(f"--sched: the kernel is built with SCHED in {WG_SCHEDS} (beside 0), not {a.sched}")
    if a.baseline and not Path(a.baseline).is_dir():
        loader.SM90A = loader.SM90A + (a.baseline,)
    for c in a.cases.split(","):
        spec, n, D = c.rsplit(":", 2)
        print(json.dumps(case(spec, int(n), int(D), a.baseline, scheds, a.win, dense)), flush=True)


if __name__ == "__main__":
    main()
