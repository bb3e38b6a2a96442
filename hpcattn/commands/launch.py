"""Launching hpcattn on P ranks (srun or mpiexec) and checking that a launch really made one
MPI job of P ranks, not P singletons.

A launcher that does not speak the MPI library's wire-up (e.g. `srun --mpi=none` or a PMI the
library lacks) starts P processes that each see a world of one rank and would each compute the
whole problem. Setting HPCATTN_EXPECT_RANKS (the batch scripts set it to the task count) makes
every command check the world size right after MPI init and fail with a clear message.
"""
import os
import shlex
import shutil
import sys
from pathlib import Path

from ..errors import HpcattnError

EXPECT = "HPCATTN_EXPECT_RANKS"
LAUNCHERS = ("auto", "srun", "mpiexec")


def expected_ranks(env=os.environ):
    """The rank count HPCATTN_EXPECT_RANKS asks for, or None when unset/empty."""
    val = env.get(EXPECT, "").strip()
    if not val:
        return None
    if not val.isdigit() or int(val) < 1:
        raise HpcattnError(f"{EXPECT}={val!r} is not a positive integer")
    return int(val)


def check_world(size, env=os.environ):
    """Raise HpcattnError (collective: every rank sees the same sizes) when the MPI world size
    differs from HPCATTN_EXPECT_RANKS."""
    want = expected_ranks(env)
    if want is not None and size != want:
        hint = (" (P separate singletons: the launcher did not wire up MPI; with SLURM use "
                "`srun --mpi=pmix`, or `mpiexec` from the same MPI as mpi4py)") if size == 1 else ""
        raise HpcattnError(f"MPI world has {size} rank(s) but {EXPECT}={want}{hint}",
                           collective=True)


def detect():
    """'srun' inside a SLURM allocation with srun on PATH, else 'mpiexec'."""
    return "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "mpiexec"


def mpiexec_path():
    """The mpiexec beside this Python (the pip Open MPI in a venv), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def command(launcher, ranks, args):
    """argv that runs `python -m hpcattn ARGS` on `ranks` ranks.

    srun: `srun --mpi=pmix --ntasks=P --kill-on-bad-exit=1` plus $HPCATTN_SRUN_FLAGS.
    mpiexec: `mpiexec -n P --bind-to none` plus $HPCATTN_MPIEXEC_FLAGS (no binding: inside a
    SLURM allocation Open MPI would otherwise refuse to bind more ranks than allocated cores).
    """
    if launcher == "auto":
        launcher = detect()
    if launcher == "srun":
        pre = ["srun", "--mpi=" + os.environ.get("HPCATTN_SRUN_MPI", "pmix"), f"--ntasks={ranks}",
               "--kill-on-bad-exit=1", *shlex.split(os.environ.get("HPCATTN_SRUN_FLAGS", ""))]
    elif launcher == "mpiexec":
        pre = [mpiexec_path(), "-n", str(ranks), "--bind-to", "none",
               *shlex.split(os.environ.get("HPCATTN_MPIEXEC_FLAGS", ""))]
    else:
        raise HpcattnError(f"unknown launcher {launcher!r}; use one of {', '.join(LAUNCHERS)}")
    return [*pre, sys.executable, "-m", "hpcattn", *map(str, args)]


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
