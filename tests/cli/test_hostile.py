"""Hostile inputs: every bad file, path or mask spec gets one clear line naming the problem,
a non-zero exit on every rank within seconds, and no file under the output name.

Cases are listed (and counted) in tests/README.md; keep the two in step.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import BIN
from hpcattn import masks
from hpcattn.io import h5io, validate
from hpcattn.commands.cli import main
from hpcattn.errors import HpcattnError
from hpcattn.commands.gen import generate
from hpcattn.masks import parse

EXIT_TAG = "hpcattn-rank-exit"


def run_each_rank(n, *args, timeout=60):
    """`hpcattn ARGS` on n ranks; returns (exit status of every rank in rank order, stderr).

    Each rank's status is reported by a shell wrapper, so a rank that exits 0 while another
    fails is caught (mpiexec alone reports only the first non-zero status).
    """
    script = f'"$0" -m hpcattn "$@"; echo "{EXIT_TAG} $OMPI_COMM_WORLD_RANK $?" >&2'
    cmd = [str(BIN / "mpiexec"), "-n", str(n), "sh", "-c", script, sys.executable, *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    codes = dict(map(int, ln.split()[1:]) for ln in res.stderr.splitlines() if ln.startswith(EXIT_TAG))
    return [codes.get(r) for r in range(n)], res.stderr


def assert_refused(tmp_path, n, inp, words, *extra, mask="causal", out=None):
    out = out or tmp_path / "out.h5"
    codes, err = run_each_rank(n, "run", inp, out, "--mask", mask, *extra)
    assert all(c not in (0, None) for c in codes), (codes, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("hpcattn: error")]
    assert len(lines) == 1 and words in lines[0], err
    assert not os.path.isfile(out) and not list(Path(out).parent.glob(Path(out).name + ".tmp-*"))


# ---------------------------------------------------------------- hand-made bad files
F32, F16, BF16 = "float32", "float16", h5io.BF16


def ones(shape, dtype=F32):
    return np.ones(shape, dtype)


def declared(shape, dtype=F32):
    """A dataset that declares `shape` but stores nothing (chunked, never written)."""
    return ("declared", shape, dtype)


Q, K = (1, 10, 2, 8), (1, 10, 1, 8)
NAN_ROW_8 = np.where(np.arange(10)[None, :, None, None] == 8, np.nan, 1).astype(F32) * ones(K)

# name -> (datasets to override (None deletes), words the error line must contain)
BAD_FILES = {
    "missing_q": ({"q": None}, "no dataset 'q'"),
    "missing_k": ({"k": None}, "no dataset 'k'"),
    "missing_v": ({"v": None}, "no dataset 'v'"),
    "q_is_a_group": ({"q": "group"}, "no dataset 'q'"),
    "q_3d": ({"q": ones((10, 2, 8))}, "4-D"),
    "k_5d": ({"k": ones((1, 10, 1, 8, 1)), "v": ones((1, 10, 1, 8, 1))}, "4-D"),
    "q_scalar": ({"q": np.float32(1)}, "4-D"),
    "v_shape_differs": ({"v": ones((1, 9, 1, 8))}, "same shape"),
    "batch_differs": ({"k": ones((2, 10, 1, 8)), "v": ones((2, 10, 1, 8))}, "disagree in batch or head dim"),
    "head_dim_differs": ({"k": ones((1, 10, 1, 4)), "v": ones((1, 10, 1, 4))}, "disagree in batch or head dim"),
    "gqa_3_over_2": ({"q": ones((1, 10, 3, 8)), "k": ones((1, 10, 2, 8)), "v": ones((1, 10, 2, 8))},
                     "multiple of kv heads"),
    "gqa_2_over_4": ({"k": ones((1, 10, 4, 8)), "v": ones((1, 10, 4, 8))}, "multiple of kv heads"),
    "float64": ({n: np.ones(s) for n, s in (("q", Q), ("k", K), ("v", K))}, "dtype"),
    "int32": ({n: np.ones(s, "int32") for n, s in (("q", Q), ("k", K), ("v", K))}, "dtype"),
    "mixed_dtype": ({"v": ones(K, F16)}, "dtype"),
    "strings": ({"q": np.full(Q, b"a", "S1")}, "dtype"),
    "compound": ({"q": np.zeros(Q, [("a", F32)])}, "dtype"),
    "zero_batch": ({n: ones((0, *s[1:])) for n, s in (("q", Q), ("k", K), ("v", K))}, "B = 0"),
    "zero_tokens": ({n: ones((1, 0, *s[2:])) for n, s in (("q", Q), ("k", K), ("v", K))}, "= 0"),
    "zero_heads": ({"q": ones((1, 10, 0, 8))}, "H = 0"),
    "zero_head_dim": ({n: ones((*s[:3], 0)) for n, s in (("q", Q), ("k", K), ("v", K))}, "head dim"),
    "huge_head_dim": ({n: declared((*s[:3], 2**17)) for n, s in (("q", Q), ("k", K), ("v", K))},
                      "head dim D = 131,072"),
    # refused before reading: too big for memory, and causal cannot stream out of core
    "petabyte_declared": ({n: declared((1, 2**40, s[2], 64)) for n, s in (("q", Q), ("k", K), ("v", K))},
                          "does not fit in memory"),
    "2^62_tokens_declared": ({n: declared((1, 2**62, s[2], 1)) for n, s in (("q", Q), ("k", K), ("v", K))},
                             "fewer than 2**62"),
    "nan_q": ({"q": np.where(np.arange(10)[None, :, None, None] == 3, np.nan, 1).astype(F32) * ones(Q)},
              "q holds NaN or Inf (first at row 3)"),
    "nan_k_row_8": ({"k": NAN_ROW_8}, "k holds NaN or Inf (first at row 8)"),
    "inf_v": ({"v": np.full(K, np.inf, F32)}, "v holds NaN or Inf"),
    "minus_inf_q_f16": ({n: ones(s, F16) for n, s in (("q", Q), ("k", K), ("v", K))} | {
        "q": np.full(Q, -np.inf, F16)}, "q holds NaN or Inf"),
    "huge_values": ({"k": np.full(K, 1e30, F32)}, "values beyond"),
    "positions_out_of_range": ({"q_positions": np.arange(5, 15)}, "q_positions must lie in [0, 10)"),
    "positions_negative": ({"q_positions": np.arange(-1, 9)}, "q_positions must lie in [0, 10)"),
    "positions_uint64_huge": ({"q_positions": np.full(10, 2**64 - 1, np.uint64)},
                              "18446744073709551615"),
    "positions_float": ({"q_positions": np.arange(10.0)}, "q_positions must be (10,) integers"),
    "positions_bool": ({"q_positions": np.ones(10, bool)}, "q_positions must be (10,) integers"),
    "positions_2d": ({"q_positions": np.arange(10).reshape(10, 1)}, "q_positions must be (10,)"),
    "positions_too_short": ({"q_positions": np.arange(9)}, "q_positions must be (10,)"),
    "positions_scalar": ({"q_positions": np.int64(3)}, "q_positions must be (10,)"),
    "positions_is_a_group": ({"q_positions": "group"}, "no dataset 'q_positions'"),
    "rows_without_positions": ({"q": ones((1, 4, 2, 8))}, "q_positions is needed"),
    "nan_q_bf16": ({n: ones(s, BF16) for n, s in (("k", K), ("v", K))} | {
        "q": np.where(np.arange(10)[None, :, None, None] == 3, np.nan, 1).astype(BF16) * ones(Q, BF16)},
        "q holds NaN or Inf (first at row 3)"),
    "inf_k_bf16": ({n: ones(s, BF16) for n, s in (("q", Q), ("v", K))} | {"k": np.full(K, np.inf, BF16)},
                   "k holds NaN or Inf"),
    "huge_v_bf16": ({n: ones(s, BF16) for n, s in (("q", Q), ("k", K))} | {"v": np.full(K, 1e30, BF16)},
                    "values beyond"),
    "mixed_bf16_float16": ({"q": ones(Q, BF16), "k": ones(K, F16), "v": ones(K, F16)}, "dtype"),
}


def make_file(path, overrides):
    data = {"q": ones(Q), "k": ones(K), "v": ones(K)}
    data.update(overrides)
    with h5py.File(path, "w") as f:
        for name, arr in data.items():
            if arr is None:
                continue
            if isinstance(arr, str):
                f.create_group(name)
            elif isinstance(arr, tuple):
                shape, dtype = arr[1], arr[2]
                f.create_dataset(name, shape=shape, dtype=dtype, chunks=(1, 1, 1, min(shape[-1], 64)))
            elif np.asarray(arr).dtype == BF16:
                h5io.write(h5io.create(f, name, arr.shape, BF16), Ellipsis, arr)
            else:
                f[name] = arr
    return path


def raw_file(path, content):
    Path(path).write_bytes(content)
    return path


def truncated(tmp_path, keep):
    good = tmp_path / "good.h5"
    generate(good, 64, head_dim=8)
    data = good.read_bytes()
    return raw_file(tmp_path / "cut.h5", data[:int(len(data) * keep)])


# name -> (function of tmp_path making the input path, words)
BAD_PATHS = {
    "missing_file": (lambda t: t / "nope.h5", "does not exist"),
    "empty_file": (lambda t: raw_file(t / "e.h5", b""), "cannot open"),
    "text_file": (lambda t: raw_file(t / "t.h5", b"q,k,v\n1,2,3\n" * 50), "cannot open"),
    "hdf5_signature_only": (lambda t: raw_file(t / "s.h5", b"\x89HDF\r\n\x1a\n" + bytes(100)), "cannot open"),
    "truncated_half": (lambda t: truncated(t, 0.5), "truncated file"),
    "truncated_header": (lambda t: truncated(t, 0.01), "cannot open"),
    "directory": (lambda t: (t / "d.h5").mkdir() or t / "d.h5", "is a directory"),
}


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_refused_on_every_rank(tmp_path, P, case):
    overrides, words = BAD_FILES[case]
    assert_refused(tmp_path, P, make_file(tmp_path / "bad.h5", overrides), words)


@pytest.mark.parametrize("P", [1, 3])
def test_nan_in_a_bf16_file_is_refused_out_of_core(tmp_path, P):
    """The out-of-core path checks each chunk it streams: a NaN in bfloat16 q ends the run on
    every rank, and the partial output it leaves is not complete-looking."""
    nan_q, _ = BAD_FILES["nan_q_bf16"]
    out = tmp_path / "out.h5"
    assert_refused(tmp_path, P, make_file(tmp_path / "bad.h5", nan_q), "q holds NaN or Inf",
                   "--max-memory", "64K", mask="window:2", out=out)
    partial = Path(f"{out}.partial")
    if partial.exists():
        with h5py.File(partial, "r") as f:
            assert "complete" not in f.attrs


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_bad_input_path_is_refused_on_every_rank(tmp_path, P, case):
    make, words = BAD_PATHS[case]
    assert_refused(tmp_path, P, make(tmp_path), words)


@pytest.mark.parametrize("P", [1, 3])
def test_output_that_is_the_input_or_a_directory_is_refused(tmp_path, P):
    inp = make_file(tmp_path / "in.h5", {})
    before = inp.read_bytes()
    codes, err = run_each_rank(P, "run", inp, inp, "--mask", "full")
    assert all(codes) and err.count("hpcattn: error") == 1 and "is the input file" in err
    assert inp.read_bytes() == before
    (tmp_path / "outdir").mkdir()
    codes, err = run_each_rank(P, "run", inp, tmp_path / "outdir", "--mask", "full")
    assert all(codes) and err.count("hpcattn: error") == 1 and "is a directory" in err
    assert not list((tmp_path / "outdir").iterdir())


BAD_SPECS = {
    "windw:5": "unknown term 'windw:5'", "window": "takes 1 integer", "window:": "must be integers",
    "window:-1": "must be", "window:1.5": "must be integers", "window:0x10": "must be integers",
    "window:٣": "must be integers", "window:1_0": "must be integers", "window: 5": "must be integers",
    "window:5:5": "takes 1 integer", "dilated:3": "takes 2 integer", "dilated:3:0": "needs arguments",
    "block:0": "needs arguments", "global:0": "needs arguments", "window:" + "9" * 30: "needs arguments",
    "window:" + "9" * 5000: "needs arguments", "causal:1": "unknown term", "Causal": "unknown term",
    "full+": "unknown term ''", "+": "unknown term ''", " ": "empty mask spec",
}


@pytest.mark.parametrize("spec", sorted(BAD_SPECS), ids=lambda s: s if len(s) < 40 else f"{s[:12]}...({len(s)})")
def test_bad_mask_spec_is_refused_in_process(spec):
    with pytest.raises(HpcattnError) as e:
        parse(spec)
    assert BAD_SPECS[spec] in str(e.value)


@pytest.mark.parametrize("spec", ["windw:5", "dilated:3:0", "window:" + "9" * 30])
def test_bad_mask_spec_is_refused_on_every_rank(tmp_path, spec):
    assert_refused(tmp_path, 3, make_file(tmp_path / "ok.h5", {}), BAD_SPECS[spec], mask=spec)


def test_extra_and_unused_datasets_are_ignored(tmp_path):
    """Unknown datasets and groups are ignored (files carry provenance); `do` is read only by
    the backward pass, so a malformed one does not stop a forward run."""
    inp = make_file(tmp_path / "extra.h5", {"junk": np.arange(3), "do": np.ones(4), "notes": "group"})
    assert main(["run", str(inp), str(tmp_path / "o.h5"), "--mask", "causal"]) == 0
    with h5py.File(tmp_path / "o.h5") as f:
        assert f.attrs["complete"] == 1 and set(f) == {"o", "lse", "stats"}


def test_big_endian_input_is_read_in_native_order(tmp_path):
    rng = np.random.default_rng(0)
    data = {n: rng.standard_normal(s).astype(F32) for n, s in (("q", Q), ("k", K), ("v", K))}
    make_file(tmp_path / "le.h5", data)
    make_file(tmp_path / "be.h5", {n: a.astype(">f4") for n, a in data.items()})
    for name in ("le", "be"):
        assert main(["run", str(tmp_path / f"{name}.h5"), str(tmp_path / f"o{name}.h5"), "--mask", "causal"]) == 0
    with h5py.File(tmp_path / "ole.h5") as a, h5py.File(tmp_path / "obe.h5") as b:
        assert b["o"].dtype == np.float32 and np.array_equal(a["o"][...], b["o"][...])


def test_memory_check_counts_the_shard_not_the_file():
    meta = dict(B=1, Nq=2**30, N=2**30, H=8, Hkv=8, D=128, dtype=np.dtype(F16))
    gib = 2**30
    validate.fits("x", meta, (0, 2**20), (0, 2**20), memory=64 * gib)  # 1/1024 of the file: fits
    with pytest.raises(HpcattnError, match="needs about 96.0 GiB but the node has 64.0 GiB"):
        validate.fits("x", meta, (0, 2**21), (0, 2**21), memory=64 * gib)


# ---------------------------------------------------------------- property-based
@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("fullcausalwindowdilatedblockglobalrandomcsr:+0123456789-_ .x٣"))
               | st.characters(), max_size=40))
def test_mask_parser_never_fails_with_anything_but_hpcattn_error(spec):
    try:
        mask = parse(spec)
    except HpcattnError:
        return
    i = np.arange(6)
    if mask.needs:  # csr or random unbound: unusable until bound, and it says what it needs
        with pytest.raises(HpcattnError, match="needs the"):
            mask.allowed(i[:, None], i[None, :])
        return
    assert mask.allowed(i[:, None], i[None, :]).shape == (6, 6)


TERM_WORDS = ["full", "causal", "window", "dilated", "block", "global"]


@st.composite
def specs(draw, max_arg=2**64):
    terms = []
    for _ in range(draw(st.integers(1, 4))):
        word = draw(st.sampled_from(TERM_WORDS))
        nargs = draw(st.integers(0, 3))
        args = [str(draw(st.integers(-3, max_arg))) for _ in range(nargs)]
        terms.append(":".join([word, *args]))
    return "+".join(terms)


@settings(max_examples=400, deadline=None)
@given(specs())
def test_mask_grammar_fuzz_parses_or_refuses(spec):
    try:
        mask = parse(spec)
    except HpcattnError as e:
        assert spec in str(e)
        return
    mask.spans(0, 2**61, 0, 2**62)  # absurd but legal ranges: no overflow, no exception


@settings(max_examples=300, deadline=None)
@given(specs(max_arg=12), st.integers(0, 40), st.integers(0, 8), st.integers(0, 40), st.integers(0, 12))
def test_spans_hold_every_edge(spec, qlo, qlen, k0, klen):
    """`spans` may over-cover but never miss an edge: kernels skip everything outside them."""
    try:
        mask = parse(spec)
    except HpcattnError:
        return
    qhi, k1 = qlo + qlen, k0 + klen
    covered = np.zeros(klen, bool)
    for a, b in mask.spans(qlo, qhi, k0, k1):
        assert k0 <= a < b <= k1
        covered[a - k0:b - k0] = True
    edges = mask.allowed(np.arange(qlo, qhi + 1)[:, None], np.arange(k0, k1)[None, :]).any(axis=0)
    assert not (edges & ~covered).any()


DTYPES = [F32, F16, "float64", "int64", ">f4", "<f2", "bool"]


@st.composite
def hostile_files(draw):
    """A valid small input (GQA, maybe decode positions), then 0-3 random mutations: a dataset
    removed, reshaped, retyped, a NaN/Inf planted, positions retyped or pushed out of range."""
    B, N, Hkv, G, D = (draw(st.integers(1, 3)) for _ in range(5))
    Nq = draw(st.sampled_from([N, draw(st.integers(1, N))]))
    dtype = draw(st.sampled_from([F32, F16]))
    rng = np.random.default_rng(draw(st.integers(0, 99)))
    data = {"q": rng.standard_normal((B, Nq, Hkv * G, D)).astype(dtype),
            "k": rng.standard_normal((B, N, Hkv, D)).astype(dtype),
            "v": rng.standard_normal((B, N, Hkv, D)).astype(dtype)}
    if Nq != N or draw(st.booleans()):
        data["q_positions"] = np.sort(rng.choice(N, Nq, replace=False)).astype(np.int64)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(data)))
        arr, kind = data[name], draw(st.sampled_from(["drop", "shape", "dtype", "value"]))
        if kind == "drop":
            del data[name]
            if not data:
                break
        elif kind == "shape":
            shape = list(arr.shape)
            if shape and draw(st.booleans()):
                shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 4))
            else:
                shape = shape + [1] if draw(st.booleans()) else shape[1:]
            data[name] = np.resize(arr, shape).astype(arr.dtype)
        elif kind == "dtype":
            data[name] = arr.astype(draw(st.sampled_from(DTYPES + ["int8", "uint32"])))
        elif arr.size:
            arr = arr.copy()
            if arr.dtype.kind == "f":
                with np.errstate(over="ignore"):  # 1e30 in float16 is inf, on purpose
                    arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
            else:
                bad = np.array(draw(st.sampled_from([-1, N, 2**40])))
                arr.flat[draw(st.integers(0, arr.size - 1))] = bad.astype(arr.dtype)  # wraps if narrow
            data[name] = arr
    return data


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(hostile_files(), st.sampled_from(["causal", "full", "window:1+global:1"]))
def test_random_files_run_or_fail_with_one_clear_error(capsys, datasets, spec):
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "in.h5", Path(d) / "out.h5"
        with h5py.File(inp, "w") as f:
            for name, arr in datasets.items():
                f[name] = arr
        capsys.readouterr()
        status = main(["run", str(inp), str(out), "--mask", spec])
        err = capsys.readouterr().err
        if status == 0:
            assert "Traceback" not in err
            assert main(["verify", str(inp), str(out)]) == 0
        else:
            lines = err.strip().splitlines()
            assert status == 1 and len(lines) == 1 and lines[0].startswith("hpcattn: error: input"), err
            assert not out.exists() and not list(Path(d).glob("out.h5.tmp-*"))


def test_damaged_files_give_hpcattn_error_never_anything_else(tmp_path):
    """300 copies of a valid file with random bytes overwritten (mostly in the metadata)."""
    good = tmp_path / "good.h5"
    generate(good, 40, heads=2, head_dim=8)
    src, rng = good.read_bytes(), np.random.default_rng(2026)
    outcomes = {"refused": 0, "read": 0}
    for _ in range(300):
        b = bytearray(src)
        for _ in range(rng.integers(1, 20)):
            b[rng.integers(0, 4096 if rng.random() < 0.8 else len(b))] = rng.integers(0, 256)
        (tmp_path / "bad.h5").write_bytes(bytes(b))
        try:
            meta = h5io.read_meta(tmp_path / "bad.h5")
            h5io.read_shard(tmp_path / "bad.h5", meta, (0, meta["Nq"]), (0, meta["N"]))
            outcomes["read"] += 1  # the damage hit unused bytes or stayed finite data
        except HpcattnError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100, outcomes


@pytest.mark.parametrize("args, words", [
    (["--seq", "100000000000"], "GiB free"),
    (["--seq", "10", "--heads", "3", "--kv-heads", "2"], "multiple of --kv-heads"),
    (["--seq", "0"], "--seq must be >= 1"),
    (["--seq", "10", "--queries", "11"], "cannot exceed --seq"),
    (["--seq", "10", "--mask", "windw:3"], "unknown term"),
])
def test_gen_refuses_absurd_arguments_before_writing(tmp_path, args, words):
    codes, err = run_each_rank(2, "gen", tmp_path / "g.h5", *args)
    assert all(codes) and err.count("hpcattn: error") == 1 and words in err, err
    assert not (tmp_path / "g.h5").exists()
    codes, err = run_each_rank(1, "gen", tmp_path / "no_dir" / "g.h5", "--seq", "10")
    assert all(codes) and "does not exist" in err


VERIFY_DAMAGE = {
    "no_scale_attr": ("del f.attrs['scale']", "can't locate attribute: 'scale'"),
    "text_scale": ("f.attrs['scale'] = 'abc'", "could not convert string to float"),
    "bad_mask_attr": ("f.attrs['mask'] = 'windw:3'", "unknown term 'windw:3'"),
    "nan_in_o": ("f['o'][0, 3, 0, 0] = np.nan", "o max rel err inf"),
    "no_lse": ("del f['lse']", "dataset 'lse' missing"),
    "complete_2": ("f.attrs['complete'] = 2", "not a complete result"),
    "o_transposed": ("o = f['o'][...]; del f['o']; f['o'] = o.transpose(0, 2, 1, 3)", "dataset 'o' missing or not shaped"),
}


@pytest.mark.parametrize("case", sorted(VERIFY_DAMAGE))
def test_verify_refuses_damaged_results(tmp_path, capsys, case):
    code, words = VERIFY_DAMAGE[case]
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    generate(inp, 50, heads=2, head_dim=8)
    assert main(["run", str(inp), str(out), "--mask", "causal"]) == 0
    with h5py.File(out, "r+") as f:
        exec(code, {"f": f, "np": np})
    capsys.readouterr()
    assert main(["verify", str(inp), str(out)]) == 1
    captured = capsys.readouterr()
    assert words in captured.err + captured.out and "Traceback" not in captured.err


# ---------------------------------------------------------------- explicit (CSR) masks
def check_csr(indptr, indices, n_keys, row0=0, n_rows=None):
    """Check a whole CSR (n_rows None), or rows as a rank reads them (indices sliced to those
    rows), with the mask's own validator."""
    indptr, indices = np.asarray(indptr), np.asarray(indices)
    if n_rows is not None and row0 == 0:
        indices = indices[:indptr[-1]]
    return masks.check_csr(indptr, indices, n_keys, row0=row0)


