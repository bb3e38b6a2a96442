"""`hpcattn plot`: PNG figures from sweep/benchmark results, and a picture of a mask.

    hpcattn plot RESULTS.json... -o FIG.png      # panels the records support:
        time vs ranks and parallel efficiency vs ranks (per job/variant/mask/seq series),
        bytes sent per rank by variant, useful GFLOP/s vs sequence length
    hpcattn plot --mask SPEC --seq N -o mask.png # block density of a mask (fraction of allowed
                                                  # (query, key) pairs per block)

Results files are `hpcattn sweep` JSON ({"records": [...]}) or a bare JSON list of records;
a record needs `ranks` and `wall_s` (scaling), `variant` and `bytes_sent` (traffic), `seq` and
`useful_gflops` (throughput). Figures are --width x --height pixels exactly (default 1600x1000).
"""
import json
from collections import defaultdict

import numpy as np

from ..errors import HpcattnError

DPI = 100


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise HpcattnError("hpcattn plot needs matplotlib: pip install 'hpcattn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def load_records(paths):
    """All records of the given results files, in order."""
    records = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise HpcattnError(f"results file {path!r} does not exist") from None
        except (OSError, ValueError) as e:
            raise HpcattnError(f"results file {path!r} is not JSON: {e}") from None
        recs = data.get("records") if isinstance(data, dict) else data
        if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
            raise HpcattnError(f"results file {path!r} holds no list of records")
        records += recs
    if not records:
        raise HpcattnError("no records in the results files")
    return records


def _has(records, *keys):
    return [r for r in records if all(isinstance(r.get(k), (int, float)) or
                                      (k in ("variant", "mask") and k in r) for k in keys)]


def _series(records, key):
    """Group records by `key` (a function), each group's (x -> mean y) later."""
    groups = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return groups


def _mean_by(rs, x, y):
    """Sorted x values and the mean of y over records sharing an x (repeats)."""
    acc = defaultdict(list)
    for r in rs:
        acc[r[x]].append(r[y])
    xs = sorted(acc)
    return np.array(xs, dtype=float), np.array([np.mean(acc[v]) for v in xs])


def scaling_panels(ax_time, ax_eff, records):
    """Time and parallel efficiency vs ranks; strong: T1*P1/(T*P), weak: T1/T."""
    groups = _series(records, lambda r: (r.get("job", ""), r.get("scaling", "strong"), r.get("variant", ""),
                                         r.get("mask", ""), r["seq"] if r.get("scaling") != "weak"
                                         else round(r["seq"] / r["ranks"])))
    for (job, scaling, variant, mask, n), rs in sorted(groups.items(), key=str):
        p, t = _mean_by(rs, "ranks", "wall_s")
        label = f"{job} {variant} {mask} {'N' if scaling == 'strong' else 'N/rank'}={n}".strip()
        ax_time.plot(p, t, "o-", label=label)
        eff = t[0] * p[0] / (t * p) if scaling == "strong" else t[0] / t
        ax_eff.plot(p, eff, "o-", label=f"{label} ({scaling})")
    ax_time.set(xlabel="ranks", ylabel="wall time of slowest rank [s]", title="time vs ranks",
                xscale="log", yscale="log")
    ax_eff.set(xlabel="ranks", ylabel="parallel efficiency", title="parallel efficiency vs ranks",
               xscale="log", ylim=(0, 1.2))
    ax_eff.axhline(1.0, color="grey", lw=0.5)
    ticks = sorted({int(r["ranks"]) for r in records})
    for ax in (ax_time, ax_eff):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize="small")


def bytes_panel(ax, records):
    """Largest bytes sent per rank, grouped bars: one group per rank count, one bar per variant."""
    variants = sorted({str(r["variant"]) for r in records})
    ranks = sorted({int(r["ranks"]) for r in records})
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        vals = [np.mean([r["bytes_sent"] for r in records if r["variant"] == v and r["ranks"] == p] or [0])
                for p in ranks]
        ax.bar(np.arange(len(ranks)) + i * width, np.array(vals) / 2**20, width, label=v)
    ax.set_xticks(np.arange(len(ranks)) + 0.4 - width / 2, [str(p) for p in ranks])
    ax.set(xlabel="ranks", ylabel="MiB sent (largest rank)", title="bytes per rank by variant")
    ax.legend(fontsize="small")


def gflops_panel(ax, records):
    """Useful GFLOP/s (4 * edges * D per second) vs sequence length, one line per
    (variant, mask, ranks)."""
    groups = _series(records, lambda r: (r.get("variant", ""), r.get("mask", ""), r.get("ranks", 1)))
    for (variant, mask, ranks), rs in sorted(groups.items(), key=str):
        n, g = _mean_by(rs, "seq", "useful_gflops")
        ax.plot(n, g, "o-", label=f"{variant} {mask} P={ranks}")
    ax.set(xlabel="sequence length N", ylabel="useful GFLOP/s", title="useful GFLOP/s vs sequence length",
           xscale="log")
    ax.legend(fontsize="small")


