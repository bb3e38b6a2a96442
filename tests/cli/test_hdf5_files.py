"""HDF5 outputs end to end through the command line: chunked layout, compression, crashes
and resume of out-of-core runs, and clear errors when the output cannot be written.

Runs on whatever h5py is installed (serial or parallel HDF5); files are re-read from disk.
"""
import os
import subprocess

import h5py
import numpy as np
import pytest

from helpers import hpcattn, mpiexec, read_result as read
from hpcattn.commands.cli import main
from hpcattn.io.h5io import chunks_for
from hpcattn.io.outofcore import CRASH_VAR

SPEC = "causal+window:70+global:2"


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "in.h5"
    assert main(["gen", str(path), "--seq", "3001", "--batch", "2", "--heads", "2", "--kv-heads", "1",
                 "--head-dim", "16", "--dtype", "float16", "--seed", "11"]) == 0
    return path


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or p.name.endswith(".partial"))


def test_chunks_follow_the_sequence_axis():
    assert chunks_for((2, 10**6, 4, 64), 1, "float16") == (1, 2048, 4, 64)
    assert chunks_for((2, 4, 10**6), 2, "float32") == (1, 1, 262144)
    assert chunks_for((1, 3, 1, 8), 1, "float32") == (1, 3, 1, 8)


@pytest.mark.parametrize("P", [1, 3])
def test_resume_after_a_crash_gives_the_same_bytes(inp, tmp_path, P):
    """An injected crash after 2 chunks per rank leaves no final file, only OUT.partial with
    done flags; --resume skips those chunks and yields exactly the uninterrupted result."""
    clean, out = tmp_path / "clean.h5", tmp_path / "out.h5"
    args = ["--mask", SPEC, "--max-memory", "64K"]  # forces 256-row chunks: 12 of them
    assert mpiexec(P, "run", inp, clean, *args).returncode == 0
    crash = mpiexec(P, "run", inp, out, *args, env={CRASH_VAR: "2"})
    assert crash.returncode != 0
    assert not out.exists() and leftovers(tmp_path) == ["out.h5.partial"]
    with h5py.File(f"{out}.partial", "r") as f:
        assert f["chunks_done"][...].sum() == 2 * P and "complete" not in f.attrs
    res = mpiexec(P, "run", inp, out, *args, "--resume")
    assert res.returncode == 0, res.stderr
    o, lse, attrs, stats = read(out)
    o_c, lse_c, attrs_c, stats_c = read(clean)
    assert attrs["resumed"] == 1 and attrs_c["resumed"] == 0 and attrs["complete"] == 1
    assert stats["chunks_resumed"].sum() == 2 * P and stats["chunks"].sum() == 12 - 2 * P
    assert stats_c["chunks"].sum() == 12 and stats["edges"].sum() < stats_c["edges"].sum()
    assert o.tobytes() == o_c.tobytes() and lse.tobytes() == lse_c.tobytes()
    assert leftovers(tmp_path) == []
    assert hpcattn("verify", inp, out).returncode == 0


DESIGN_STATS = {"bytes_sent", "bytes_received", "compute_s", "comm_s", "io_s", "wall_s"}
DESIGN_ATTRS = {"variant", "mask", "ranks", "nodes", "backend", "transport", "hpcattn_version", "scale"}


