"""gen/run/verify with explicit csr masks, bad csr files, and `hpcattn bench`."""
import json

import h5py
import numpy as np
import pytest

from helpers import hpcattn, mpiexec
from hpcattn.masks import parse


def test_gen_writes_csr_and_run_matches_the_implicit_terms(tmp_path):
    inp = tmp_path / "in.h5"
    spec = "causal+window:3+random:5:2+csr"
    r = hpcattn("gen", inp, "--seq", 301, "--head-dim", 16, "--heads", 2, "--mask", spec)
    assert r.returncode == 0, r.stderr
    with h5py.File(inp, "r") as f:
        indptr, indices = f["mask/indptr"][...], f["mask/indices"][...]
    want = parse("causal+window:3+random:5:2", n_keys=301)
    ip, ix = want.columns(np.arange(301), 0, 301)
    assert indptr.dtype == np.int64 and (indptr == ip).all() and (indices == ix).all()
    outs = {}
    for mask, ranks in (("csr", 3), ("causal+window:3+random:5:2", 2)):
        out = tmp_path / f"{ranks}.h5"
        r = mpiexec(ranks, "run", inp, out, "--mask", mask)
        assert r.returncode == 0, r.stderr
        r = hpcattn("verify", inp, out)
        assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
        with h5py.File(out, "r") as f:
            outs[mask] = f["o"][...], f["lse"][...], f["stats/edges"][...].sum()
    (o1, l1, e1), (o2, l2, e2) = outs.values()
    assert e1 == e2 == len(indices) and np.abs(o1 - o2).max() < 1e-5 and np.abs(l1 - l2).max() < 1e-5


def test_gen_csr_needs_other_terms(tmp_path):
    r = hpcattn("gen", tmp_path / "x.h5", "--seq", 10, "--mask", "csr")
    assert r.returncode != 0 and "other terms" in r.stderr and not (tmp_path / "x.h5").exists()


def corrupt(path, how):
    with h5py.File(path, "r+") as f:
        ptr, idx = f["mask/indptr"][...], f["mask/indices"][...]
        del f["mask/indptr"], f["mask/indices"]
        if how == "unsorted":
            idx[ptr[40]:ptr[40] + 2] = idx[ptr[40]:ptr[40] + 2][::-1].copy()
        elif how == "duplicate":
            idx[ptr[70] + 1] = idx[ptr[70]]
        elif how == "range":
            idx[ptr[90]] = 500
        elif how == "short":
            ptr = ptr[:-1]
        elif how == "float":
            idx = idx.astype(np.float64)
        f["mask/indptr"], f["mask/indices"] = ptr, idx


@pytest.mark.parametrize("how, words", [
    ("unsorted", "unsorted column"), ("duplicate", "duplicate column"), ("range", "out of range: 500 in row 90"),
    ("short", "must have 101 entries"), ("float", "must be 1-D integers")])
def test_a_bad_csr_fails_on_every_rank_with_one_line(tmp_path, how, words):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    assert hpcattn("gen", inp, "--seq", 100, "--head-dim", 8, "--mask", "random:6+csr").returncode == 0
    corrupt(inp, how)
    r = mpiexec(3, "run", inp, out, "--mask", "csr")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hpcattn: error")]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bench_json_reports_ours_checked_and_sgemm():
    r = hpcattn("bench", "--seq", 700, "--mask", "window:16+global:2+random:3", "random:20+csr",
                "--repeat", "1", "--sgemm", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["impl"] for x in rows] == ["sgemm", "hpcattn", "hpcattn"]
    assert rows[0]["gflops"] > 0
    assert rows[2]["edges"] == 700 * 20 and all(x["max_err"] < 1e-5 for x in rows[1:])
    assert all(x["blas"] for x in rows[1:])  # the BLAS kernel set the figures were taken with