def plot_results(paths, out, width=1600, height=1000):
    """Write a PNG with every panel the records support; returns the panel titles."""
    records = load_records(paths)
    scal = _has(records, "ranks", "wall_s", "seq")
    traffic = _has(records, "ranks", "bytes_sent", "variant")
    thr = _has(records, "seq", "useful_gflops")
    panels = []
    if len({r["ranks"] for r in scal}) > 1:
        panels += [("time", scal), ("eff", scal)]
    if traffic and len({r["ranks"] for r in traffic}) * len({r["variant"] for r in traffic}) > 1:
        panels.append(("bytes", traffic))
    if len({r["seq"] for r in thr}) > 1:
        panels.append(("gflops", thr))
    if not panels:   # one point: still a useful picture of what was measured
        panels = [("bytes", traffic)] if traffic else [("gflops", thr)] if thr else []
    if not panels:
        raise HpcattnError("the records hold none of ranks/wall_s/seq, bytes_sent/variant, "
                           "seq/useful_gflops: nothing to plot")
    plt = _pyplot()
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    flat = list(axes.flat)
    i = 0
    while i < len(panels):
        kind, rs = panels[i]
        if kind == "time":
            scaling_panels(flat[i], flat[i + 1], rs)
            i += 2
            continue
        (bytes_panel if kind == "bytes" else gflops_panel)(flat[i], rs)
        i += 1
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    _save(fig, out, plt)
    return [ax.get_title() for ax in flat[:len(panels)]]


def block_density(mask, n, blocks=256, rows_per_block=4, max_cols=1 << 16):
    """(blocks x blocks) fraction of allowed pairs per block of an n x n mask (query positions
    0..n-1). Each query block is sampled by `rows_per_block` evenly spaced rows; each row is
    evaluated only inside its spans (`Mask.spans`), at a stride keeping it under max_cols."""
    nb = max(1, min(blocks, n))
    edges = np.linspace(0, n, nb + 1).astype(np.int64)
    counts = np.zeros((nb, nb))
    for b in range(nb):
        lo, hi = edges[b], edges[b + 1]
        rows = np.unique(np.linspace(lo, hi - 1, min(rows_per_block, hi - lo)).round().astype(np.int64))
        for i in rows:
            spans = mask.spans(int(i), int(i), 0, n)
            total = sum(b1 - a1 for a1, b1 in spans)
            if not total:
                continue
            stride = max(1, -(-total // max_cols))
            cols = np.concatenate([np.arange(a1, b1, stride) for a1, b1 in spans])
            hit = cols[mask.allowed(np.int64(i), cols)]
            counts[b] += np.bincount(np.searchsorted(edges, hit, side="right") - 1,
                                     minlength=nb)[:nb] * stride / len(rows)
    return np.clip(counts / np.diff(edges)[None, :], 0, 1), edges   # mean row count / block width


def plot_mask(spec, n, out, width=1000, height=1000, blocks=256):
    """Write a PNG of the mask's block density; returns the density grid."""
    from ..masks import parse
    mask = parse(spec)
    if n < 1:
        raise HpcattnError(f"--seq must be at least 1, got {n}")
    if any(type(t).__name__.lower() == "csr" for t in getattr(mask, "terms", ())):
        raise HpcattnError("a csr mask lives in an input file; plot a spec of implicit terms")
    dens, edges = block_density(mask, n, blocks)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width / DPI, height / DPI), dpi=DPI)
    shown = np.where(dens > 0, dens, np.nan)
    im = ax.imshow(shown, cmap="viridis", origin="upper", extent=(0, n, n, 0), interpolation="nearest",
                   vmin=0, vmax=1)
    ax.set_facecolor("white")
    ax.set(xlabel="key position j", ylabel="query position i",
           title=f"{spec}, N={n}: {dens.mean():.3%} of pairs allowed ({len(edges) - 1}² blocks)")
    fig.colorbar(im, ax=ax, label="block density (white: empty)")
    fig.tight_layout()
    _save(fig, out, plt)
    return dens


def _save(fig, out, plt):
    try:
        fig.savefig(out, dpi=DPI)
    except OSError as e:
        raise HpcattnError(f"cannot write figure {out!r}: {e}") from None
    finally:
        plt.close(fig)


def add_parser(sub):
    p = sub.add_parser("plot", help="PNG figures from sweep/benchmark results, or of a mask")
    p.add_argument("results", nargs="*", metavar="RESULTS.json")
    p.add_argument("-o", "--output", required=True, metavar="FIG.png")
    p.add_argument("--mask", metavar="SPEC", help="draw this mask's block density instead")
    p.add_argument("--seq", type=int, help="sequence length for --mask")
    p.add_argument("--width", type=int, help="pixels (default 1600, 1000 for --mask)")
    p.add_argument("--height", type=int, help="pixels (default 1000)")
    return p


def cmd_plot(args):
    if args.mask:
        if args.results or not args.seq:
            raise HpcattnError("plot --mask SPEC takes --seq N and no results files")
        dens = plot_mask(args.mask, args.seq, args.output, args.width or 1000, args.height or 1000)
        print(f"hpcattn plot: {args.output}: mask {args.mask} at N={args.seq}, "
              f"{dens.mean():.3%} of pairs allowed")
        return 0
    if not args.results:
        raise HpcattnError("plot needs RESULTS.json files (or --mask SPEC --seq N)")
    titles = plot_results(args.results, args.output, args.width or 1600, args.height or 1000)
    print(f"hpcattn plot: {args.output}: {', '.join(titles)}")
    return 0
