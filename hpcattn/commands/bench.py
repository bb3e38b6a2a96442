"""`hpcattn bench`: time the local kernel on generated data, and its peers in the same run.

Peers (the `bench` extra, PyTorch CPU): FlexAttention (torch.compile'd `flex_attention`, block
mask from `create_block_mask(..., _compile=True)`) and SDPA with a dense boolean mask. Every
result is checked against float64 on sampled rows (ours) or against ours (peers). Useful
FLOPs = 4 * edges * D; only ratios measured in one run mean anything on a shared machine.
"""
import json
import math
import resource
import time

import numpy as np

from ..cpu import cgather, local
from ..errors import HpcattnError
from ..io.h5io import FILE_DTYPES, file_dtype
from ..masks import check_csr, parse
from .info import blas_name
from .launch import on_root

SDPA_BYTES = 6 << 30  # dense mask + scores + probabilities SDPA would hold (about 9 N^2 bytes)
CHECK_ROWS = 64


def peak_rss_gib():
    """Peak resident memory of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sgemm_gflops(n=4096, repeat=2):
    """The machine's float32 GEMM rate now (numpy's BLAS, all its threads), best of `repeat`."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = min(_timed(lambda: a @ a)[1] for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def make_inputs(n, d, dtype, seed):
    """q, k, v in the kernel's head-major layout (1, 1, 1, n, d) / (1, 1, n, d), filled in chunks."""
    rng = np.random.default_rng(seed)
    arrays = [np.empty((1, 1, 1, n, d), dtype=file_dtype(dtype)) for _ in range(3)]
    step = max(1, (1 << 22) // d)
    for a in arrays:
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            a[0, 0, 0, r0:r1] = rng.standard_normal((r1 - r0, d), dtype=np.float32)
    q, k, v = arrays
    return q, k[:, :, 0], v[:, :, 0]


def bench_mask(spec, n):
    """(mask for our kernel, seconds to build explicit edges or None). A spec with a csr term
    times the csr path on the edges of its other terms (like `gen`), e.g. random:328+csr."""
    mask = parse(spec, n_keys=n)
    if "csr" not in mask.needs:
        return mask, None
    from .gen import csr_source
    other = csr_source(spec, n)
    (indptr, indices), t = _timed(lambda: other.columns(np.arange(n), 0, n))
    return parse("csr", csr=check_csr(indptr, indices, n, 0, n)), t


def check_ours(qrows, k, v, mask, scale, o, lse, rows):
    """Max relative error of o over the sampled rows (query vectors qrows) against float64
    over each row's columns."""
    n = k.shape[2]
    indptr, cols = mask.columns(rows, 0, n)
    err, ref_max = 0.0, 1e-30
    for r, i in enumerate(rows):
        c = cols[indptr[r]:indptr[r + 1]]
        if len(c) == 0:
            if not (np.isneginf(lse[0, 0, 0, i]) and not o[0, 0, 0, i].any()):
                return float("inf")
            continue
        s = scale * (k[0, 0, c].astype(np.float64) @ qrows[r].astype(np.float64))
        p = np.exp(s - s.max())
        want = p @ v[0, 0, c].astype(np.float64) / p.sum()
        err = max(err, float(np.abs(o[0, 0, 0, i] - want).max()))
        ref_max = max(ref_max, float(np.abs(want).max()))
    return err / ref_max


def _mask_mod(mask, n, torch):
    """A FlexAttention mask_mod for the mask (None if a term has no closed form, i.e. csr)."""
    parts = [t.flex_mod(torch, n) for t in mask.terms]  # each term's edges (masks.Term.flex_mod)
    if None in parts:
        return None

    def mask_mod(b, h, qi, kj):
        out = parts[0](qi, kj)
        for p in parts[1:]:
            out = out | p(qi, kj)
        return out & (kj <= qi) if mask.causal else out
    return mask_mod


def _flex(torch, q, k, v, mask, n, scale):
    """(setup, call): Flex's block mask built and its kernel compiled (setup: build_s,
    first_call_s, o), then `call` runs it once more."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    mod = _mask_mod(mask, n, torch)
    if mod is None:
        return {"note": "no closed-form mask_mod (csr): skipped"}, None
    bm, t_build = _timed(lambda: create_block_mask(mod, 1, 1, n, n, device="cpu", _compile=True))
    fn = torch.compile(flex_attention)

    def call():
        with torch.no_grad():
            return fn(q, k, v, block_mask=bm, scale=scale)
    out, t_first = _timed(call)
    return {"build_s": t_build, "first_call_s": t_first, "o": out}, call


def _sdpa(torch, q, k, v, mask, n, scale):
    """(setup, call) as for _flex: SDPA with a dense boolean mask."""
    need = 9 * n * n
    if need > SDPA_BYTES:
        return {"note": f"skipped: a dense mask and scores need ~{need / 2**30:.0f} GiB"}, None

    def build():
        dense = torch.empty((n, n), dtype=torch.bool)
        step = max(1, (1 << 24) // n)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            dense[r0:r1] = torch.from_numpy(mask.allowed(np.arange(r0, r1)[:, None], np.arange(n)[None, :]))
        return dense
    dense, t_build = _timed(build)

    def call():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
    return {"build_s": t_build, "o": call()}, call


def bench(seqs, specs, vs=(), head_dim=64, dtype="float32", repeat=3, sgemm=False, seed=0,
          in_place=False):
    """Rows of results (dicts) for every (N, spec): ours first, then each peer in `vs`.

    After a first (warm-up) call of each, ours and the peers run in `repeat` alternating
    rounds (ours, then each peer), so every side meets the same load; each row reports its
    best round, and ratios are peer best / ours best."""
    if in_place and vs:
        raise HpcattnError("--in-place overwrites the inputs: it cannot run with --vs")
    rows = []
    torch = None
    if vs:
        try:
            import torch
        except ImportError:
            raise HpcattnError("--vs needs PyTorch: pip install -e '.[bench]'") from None
    if sgemm:
        rows.append({"impl": "sgemm", "seq": 4096, "mask": "dense 4096^3", "gflops": sgemm_gflops()})
        sgemm = rows[-1]
    for n in seqs:
        q, k, v = make_inputs(n, head_dim, dtype, seed)
        scale = 1 / math.sqrt(head_dim)
        for spec in specs:
            mask, t_edges = bench_mask(spec, n)
            pos = np.arange(n)
            sample = np.unique(np.concatenate([[0, n - 1], np.random.default_rng(1).integers(0, n, CHECK_ROWS)]))
            qrows = q[0, 0, 0, sample].copy()
            # in place: o overwrites q (each row chunk is read before it is written), so the
            # inputs are all the memory a run needs; then only the first run can be timed
            out = q if in_place else np.empty_like(q) if q.dtype != np.float32 else None

            def ours():
                return local.attend(q, pos, k, v, 0, mask, scale, out=out)
            (o, lse, edges), first = _timed(ours)
            ours_row = {"impl": "hpcattn", "seq": n, "mask": spec, "edges": int(edges), "ratio": 1.0,
                        "max_err": check_ours(qrows, k, v, mask, scale, o, lse, sample),
                        "threads": local.threads(), "dtype": dtype, "blas": blas_name(),
                        "gather": cgather.describe(head_dim)}
            if t_edges is not None:
                ours_row["build_s"] = t_edges
            peers = []
            if vs:
                tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.reshape(1, 1, n, head_dim)).astype(np.float32))
                              for x in (q, k, v))
                for peer in vs:
                    setup, call = (_flex if peer == "flex" else _sdpa)(torch, tq, tk, tv, mask, n, scale)
                    peers.append(({"impl": peer, "seq": n, "mask": spec,
                                   **{k_: v_ for k_, v_ in setup.items() if k_ != "o"}}, setup.get("o"), call, []))
            times = [first] if in_place or not repeat else []
            for _ in range(0 if in_place else repeat):
                times.append(_timed(ours)[1])
                for _, _, call, peer_times in peers:
                    if call is not None:
                        peer_times.append(_timed(call)[1])
            t = min(times)
            ours_row.update(time_s=t, gflops=4 * edges * head_dim / t / 1e9, runs=len(times),
                            peak_rss_gib=peak_rss_gib())
            rows.append(ours_row)
            o_ours = o.reshape(n, head_dim).astype(np.float32)
            for row, po, call, peer_times in peers:
                if call is not None:
                    row.update(time_s=min(peer_times), gflops=4 * edges * head_dim / min(peer_times) / 1e9)
                    row.update(ratio=row["time_s"] / t, ratio_with_build=(row["time_s"] + row["build_s"]) / t)
                    po = po.reshape(n, head_dim).numpy()
                    fin = np.isfinite(po).all(axis=1)
                    row["max_err"] = float(np.abs(po[fin] - o_ours[fin]).max() / np.abs(o_ours).max())
                rows.append(row)
    if sgemm:  # measured again after the cases: the best rate meets the same load as ours
        sgemm["gflops"] = max(sgemm["gflops"], sgemm_gflops())
    return rows


def table(rows):
    """A table for people: times, useful GFLOP/s, and peer/ours ratios (> 1: ours faster)."""
    head = f"{'impl':<8} {'seq':>10} {'mask':<30} {'time s':>9} {'GFLOP/s':>8} {'peer/ours':>9} " \
           f"{'build s':>8} {'(peer+build)/ours':>17} {'max err':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if key in r else "-".rjust(int(fmt.split(".")[0]))
        note = r.get("note", "")
        if r["impl"] == "hpcattn":
            note = (f"edges {r['edges']:,}, peak RSS {r['peak_rss_gib']:.2f} GiB, {r['threads']} threads, "
                    f"{r['dtype']}, BLAS {r['blas']}, gather {r['gather']}")
        elif "first_call_s" in r:
            note = f"first (compiling) call {r['first_call_s']:.1f} s; build includes compile"
        lines.append(f"{r['impl']:<8} {r['seq']:>10,} {r['mask'][:30]:<30} {f('time_s', '9.4f')} "
                     f"{f('gflops', '8.1f')} {f('ratio', '9.2f')} {f('build_s', '8.2f')} "
                     f"{f('ratio_with_build', '17.1f')} {f('max_err', '8.1e')}  {note}")
    sg = [r["gflops"] for r in rows if r["impl"] == "sgemm"]
    if sg:
        for r in rows:
            if r["impl"] == "hpcattn":
                lines.append(f"{r['mask']} N={r['seq']:,}: {100 * r['gflops'] / sg[0]:.0f}% of SGEMM "
                             f"({sg[0]:.1f} GFLOP/s measured in this run)")
    return "\n".join(lines)


def add_parser(sub):
    b = sub.add_parser("bench", help="time the local kernel (and peers) on generated data")
    b.add_argument("--seq", type=int, nargs="+", default=[65536], help="sequence lengths N")
    b.add_argument("--mask", nargs="+", default=["window:256"], help="mask specs (csr: edges of "
                   "the other terms, e.g. random:328+csr)")
    b.add_argument("--vs", action="append", choices=["flex", "sdpa"], default=[],
                   help="peer to time in the same run (repeatable; needs the bench extra)")
    b.add_argument("--head-dim", type=int, default=64)
    b.add_argument("--dtype", default="float32", choices=FILE_DTYPES)
    b.add_argument("--repeat", type=int, default=3, help="timed rounds per case after a first "
                   "call of each (ours and each peer alternate; the best round is reported; 0: "
                   "the first call only)")
    b.add_argument("--sgemm", action="store_true", help="also measure the SGEMM rate (4096^3)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--in-place", action="store_true", help="write o over q (longest context: "
                   "inputs are all the memory; one timed run)")
    b.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    return b


def cmd_bench(args, comm):
    for n in args.seq:
        if n < 1:
            raise HpcattnError(f"--seq must be >= 1, got {n}", collective=True)
    rows = on_root(comm, bench, args.seq, args.mask, args.vs, args.head_dim, args.dtype,
                   args.repeat, args.sgemm, args.seed, args.in_place)
    if comm.rank == 0:
        print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0
