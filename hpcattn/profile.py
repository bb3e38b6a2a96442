"""Phases of a run made visible: NVTX ranges (domain "hpcattn") for Nsight Systems, and a
per-rank timeline written in Chrome trace format (Perfetto, chrome://tracing) for CPU users.

Code marks a phase with one line, `with phase("read"):`. NVTX ranges cost next to nothing when
no profiler is attached; the timeline is recorded only after `enable()` (`run --profile`).
Times are host wall-clock: on the GPU backend a phase spans what the host waited for, so use
Nsight Systems for device time.
"""
import json
import os
import time
from contextlib import contextmanager

try:
    import nvtx
except ImportError:  # nvtx is a dependency; a broken install must not break a run
    nvtx = None

DOMAIN = "hpcattn"
_events = []          # (name, start_us, duration_us, thread) of this process, when enabled
_enabled = False
_t0 = time.time() * 1e6 - time.perf_counter() * 1e6   # perf_counter -> epoch microseconds


def enable(on=True):
    """Start (or stop) recording this process's timeline; clears what was recorded."""
    global _enabled
    _enabled = on
    _events.clear()


def _now_us():
    return _t0 + time.perf_counter() * 1e6


@contextmanager
def phase(name, thread=0):
    """An NVTX range and (when enabled) a timeline slice named `name` around the block."""
    if nvtx is not None:
        nvtx.push_range(name, domain=DOMAIN)
    start = _now_us() if _enabled else None
    try:
        yield
    finally:
        if start is not None:
            _events.append((name, start, _now_us() - start, thread))
        if nvtx is not None:
            nvtx.pop_range(domain=DOMAIN)


def span(name, start_us, thread=1):
    """Record a slice that began at `start_us` (from `now()`) and ends now, e.g. a message in
    flight from post to completion; drawn on its own track so it may overlap compute."""
    if _enabled:
        _events.append((name, start_us, _now_us() - start_us, thread))


def now():
    """A timestamp for `span` (None when not recording, so callers pay nothing)."""
    return _now_us() if _enabled else None


THREADS = {0: "phases", 1: "transfers in flight", 2: "reads", 3: "writes"}  # 2, 3: streaming runs


def chrome_trace(per_rank):
    """Trace-event JSON (dict) from a list, index = rank, of event lists: pid = rank."""
    events = []
    for rank, evs in enumerate(per_rank):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"name": f"rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"sort_index": rank}})
        for tid, label in THREADS.items():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                           "args": {"name": label}})
        for name, start, dur, tid in evs:
            events.append({"name": name, "cat": DOMAIN, "ph": "X", "pid": rank, "tid": tid,
                           "ts": round(start, 3), "dur": round(dur, 3)})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(comm, path):
    """Collective: gather every rank's timeline to rank 0 and write one Chrome-trace JSON file
    at `path` (pid = rank). Returns the number of events written on rank 0, else None."""
    from .errors import agree
    gathered = comm.gather_object(list(_events))
    problem = None
    if comm.rank == 0:
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(chrome_trace(gathered), f)
            os.replace(tmp, path)
        except OSError as e:
            problem = f"cannot write profile {path!r}: {e}"
    agree(comm, problem)
    return sum(len(e) for e in gathered) if comm.rank == 0 else None
