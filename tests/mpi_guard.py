"""No hang when one rank of an MPI test run fails: a pytest plugin (conftest.py imports its
hooks; a plain pytest run can load it with `-p mpi_guard`). Active only under `--with-mpi` with
more than one rank, for tests marked `mpi`.

A test that fails on one rank (an assertion, an exception, a failing fixture) leaves the other
ranks waiting in a collective or a transfer that rank will never join; pytest-timeout cannot
fire inside a blocking MPI call. So:

- After every MPI test the ranks agree, on a communicator of their own, that each has finished
  it (a non-blocking allreduce of "failed here", polled). When they all arrive, the run goes
  on, and rank 0 names the ranks where the test failed.
- A rank where the test failed prints the failure at once (rank, test, report) and starts a
  watchdog: if the agreement has not completed GRACE_S seconds later (others are stuck in the
  test, or this rank is stuck in a teardown), it says so and calls MPI_Abort, which ends the
  whole job with a non-zero status.
- Every MPI test also has a watchdog at its timeout (the `timeout` marker, else pytest.ini's)
  plus GRACE_S: a test still running then (every rank stuck, where pytest-timeout could not
  act) dumps this rank's Python stacks and aborts the job.

HPCATTN_TEST_GRACE_S sets GRACE_S (default 30).
"""
import faulthandler
import os
import sys
import threading
import time

import pytest

GRACE_S = float(os.environ.get("HPCATTN_TEST_GRACE_S", "30"))

_state = {"comm": None, "failed": None, "watchdogs": [], "capture": None}


def _world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


def _say(text):
    """One message on stderr, with the rank, flushed (stdout first, so the order holds)."""
    world = _world()
    sys.stdout.flush()
    sys.stderr.write("".join(f"[mpi_guard rank {world.rank} of {world.size}] {line}\n"
                             for line in text.splitlines()))
    sys.stderr.flush()


def _abort(why, stacks=False):
    try:  # from a watchdog, during a test: stop pytest capturing the output, or it is lost
        _state["capture"].suspend_global_capture(in_=True)
    except Exception:
        pass
    _say(why)
    if stacks:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
    _world().Abort(1)


def _watchdog(seconds, why, stacks=False):
    timer = threading.Timer(seconds, _abort, (why, stacks))
    timer.daemon = True
    timer.start()
    _state["watchdogs"].append(timer)
    return timer


def _cancel_watchdogs():
    for timer in _state["watchdogs"]:
        timer.cancel()
    _state["watchdogs"] = []


def pytest_configure(config):
    if not config.getoption("with_mpi", False):
        return
    world = _world()
    if world.size > 1:
        _state["comm"] = world.Dup()  # collective: every rank configures alike
        _state["capture"] = config.pluginmanager.getplugin("capturemanager")


def pytest_unconfigure(config):
    _cancel_watchdogs()
    if _state["comm"] is not None:
        _state["comm"].Free()
        _state["comm"] = None


def _guarded(item):
    return _state["comm"] is not None and item.get_closest_marker("mpi") is not None


def _timeout_of(item):
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    if marker is not None and "timeout" in marker.kwargs:
        return float(marker.kwargs["timeout"])
    return float(item.config.getini("timeout") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _guarded(item):
        yield
        return
    _state["failed"] = None
    limit = _timeout_of(item)
    if limit > 0:
        _watchdog(limit + GRACE_S, f"{item.nodeid} still running after {limit + GRACE_S:.0f} s "
                  f"(timeout {limit:.0f} s + {GRACE_S:.0f} s): aborting the MPI job; this rank's "
                  "stacks follow", stacks=True)
    yield
    _agree(item)
    _cancel_watchdogs()


def pytest_runtest_logreport(report):
    if _state["comm"] is None or not report.failed or _state["failed"] is not None:
        return
    if "mpi" not in report.keywords:
        return
    _state["failed"] = report.when
    _say(f"FAILED {report.nodeid} ({report.when}):\n{report.longreprtext}")
    _watchdog(GRACE_S, f"{report.nodeid} failed here ({report.when}) and the other ranks did "
              f"not finish it within {GRACE_S:.0f} s: aborting the MPI job")


def _agree(item):
    """Wait until every rank has finished this test; rank 0 names where it failed."""
    import numpy as np
    from mpi4py import MPI
    comm = _state["comm"]
    mine = np.array([1 << comm.rank if _state["failed"] else 0], dtype=np.int64)
    failed = np.zeros(1, dtype=np.int64)
    req = comm.Iallreduce(mine, failed, op=MPI.BOR)
    pause = 1e-4
    while not req.Test():
        time.sleep(pause)
        pause = min(2 * pause, 0.02)
    if failed[0] and comm.rank == 0:
        ranks = [r for r in range(comm.size) if failed[0] >> r & 1]
        _say(f"{item.nodeid} failed on rank(s) {', '.join(map(str, ranks))}")
