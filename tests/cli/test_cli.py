"""The command line end to end: files re-read from disk, rank counts 1-4, errors on every rank."""
import h5py
import numpy as np
import pytest

from helpers import hpcattn, mpiexec, read_result as read
from hpcattn.commands.cli import main
from hpcattn.masks import parse
from hpcattn.partition import even_offsets
from hpcattn.reference import errors, reference


@pytest.fixture(scope="module")
def gqa_f16(tmp_path_factory):
    """Uneven shards for every P in 1..4 (N = 1001), GQA, float16."""
    path = tmp_path_factory.mktemp("in") / "gqa16.h5"
    assert main(["gen", str(path), "--seq", "1001", "--heads", "4", "--kv-heads", "2",
                 "--head-dim", "48", "--dtype", "float16", "--seed", "7"]) == 0
    return path


def test_gen_is_reproducible_and_records_its_arguments(tmp_path, monkeypatch):
    """The same file from one thread or four, over many row chunks."""
    from hpcattn.commands import gen
    monkeypatch.setattr(gen, "CHUNK_ELEMS", 300)
    for name, threads in (("a.h5", 1), ("b.h5", 4)):
        monkeypatch.setattr(gen.os, "sched_getaffinity", lambda pid, n=threads: set(range(n)))
        assert main(["gen", str(tmp_path / name), "--seq", "50", "--queries", "3", "--batch", "2",
                     "--heads", "2", "--seed", "5", "--backward"]) == 0
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        for name in ("q", "k", "v", "do", "q_positions"):
            assert np.array_equal(a[name][...], b[name][...])
        assert a["q"].shape == (2, 3, 2, 64) and a["k"].shape == (2, 50, 2, 64)
        assert a["q_positions"][...].tolist() == [47, 48, 49] and a.attrs["seed"] == 5


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_run_gives_the_same_o_for_every_rank_count(gqa_f16, tmp_path, P):
    out = tmp_path / f"o{P}.h5"
    res = mpiexec(P, "run", gqa_f16, out, "--mask", "causal+window:300")
    assert res.returncode == 0, res.stderr
    o, lse, attrs, stats = read(out)
    assert attrs["complete"] == 1 and attrs["ranks"] == P and attrs["variant"] == ("ring" if P == 1 else "burst")
    assert attrs["backend"] == "numpy" and attrs["mask"] == "causal+window:300"
    assert o.dtype == np.float16 and o.shape == (1, 1001, 4, 48) and lse.shape == (1, 4, 1001)
    assert sorted(stats["q_rows"].tolist()) == sorted(np.diff(even_offsets(1001, P)).tolist())  # any layout
    assert len(stats["bytes_sent"]) == P and (stats["wall_s"] > 0).all()
    with h5py.File(gqa_f16) as f:
        o_ref, lse_ref = reference(f["q"][...], f["k"][...], f["v"][...], np.arange(1001),
                                   parse("causal+window:300"), 1 / np.sqrt(48))
    o_err, lse_err, ok = errors(o, lse, o_ref, lse_ref)
    assert ok and o_err < 2e-3 and lse_err < 1e-5
    assert hpcattn("verify", gqa_f16, out).returncode == 0


def test_outputs_agree_across_rank_counts_to_float32_rounding(gqa_f16, tmp_path):
    results = []
    for P in (1, 2, 3, 4):
        out = tmp_path / f"o{P}.h5"
        assert mpiexec(P, "run", gqa_f16, out, "--mask", "window:200+global:3").returncode == 0
        results.append(read(out)[:2])
    for o, lse in results[1:]:
        assert np.abs(o.astype(np.float32) - results[0][0].astype(np.float32)).max() <= 2 ** -10
        np.testing.assert_allclose(lse, results[0][1], rtol=2e-6)


def test_more_ranks_than_tokens_gives_empty_shards(tmp_path):
    assert main(["gen", str(tmp_path / "tiny.h5"), "--seq", "3", "--head-dim", "8"]) == 0
    res = mpiexec(4, "run", tmp_path / "tiny.h5", tmp_path / "o.h5", "--mask", "causal")
    assert res.returncode == 0, res.stderr
    _, _, _, stats = read(tmp_path / "o.h5")
    assert stats["q_rows"].tolist() == [1, 1, 1, 0]
    assert hpcattn("verify", tmp_path / "tiny.h5", tmp_path / "o.h5").returncode == 0


def test_decode_file_runs_and_verifies(tmp_path):
    inp = tmp_path / "dec.h5"
    assert main(["gen", str(inp), "--seq", "2000", "--queries", "3", "--heads", "2", "--head-dim", "16"]) == 0
    assert mpiexec(3, "run", inp, tmp_path / "o.h5", "--mask", "causal").returncode == 0
    res = hpcattn("verify", inp, tmp_path / "o.h5")
    assert res.returncode == 0 and "PASS" in res.stdout


