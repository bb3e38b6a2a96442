"""The Hopper backward's kernels from two or more kernel trees in one process: today's kernels/ and
--baseline DIR, another commit's (`git archive REV kernels | tar -x -C /tmp/base`, DIR =
/tmp/base/kernels; on a GPU machine without git, a copy carried with the checkout); --baseline
repeated times each tree beside today's, its keys suffixed by its DIR. On the same
inputs (jobs/wgmma_bwd_check.py's bench_inputs: MASK:N:D, float16, H = 8, float32 sums): whether
they give the same bits (dk, dv and dq of the two passes, attend_bwd_kv_wg + attend_bwd_q_wg, and
of the ordered one-pass form, and where not, the largest difference over the largest value; the
atomic one-pass form within the two passes' tolerance), then ms per call of each in alternating
rounds (CUDA events over --reps back-to-back calls, medians of --rounds). --bulk adds the
one-pass forms with bulk dq adds into dq tiles, ordered and fixed-point (both checked bit for
bit). The one-pass forms need a baseline with the tscale argument (the fixed-point commit or
later). A FAIL line and exit status 1 where bits differ. A component figure (kernels alone).

    PYTHONPATH=$PWD python3 jobs/bwd_ab.py --baseline /tmp/base/kernels [--cases causal:16384:128,...] [--bulk]
        [--forms fixed,two passes]
"""
import argparse
import json
import sys
from pathlib import Path

import cupy as cp
import numpy as np

from fused_bwd_check import FORMS, Fused, rel_diff, same_bits
from gpu_bench import per_call  # jobs/ is on the path when this runs as a script
from hpcattn.gpu import loader
from hpcattn.gpu.shapes import (BWD_WG_Q_SHAPES, BWD_WG_SHAPES, bwd_fused_name, bwd_wg_name, bwd_wg_q_name,
                                bwd_wg_q_smem, bwd_wg_smem, bwd_wg_threads)
from wgmma_bwd_check import TOL, Kv, Qm, bench_inputs


def sides(kdir, D, bulks=(False,), only=None):
    """{form: callable(args, grads, words, tail, n, H)} built from the kernel tree kdir; the
    one-pass forms with each dq path of bulks (bulk: dq tiles, daf330c's form and later); only:
    the forms (FORMS' names, "two passes") to build, all when None. A tree whose key-major kernels
    take tensor maps (TMA loads, "TmaMaps" in their source) gets them."""
    tma = {src: "TmaMaps" in (Path(kdir) / src).read_text() for src in ("attend_bwd_wgmma.cu", "attend_bwd_fused.cu")}
    keys = [(o, b) for b in bulks for o in (True, False) if only is None or FORMS[o, b] in only]
    forms = {}
    if only is None or "two passes" in only:
        kvs, qs = BWD_WG_SHAPES[D], BWD_WG_Q_SHAPES[D]
        names = bwd_wg_name("__half", D, "float", kvs), bwd_wg_q_name("__half", D, "float", qs)
        wg = loader.build("attend_bwd_wgmma.cu", names, kernel_dir=kdir)
        kv = Kv(wg.get_function(names[0]), 64 * kvs[0], bwd_wg_threads(kvs), bwd_wg_smem(D, kvs),
                "__half" if tma["attend_bwd_wgmma.cu"] else None)
        qk = Qm(wg.get_function(names[1]), 64 * qs[0], bwd_wg_threads(qs), bwd_wg_q_smem(D, qs), flat=True)

        def two(args, g, words, tail, n, H):
            kv(args, g[0], g[1], words, np.uintp(0), tail, n, H)
            qk(args, g[2], g[3], words, tail, n, H)
        forms["two passes"] = two
    if keys:
        fmod = loader.build("attend_bwd_fused.cu", [bwd_fused_name("__half", D, "float", o, bulk=b) for o, b in keys],
                            kernel_dir=kdir)
        fused = {key: Fused(fmod, "__half", D, "float", *key, tma=tma["attend_bwd_fused.cu"]) for key in keys}

        def one(key):
            return lambda args, g, words, tail, n, H: fused[key](args, g[0], g[1], g[2], g[3], words, np.uintp(0),
                                                                 tail, n, n, H, H)
        forms |= {f"one pass, {FORMS[key]}": one(key) for key in keys}
    return forms


