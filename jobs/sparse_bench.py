"""Sparse-variant benchmark: bytes per rank of `sparse` vs `ring` on bounded masks.

Writes one self-attention input (`hpcattn gen --seq N`), runs `hpcattn run --variant
sparse|ring` for each mask at P ranks, and reads the per-rank stats back from the output. For
each rank it also counts, straight from the mask definition (not from the planner), the key
rows that rank's query rows reach outside its own shard: the least any exchange could move.

  python jobs/sparse_bench.py --dir /tmp/sp --seq 1048576 --ranks 4 \
      --masks window:256,window:256+global:16

Only ratios measured in the same run mean anything on a shared, oversubscribed machine.
"""
import argparse
import os
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from decode_bench import hpcattn  # noqa: E402
import tables  # noqa: E402

from hpcattn.masks import Global, Window, parse  # noqa: E402
from hpcattn.partition import even_offsets  # noqa: E402


def rows_reached(spec, n, P):
    """Per rank: keys outside its shard that its query rows reach, for window(+global) masks
    on contiguous shards (rows i < G of a global term reach everything: counted as such)."""
    mask = parse(spec)
    w = max((t.w for t in mask.terms if isinstance(t, Window)), default=0)
    g = max((t.g for t in mask.terms if isinstance(t, Global)), default=0)
    assert all(isinstance(t, (Window, Global)) for t in mask.terms) and not mask.causal
    off = even_offsets(n, P)
    out = []
    for r in range(P):
        a, b = int(off[r]), int(off[r + 1])
        if a < g:  # a global query row reaches every key
            out.append(n - (b - a))
            continue
        need = np.zeros(n, dtype=bool)
        need[max(0, a - w):min(n, b + w)] = True
        need[:g] = True
        need[a:b] = False
        out.append(int(need.sum()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--seq", type=int, default=1 << 20)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--masks", default="window:256,window:256+global:16")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--json")
    a = p.parse_args(argv)
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    inp = d / f"self_{a.seq}.h5"
    if not inp.exists():
        hpcattn(0, "gen", inp, "--seq", a.seq, "--head-dim", a.head_dim, "--seed", 2)
    row_bytes = 2 * a.head_dim * 4  # one key row and one value row, one kv head, float32
    results = []
    for spec in a.masks.split(","):
        got = {}
        for variant in ("sparse", "ring"):
            out = d / "out.h5"
            hpcattn(a.ranks, "run", inp, out, "--mask", spec, "--variant", variant)
            with h5py.File(out, "r") as f:
                s = {k: f["stats"][k][...] for k in f["stats"]}
            os.remove(out)
            got[variant] = s
            print(variant, spec, {k: v.tolist() for k, v in s.items()}, file=sys.stderr, flush=True)
        reached = rows_reached(spec, a.seq, a.ranks)
        sp, ring = got["sparse"], got["ring"]
        results.append({"mask": spec, "N": a.seq, "P": a.ranks, "reached_rows": reached,
                        **{f"{v}_{k}": got[v][k].tolist() for v in got for k in ("bytes_received", "bytes_sent", "attn_s")}})
        print(f"\n`{spec}`, N = {a.seq:,}, P = {a.ranks}: max per-rank bytes received sparse "
              f"{sp['bytes_received'].max():,} vs ring {ring['bytes_received'].max():,} "
              f"({100 * sp['bytes_received'].max() / ring['bytes_received'].max():.3f}%); "
              f"slowest rank's attn_s sparse {sp['attn_s'].max():.2f} s, ring {ring['attn_s'].max():.2f} s\n")
        tables.header("rank", "sparse bytes recv", "sparse bytes sent", "ring bytes recv", "sparse / ring",
               "rows reached outside shard (exact)", "their bytes", "sparse recv / that")
        for r in range(a.ranks):
            need = reached[r] * row_bytes
            tables.row(r, f"{sp['bytes_received'][r]:,}", f"{sp['bytes_sent'][r]:,}", f"{ring['bytes_received'][r]:,}",
                f"{100 * sp['bytes_received'][r] / ring['bytes_received'][r]:.3f}%", f"{reached[r]:,}", f"{need:,}",
                f"{sp['bytes_received'][r] / need if need else float('nan'):.3f}")
    tables.save_json(a.json, results)


if __name__ == "__main__":
    main()