def make_input(path, **overrides):
    data = {"q": np.ones((1, 10, 2, 8), "float32"), "k": np.ones((1, 10, 1, 8), "float32"),
            "v": np.ones((1, 10, 1, 8), "float32")}
    data.update(overrides)
    with h5py.File(path, "w") as f:
        for name, arr in data.items():
            if arr is not None:
                f[name] = arr
    return path


BAD_INPUTS = {
    "missing_k": ({"k": None}, "no dataset 'k'"),
    "float64": ({"q": np.ones((1, 10, 2, 8)), "k": np.ones((1, 10, 1, 8)), "v": np.ones((1, 10, 1, 8))}, "dtype"),
    "mixed_dtype": ({"v": np.ones((1, 10, 1, 8), "float16")}, "dtype"),
    "gqa": ({"q": np.ones((1, 10, 3, 8), "float32"), "k": np.ones((1, 10, 2, 8), "float32"),
             "v": np.ones((1, 10, 2, 8), "float32")}, "multiple of kv heads"),
    "3d": ({"q": np.ones((10, 2, 8), "float32")}, "4-D"),
    "nan_k": ({"k": np.where(np.arange(10)[None, :, None, None] == 8, np.nan, 1).astype("float32")
                     * np.ones((1, 10, 1, 8), "float32")}, "NaN or Inf"),
    "positions_range": ({"q_positions": np.arange(5, 15)}, "q_positions must lie in [0, 10)"),
    "rows_without_positions": ({"q": np.ones((1, 4, 2, 8), "float32")}, "q_positions is needed"),
}


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_on_every_rank_with_one_clear_line_and_no_output(tmp_path, P, case):
    overrides, words = BAD_INPUTS[case]
    inp = make_input(tmp_path / "bad.h5", **overrides)
    res = mpiexec(P, "run", inp, tmp_path / "out.h5", "--mask", "causal", timeout=60)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("hpcattn: error")]
    assert len(lines) == 1 and words in lines[0], res.stderr
    assert not any(tmp_path.glob("out.h5*"))


@pytest.mark.parametrize("args, words", [
    (["--mask", "windw:5"], "unknown term 'windw:5'"),
    (["--mask", "window:5", "--transport", "nccl"], "--transport nccl needs the GPU backend"),
    (["--mask", "window:5", "--ranks-per-node", "0"], "--ranks-per-node must be >= 1"),
])
def test_bad_options_fail_cleanly_on_three_ranks(tmp_path, args, words):
    inp = make_input(tmp_path / "ok.h5")
    res = mpiexec(3, "run", inp, tmp_path / "out.h5", *args, timeout=60)
    assert res.returncode != 0 and res.stderr.count("hpcattn: error") == 1 and words in res.stderr
    assert not any(tmp_path.glob("out.h5*"))


def test_missing_input_and_unwritable_output(tmp_path):
    res = mpiexec(2, "run", tmp_path / "nope.h5", tmp_path / "o.h5", "--mask", "full", timeout=60)
    assert res.returncode != 0 and "does not exist" in res.stderr
    inp = make_input(tmp_path / "ok.h5")
    res = mpiexec(2, "run", inp, tmp_path / "no_dir" / "o.h5", "--mask", "full", timeout=60)
    assert res.returncode != 0 and "cannot create output" in res.stderr


def test_verify_fails_on_a_wrong_or_incomplete_result(gqa_f16, tmp_path):
    out = tmp_path / "o.h5"
    assert main(["run", str(gqa_f16), str(out), "--mask", "causal"]) == 0
    assert main(["verify", str(gqa_f16), str(out), "--rows", "50"]) == 0
    with h5py.File(out, "r+") as f:
        f["o"][0, 500, 1, 3] += 0.5
    assert main(["verify", str(gqa_f16), str(out)]) == 1
    with h5py.File(out, "r+") as f:
        del f.attrs["complete"]
    res = hpcattn("verify", gqa_f16, out)
    assert res.returncode == 1 and "not a complete result" in res.stderr


def test_info_reports_the_environment():
    res = hpcattn("info")
    assert res.returncode == 0
    for key in ("backend", "blas", "mpi library", "cuda-aware mpi", "parallel hdf5", "gpus", "gpu kernels"):
        assert key in res.stdout


def test_info_names_the_gpu_kernels_auto_takes():
    from hpcattn.commands.info import gpu_kernels
    assert gpu_kernels(None) == "none (no GPU)"
    assert gpu_kernels("90") == ("Hopper warpgroup MMA at D = 64/128 (backward 64/128), else "
                                 "mma.sync at D = 32/96 (backward 32/96)")
    assert gpu_kernels("80") == ("mma.sync at D = 32/64/96/128 (backward 32/64/96/128) "
                                 "(compute capability 8.0; the Hopper kernels need 9.0)")
