"""Command line: builds the parser from the command modules, runs the chosen command, and
turns every error into one line on stderr and an exit status.

Each module of COMMANDS has `add_parser(subparsers)` and `cmd_<name>(args, comm)`; those of
SERIAL run as one plain process without MPI and take `cmd_<name>(args)`."""
import argparse
import os
import sys
import time
import traceback

from .. import __version__
from ..errors import HpcattnError
from . import bench, gen, info, plot, run, sweep, verify
from .launch import check_world

COMMANDS = (gen, run, verify, bench, info, sweep, plot)   # in the order --help lists them
SERIAL = ("sweep", "plot")                                # one plain process, no MPI


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


def _name(module):
    return module.__name__.rsplit(".", 1)[1]


def build_parser():
    p = _Parser(prog="hpcattn", description="Sparse attention over MPI-sharded sequences.")
    p.add_argument("--version", action="version", version=f"hpcattn {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def main(argv=None):
    """Entry point; returns the exit status. Errors known to every rank end the job with
    status 1 everywhere; an error on one rank aborts the whole job (no hang)."""
    args = build_parser().parse_args(argv)
    command = {_name(m): getattr(m, f"cmd_{_name(m)}") for m in COMMANDS}[args.command]
    if args.command in SERIAL:
        try:
            return command(args)
        except HpcattnError as e:
            print(f"hpcattn: error: {e}", file=sys.stderr, flush=True)
            return 1
    from ..dist.comm import Comm
    comm = Comm()
    try:
        check_world(comm.size)
        return command(args, comm)
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
