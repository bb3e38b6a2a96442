"""Phases: NVTX ranges in domain "hpcattn" and the Chrome-trace timeline of `run --profile`."""
import json

import h5py
import numpy as np
import pytest

from helpers import mpiexec
from hpcattn import profile
from hpcattn.commands.cli import main


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "in.h5"
    assert main(["gen", str(path), "--seq", "301", "--heads", "2", "--kv-heads", "1",
                 "--head-dim", "16", "--seed", "2"]) == 0
    return path


class FakeNvtx:
    """Records push/pop calls in place of the nvtx package."""
    def __init__(self):
        self.calls = []

    def push_range(self, message, domain=None):
        self.calls.append(("push", message, domain))

    def pop_range(self, domain=None):
        self.calls.append(("pop", None, domain))


def test_phase_records_only_when_enabled_and_nests(monkeypatch):
    fake = FakeNvtx()
    monkeypatch.setattr(profile, "nvtx", fake)
    profile.enable(False)
    with profile.phase("off"):
        pass
    assert profile._events == [] and fake.calls[0] == ("push", "off", "hpcattn")
    profile.enable()
    try:
        with profile.phase("outer"):
            with profile.phase("inner"):
                pass
        events = list(profile._events)
    finally:
        profile.enable(False)
    assert [e[0] for e in events] == ["inner", "outer"]
    (_, s_in, d_in, _), (_, s_out, d_out, _) = events
    assert s_out <= s_in and s_in + d_in <= s_out + d_out + 1e-3
    pushes = [c for c in fake.calls if c[0] == "push"]
    assert len(pushes) == 3 and sum(c[0] == "pop" for c in fake.calls) == 3
    assert all(c[2] == "hpcattn" for c in fake.calls)


def test_phase_pops_its_range_when_the_block_raises(monkeypatch):
    fake = FakeNvtx()
    monkeypatch.setattr(profile, "nvtx", fake)
    with pytest.raises(KeyError):
        with profile.phase("boom"):
            raise KeyError
    assert [c[0] for c in fake.calls] == ["push", "pop"]


def test_chrome_trace_has_one_process_per_rank():
    trace = profile.chrome_trace([[("read", 10.0, 5.0, 0)], [("local", 12.0, 3.0, 0),
                                                            ("send/recv in flight", 11.0, 4.0, 1)]])
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["pid"], e["tid"], e["name"], e["ts"], e["dur"]) for e in slices] == [
        (0, 0, "read", 10.0, 5.0), (1, 0, "local", 12.0, 3.0), (1, 1, "send/recv in flight", 11.0, 4.0)]
    names = {(e["pid"], e["args"]["name"]) for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {(0, "rank 0"), (1, "rank 1")}


def test_every_phase_of_a_run_is_an_nvtx_range(monkeypatch, small_input, tmp_path):
    fake = FakeNvtx()
    monkeypatch.setattr(profile, "nvtx", fake)
    assert main(["run", str(small_input), str(tmp_path / "o.h5"), "--mask", "causal+window:20"]) == 0
    names = {c[1] for c in fake.calls if c[0] == "push"}
    # one rank runs the kernel directly: no merge
    assert {"read", "local", "write", "write stats", "allgather", "gather"} <= names
    assert "merge" not in names
    assert sum(c[0] == "push" for c in fake.calls) == sum(c[0] == "pop" for c in fake.calls)


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_run_profile_writes_a_timeline_of_every_rank(small_input, tmp_path, P):
    # same-length names: the temporary name is broadcast and its bytes counted
    plain, prof, trace = tmp_path / "o1.h5", tmp_path / "o2.h5", tmp_path / "trace.json"
    for out, extra in ((plain, []), (prof, ["--profile", trace])):
        r = mpiexec(P, "run", small_input, out, "--mask", "causal+window:40+global:2",
                    "--variant", "ring", *extra)
        assert r.returncode == 0, r.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == set(range(P))
    merged = 0  # a rank's first partial that covers its rows is its state, not merged
    for rank in range(P):
        names = [e["name"] for e in slices if e["pid"] == rank]
        assert {"read", "local", "write"} <= set(names)
        assert names.count("local") == P  # one local phase per ring step
        mine = [e for e in slices if e["pid"] == rank]
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in mine if e["name"] == "local"]
        merges = [e for e in mine if e["name"] == "merge"]
        merged += len(merges)
        assert all(any(a <= m["ts"] and m["ts"] + m["dur"] <= b + 1 for a, b in spans)
                   for m in merges), "every merge happens inside a local step"
        assert {f"hop {h} send/recv" for h in range(1, P)} <= set(names)
        assert {f"hop {h} wait" for h in range(1, P)} <= set(names)
        assert sum(n == "send/recv in flight" for n in names) == P - 1
        assert all(e["dur"] >= 0 and e["ts"] > 0 for e in slices if e["pid"] == rank)
    assert bool(merged) == (P > 1)
    # profiling changes neither the result nor the counted traffic
    with h5py.File(plain) as a, h5py.File(prof) as b:
        assert np.array_equal(a["o"][...], b["o"][...])
        for key in ("bytes_sent", "bytes_received"):
            assert np.array_equal(a["stats"][key][...], b["stats"][key][...])


def test_profile_to_an_unwritable_path_fails_on_every_rank(small_input, tmp_path):
    r = mpiexec(2, "run", small_input, tmp_path / "o.h5", "--mask", "full",
                "--profile", tmp_path / "no" / "such" / "dir" / "t.json")
    assert r.returncode != 0 and "cannot write profile" in r.stderr