def case(spec, trees, rounds, reps):
    """Rows per form of trees["today"]: each other tree's bits against today's, ms per tree."""
    _, n, D, H, _, words, q, k, args, tail = bench_inputs(spec)
    grads = {}
    for tree, forms in trees.items():
        for form, fn in forms.items():
            g = [cp.zeros(k.shape, cp.float32), cp.zeros(k.shape, cp.float32), cp.zeros(q.shape, cp.float32),
                 cp.zeros(1, cp.uint64)]
            fn(args, g, words, tail, n, H)
            grads[tree, form] = g
    rows, ok = [], True
    # each other tree's key suffix (one baseline: the keys of the two-tree form)
    tags = {b: "" if b == "baseline" else f" {b}" for b in trees if b != "today"}
    for form in trees["today"]:
        row, a = {"case": spec, "form": form}, grads["today", form]
        # the atomic form's dq adds land in any order: against today's two passes, where built
        if "atomic" in form and "two passes" in trees["today"]:
            for name, x, ref in zip(("dk", "dv", "dq"), a, grads["today", "two passes"]):
                row[f"{name} rel vs two passes"] = r = rel_diff(x, ref, 0)
                ok = ok and r <= TOL["float16"]
        for b, tag in tags.items():
            y3 = grads[b, form]
            row[f"edges same{tag}"] = same = int(a[3][0]) == int(y3[3][0])
            ok = ok and same
            if "atomic" not in form:
                for name, x, y in zip(("dk", "dv", "dq"), a, y3):
                    row[f"{name} same bits{tag}"] = same = same_bits(x, y)
                    if not same:  # how far: a tree that sums in another order rounds differently
                        row[f"{name} rel{tag}"] = rel_diff(x, y, 0)
                    ok = ok and same
        rows.append(row)
    g = next(iter(grads.values()))  # the timed calls' output buffers
    times = {(tree, form): [] for tree in trees for form in trees["today"]}
    for r in range(rounds):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for tree, form in order:
            fn = trees[tree][form]
            times[tree, form].append(per_call(lambda: fn(args, g, words, tail, n, H), reps))
    for row in rows:
        t = float(np.median(times["today", row["form"]]))
        row["ms today"] = round(t, 4)
        for b, tag in tags.items():
            ms = float(np.median(times[b, row["form"]]))
            row[f"ms {b}"], row[f"speed-up{tag}"] = round(ms, 4), round(ms / t, 3)
    return rows, ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, action="append",
                    help="another commit's kernels/ (a directory); repeated: each timed beside today's")
    ap.add_argument("--cases", default="causal:16384:128,window:256:262144:128,window:256:262144:64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--bulk", action="store_true", help="also the one-pass forms with bulk dq adds (dq tiles)")
    known, bulk_forms = ["two passes", *FORMS.values()], {FORMS[o, True] for o in (True, False)}
    ap.add_argument("--forms", default="", help=f"only these forms, comma-separated ({', '.join(known)}): "
                    "fewer kernels to compile")
    a = ap.parse_args()
    only = set(a.forms.split(",")) if a.forms else None
    if only and only - set(known):
        ap.error(f"--forms: no form {sorted(only - set(known))} (forms: {', '.join(known)})")
    if only and not a.bulk and only & bulk_forms:
        ap.error(f"--forms: the bulk forms ({', '.join(sorted(only & bulk_forms))}) need --bulk")
    failed = False
    for spec in a.cases.split(","):
        D = int(spec.rsplit(":", 1)[1])
        bulks = (False, True) if a.bulk else (False,)
        names = ["baseline"] if len(a.baseline) == 1 else a.baseline
        trees = {"today": sides(loader.KERNEL_DIR, D, bulks, only)} | {
            name: sides(kdir, D, bulks, only) for name, kdir in zip(names, a.baseline)}
        rows, ok = case(spec, trees, a.rounds, a.reps)
        for row in rows:
            print(("" if ok else "FAIL ") + json.dumps(row), flush=True)
        failed = failed or not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