def test_in_memory_and_out_of_core_results_have_the_same_keys(inp, tmp_path):
    """Both run paths build their stats and attributes with io.results: read back from the
    files, the same stats keys and attribute names, at least those of DESIGN.md section 2. An
    out-of-core file also keeps the identity a --resume checks (ooc_*), and nothing else."""
    mem, ooc = tmp_path / "mem.h5", tmp_path / "ooc.h5"
    for out, extra in ((mem, []), (ooc, ["--max-memory", "64K"])):
        res = hpcattn("run", inp, out, "--mask", SPEC, *extra)
        assert res.returncode == 0, res.stderr
    *_, attrs_m, stats_m = read(mem)
    *_, attrs_o, stats_o = read(ooc)
    assert (attrs_m["out_of_core"], attrs_o["out_of_core"]) == (0, 1)
    assert attrs_m["mask"] == attrs_o["mask"] == SPEC and attrs_m["scale"] == attrs_o["scale"]
    assert sorted(stats_m) == sorted(stats_o) and set(stats_m) >= DESIGN_STATS
    resume_identity = {"ooc_input", "ooc_mask", "ooc_rows", "ooc_shape"}
    assert sorted(attrs_m) == sorted(set(attrs_o) - resume_identity) and set(attrs_o) >= resume_identity
    assert set(attrs_m) >= DESIGN_ATTRS | {"complete"}
    for stats in (stats_m, stats_o):
        assert all(len(v) == 1 for v in stats.values())  # one entry per rank


def test_resume_refuses_a_partial_file_of_another_run(inp, tmp_path):
    out = tmp_path / "out.h5"
    assert mpiexec(2, "run", inp, out, "--mask", SPEC, "--max-memory", "64K",
                   env={CRASH_VAR: "1"}).returncode != 0
    res = mpiexec(2, "run", inp, out, "--mask", "window:9", "--max-memory", "64K", "--resume")
    assert res.returncode == 1 and "cannot resume" in res.stderr and "ooc_mask" in res.stderr
    assert res.stderr.count("hpcattn: error:") == 1 and not out.exists()


def test_gzip_output_holds_the_same_values(inp, tmp_path):
    for name, extra in (("plain.h5", []), ("gz.h5", ["--compress", "gzip"])):
        assert mpiexec(2, "run", inp, tmp_path / name, "--mask", SPEC, *extra).returncode == 0
    plain, gz = read(tmp_path / "plain.h5"), read(tmp_path / "gz.h5")
    assert plain[0].tobytes() == gz[0].tobytes() and plain[1].tobytes() == gz[1].tobytes()
    with h5py.File(tmp_path / "gz.h5") as f:
        assert f["o"].compression == "gzip" and f["lse"].compression == "gzip"


@pytest.mark.parametrize("ooc", [False, True])
def test_an_unwritable_output_is_one_clear_error(inp, tmp_path, ooc):
    out = tmp_path / "no" / "such" / "dir" / "o.h5"
    res = mpiexec(2, "run", inp, out, "--mask", SPEC, *(["--max-memory", "64K"] if ooc else []))
    assert res.returncode == 1 and "cannot create output" in res.stderr
    assert res.stderr.count("hpcattn: error:") == 1 and not out.exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs here (no privilege in this container)")
    yield mnt
    subprocess.run(["umount", str(mnt)])


@pytest.mark.parametrize("ooc", [False, True])
def test_a_full_disk_is_one_clear_error_and_leaves_no_result(inp, tiny_disk, ooc):
    out = tiny_disk / "o.h5"  # o alone is 2*3001*2*16*2 bytes = 384 KB > 256 KiB
    res = mpiexec(2, "run", inp, out, "--mask", SPEC, *(["--max-memory", "64K"] if ooc else []))
    assert res.returncode != 0 and not out.exists()
    assert "hpcattn: error:" in res.stderr and "o.h5" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("spec", [SPEC, "dilated:6:4+global:3", "block:100"])
def test_reference_by_spans_equals_the_dense_reference(inp, spec):
    """verify's sampled-row path (only the keys each row reaches) agrees with the dense one."""
    from hpcattn.masks import parse
    from hpcattn.reference import reference
    from hpcattn.commands.verify import _reference_by_spans
    idx = np.array([0, 1, 2, 150, 1500, 2999, 3000])
    with h5py.File(inp, "r") as f:
        q = f["q"][:, idx]
        by_spans = _reference_by_spans(f, q, idx, parse(spec), 0.25)
        dense = reference(q, f["k"][...], f["v"][...], idx, parse(spec), 0.25)
    np.testing.assert_allclose(by_spans[0], dense[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(by_spans[1], dense[1], rtol=1e-12)
