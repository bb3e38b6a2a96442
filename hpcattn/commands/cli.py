"""Command line: parses arguments and calls the API; every error is one line on stderr."""
import argparse
import os
import sys
import time
import traceback

from .. import __version__, profile
from ..errors import HpcattnError
from ..io.h5io import FILE_DTYPES
from . import plot, sweep
from .launch import check_world


def _launcher_rank():
    """This process's rank as the launcher tells it, without initialising MPI."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        if _launcher_rank() == 0:
            self.print_usage(sys.stderr)
            print(f"hpcattn: error: {message}", file=sys.stderr, flush=True)
        else:  # every rank fails alike; let rank 0 print before the launcher ends the job
            time.sleep(2)
        raise SystemExit(2)


def build_parser():
    p = _Parser(prog="hpcattn", description="Sparse attention over MPI-sharded sequences.")
    p.add_argument("--version", action="version", version=f"hpcattn {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("gen", help="write a random input file")
    g.add_argument("path")
    g.add_argument("--seq", type=int, required=True, help="keys N")
    g.add_argument("--queries", type=int, help="query rows (default N; fewer = decode at the end)")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--heads", type=int, default=1)
    g.add_argument("--kv-heads", type=int, help="default: --heads")
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--dtype", default="float32", choices=FILE_DTYPES)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backward", action="store_true", help="also write do")
    g.add_argument("--mask", help="mask spec (recorded; csr terms write an explicit mask)")

    r = sub.add_parser("run", help="compute attention (run under mpiexec/srun for P ranks)")
    r.add_argument("input")
    r.add_argument("output")
    r.add_argument("--mask", required=True, help="mask spec, e.g. causal+window:256")
    r.add_argument("--variant", default="auto", choices=["auto", "ring", "burst", "tree", "sparse"])
    r.add_argument("--backward", action="store_true")
    r.add_argument("--ranks-per-node", type=int)
    r.add_argument("--transport", default="auto", choices=["auto", "mpi", "host", "nccl"])
    r.add_argument("--profile", metavar="TRACE.json")
    r.add_argument("--max-memory", metavar="BYTES", type=_bytes,
                   help="memory per rank (e.g. 8G); a shard larger than this streams out of core")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted out-of-core run from OUT.h5.partial")
    r.add_argument("--compress", choices=["gzip", "lzf"], help="compress o and lse chunks")

    v = sub.add_parser("verify", help="compare a result with the float64 reference")
    v.add_argument("input")
    v.add_argument("output")
    v.add_argument("--rows", type=int, help="check K sampled rows (default: all rows when "
                   "Nq*N <= 2^30, else 2048 sampled)")

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

    sub.add_parser("info", help="backend, MPI, CUDA-awareness, parallel HDF5, GPUs")
    sweep.add_parser(sub)
    plot.add_parser(sub)
    return p


def _bytes(text):
    """'8G', '512M', '1000000' -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().rstrip("IB") or "0"
    try:
        val = float(t[:-1]) * units[t[-1]] if t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 8G, 512M)") from None
    if val <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return int(val)


def cmd_gen(args, comm):
    from .gen import generate
    on_root(comm, generate, args.path, args.seq, args.queries, args.batch, args.heads, args.kv_heads,
            args.head_dim, args.dtype, args.seed, args.backward, args.mask)
    return 0


def cmd_run(args, comm):
    from .run import run, summary
    from ..dist.variants import VARIANTS
    unsupported = [(flag, val) for flag, val, ok in (
        ("--variant", args.variant, args.variant == "auto" or args.variant in VARIANTS),
        ) if not ok]
    if unsupported:
        flag, val = unsupported[0]
        raise HpcattnError(f"{flag} {val} is not available in hpcattn {__version__} yet", collective=True)
    profile.enable(bool(args.profile))
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        raise HpcattnError(f"--ranks-per-node must be >= 1, got {args.ranks_per_node}", collective=True)
    per_rank, attrs = run(args.input, args.output, args.mask, comm, args.variant, args.backward,
                          args.ranks_per_node, args.transport, args.max_memory,
                          args.resume, args.compress)
    if comm.rank == 0:
        print(summary(per_rank, attrs))
    if args.profile:
        profile.write_trace(comm, args.profile)
    return 0


def cmd_verify(args, comm):
    from .verify import verify
    rep = on_root(comm, verify, args.input, args.output, args.rows)
    if comm.rank == 0:
        print(f"hpcattn verify: {rep['rows']} of {rep['of']} rows against float64: "
              f"o max rel err {rep['o_err']:.2e} (tol {rep['o_tol']:.0e}), "
              f"lse max rel err {rep['lse_err']:.2e} (tol {rep['lse_tol']:.0e}), "
              f"empty rows {'ok' if rep['empty_rows_ok'] else 'WRONG'}"
              + (f", dq/dk/dv max rel err {rep['grad_err']:.2e} (tol {rep['grad_tol']:.0e})"
                 if "grad_err" in rep else "")
              + f": {'PASS' if rep['passed'] else 'FAIL'}")
    return 0 if rep["passed"] else 1


def cmd_bench(args, comm):
    import json
    from .bench import bench, table
    for n in args.seq:
        if n < 1:
            raise HpcattnError(f"--seq must be >= 1, got {n}", collective=True)
    rows = on_root(comm, bench, args.seq, args.mask, args.vs, args.head_dim, args.dtype,
                   args.repeat, args.sgemm, args.seed, args.in_place)
    if comm.rank == 0:
        print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


def cmd_info(args, comm):
    from .info import report
    rep = report()
    if comm.rank == 0:
        for key, val in rep.items():
            print(f"{key:>15}: {val}")
        print(f"{'ranks':>15}: {comm.size}")
    return 0


def on_root(comm, fn, *args):
    """Run a serial command on rank 0 only; every rank gets its result or its error."""
    result, problem = None, None
    if comm.rank == 0:
        try:
            result = fn(*args)
        except HpcattnError as e:
            problem = str(e)
        except (OSError, KeyError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
    result, problem = comm.bcast_object((result, problem))
    if problem:
        raise HpcattnError(problem, collective=True)
    return result


COMMANDS = {"gen": cmd_gen, "run": cmd_run, "verify": cmd_verify, "bench": cmd_bench,
            "info": cmd_info}
SERIAL = {"sweep": sweep.cmd_sweep, "plot": plot.cmd_plot}   # one plain process, no MPI


def main(argv=None):
    """Entry point; returns the exit status. Errors known to every rank end the job with
    status 1 everywhere; an error on one rank aborts the whole job (no hang)."""
    args = build_parser().parse_args(argv)
    if args.command in SERIAL:
        try:
            return SERIAL[args.command](args)
        except HpcattnError as e:
            print(f"hpcattn: error: {e}", file=sys.stderr, flush=True)
            return 1
    from ..dist.comm import Comm
    comm = Comm()
    try:
        check_world(comm.size)
        return COMMANDS[args.command](args, comm)
    except HpcattnError as e:
        if e.collective and comm.rank == 0 or comm.size == 1:
            print(f"hpcattn: error: {e}", file=sys.stderr, flush=True)
        if not e.collective and comm.size > 1:
            print(f"hpcattn: error: rank {comm.rank}: {e}", file=sys.stderr, flush=True)
            comm.abort(1)
        return 1
    except Exception as e:
        traceback.print_exc()
        print(f"hpcattn: internal error on rank {comm.rank}: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        if comm.size > 1:
            comm.abort(1)
        return 1