BAD_CSR = {
    "unsorted": (([0, 3, 5], [0, 2, 1, 0, 4], 6), "unsorted column 1 in row 0"),
    "duplicate": (([0, 2, 4], [0, 1, 3, 3], 6), "duplicate column 3 in row 1"),
    "negative": (([0, 1, 2], [0, -1], 6), "out of range: -1 in row 1"),
    "out_of_range": (([0, 1, 2], [0, 6], 6), "out of range: 6 in row 1"),
    "indptr_decreasing": (([0, 2, 1, 3], [0, 1, 2], 6), "never decrease (row 1)"),
    "indptr_past_nnz": (([0, 1, 9], [0, 1], 6), "ends at 9 but mask/indices has 2 entries"),
    "indptr_negative": (([0, -1, 2], [0, 1], 6), "never decrease (row 0)"),
    "indptr_not_from_0": (([1, 2, 2], [0, 1], 6), "(starts at 1)"),
    "indptr_short_of_nnz": (([0, 1, 1], [0, 1], 6), "ends at 1 but mask/indices has 2 entries"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSR))
def test_bad_csr_is_refused_naming_the_problem(case):
    (indptr, indices, n_keys), words = BAD_CSR[case]
    with pytest.raises(HpcattnError) as e:
        check_csr(indptr, indices, n_keys)
    assert words in str(e.value)


@pytest.mark.parametrize("indptr, indices, words", [
    (np.zeros(3, "int64"), np.zeros(0, "int64"), "must have 4 entries"),
    (np.zeros((4, 1), "int64"), np.zeros(0, "int64"), "indptr must be 1-D"),
    (np.zeros(4, "int64"), np.zeros(0, "float32"), "indices must hold integers"),
])
def test_bad_csr_layout_is_refused(indptr, indices, words):
    with pytest.raises(HpcattnError, match=words):
        masks.check_csr(indptr, indices, 6, n_rows_total=3)


@st.composite
def csr_and_damage(draw):
    n_rows, n_keys = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    rows = [sorted(draw(st.sets(st.integers(0, n_keys - 1), max_size=n_keys))) for _ in range(n_rows)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.array([j for r in rows for j in r], dtype=np.int64)
    return indptr, indices, n_keys, draw(st.integers(0, 5)), draw(st.integers(0, 10**6))


@settings(max_examples=400, deadline=None)
@given(csr_and_damage())
def test_csr_checks_accept_valid_and_refuse_damaged_masks_by_rows(case):
    """Valid CSRs pass whole and split at any row (as ranks see them); one damaged entry is
    refused (or is still a valid CSR, which the check recomputes independently)."""
    indptr, indices, n_keys, damage, seed = case
    check_csr(indptr, indices, n_keys)
    cut = seed % len(indptr)
    check_csr(indptr[:cut + 1], indices, n_keys, n_rows=len(indptr) - 1)
    check_csr(indptr[cut:], indices[indptr[cut]:], n_keys, row0=cut, n_rows=len(indptr) - 1)
    if not damage or not indices.size:
        return
    rng = np.random.default_rng(seed)
    bad_ptr, bad_idx = indptr.copy(), indices.copy()
    if damage == 1:
        bad_idx[rng.integers(indices.size)] = rng.integers(-2, n_keys + 2)
    elif damage == 2:
        bad_ptr[rng.integers(len(indptr))] += rng.choice([-1, 1])
    else:
        bad_idx = rng.permutation(bad_idx)
    rows = [bad_idx[a:b] for a, b in zip(bad_ptr[:-1], bad_ptr[1:])] if (np.diff(bad_ptr) >= 0).all() else None
    valid = (bad_ptr[0] == 0 and bad_ptr[-1] == bad_idx.size and rows is not None
             and all(((r >= 0) & (r < n_keys)).all() and (np.diff(r) > 0).all() for r in rows))
    if valid:
        check_csr(bad_ptr, bad_idx, n_keys)
    else:
        with pytest.raises(HpcattnError):
            check_csr(bad_ptr, bad_idx, n_keys)


def test_error_messages_are_one_line():
    assert str(HpcattnError("cannot open 'x' (HDF5 says:\n  bad\nthings)")) == "cannot open 'x' (HDF5 says: bad things)"
