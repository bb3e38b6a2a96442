"""bfloat16 end to end through HDF5 files: gen -> run (P = 1, 3; in core and out of core) ->
verify, the stored layout, bit-exact round trips, and what plain h5py sees.

Files are re-read from disk; the reference is float64 on the bfloat16 values.
"""
import h5py
import numpy as np
import pytest

from helpers import hpcattn, mpiexec, read_result as read
from hpcattn.commands.cli import main
from hpcattn.commands.gen import generate
from hpcattn.io import h5io
from hpcattn.io.outofcore import Source
from hpcattn.masks import parse
from hpcattn.reference import errors, grad_tolerance, reference, tolerance

BF16 = h5io.BF16
SPEC = "causal+window:40+global:2"
SHAPE = dict(seq=601, batch=2, heads=2, kv_heads=1, head_dim=16)


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "bf16.h5"
    assert main(["gen", str(path), "--seq", "601", "--batch", "2", "--heads", "2", "--kv-heads", "1",
                 "--head-dim", "16", "--dtype", "bfloat16", "--seed", "4", "--backward"]) == 0
    return path


def generated(name, seed=4):
    """What gen's generator draws for dataset `name` of SHAPE, rounded to bfloat16."""
    index = {"q": 0, "k": 1, "v": 2, "do": 3}[name]
    heads = SHAPE["heads"] if name in ("q", "do") else SHAPE["kv_heads"]
    shape = (SHAPE["batch"], SHAPE["seq"], heads, SHAPE["head_dim"])
    return np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32).astype(BF16)


def bits(a):
    return np.asarray(a).view(np.uint16)


def test_the_file_holds_the_bf16_layout_and_the_generators_bits(inp):
    with h5py.File(inp, "r") as f:
        for name in ("q", "k", "v", "do"):
            tid = f[name].id.get_type()
            assert isinstance(tid, h5py.h5t.TypeFloatID) and tid.get_size() == 2
            assert tid.get_fields() == (15, 7, 8, 0, 7) and tid.get_ebias() == 127
            assert tid.get_order() == h5py.h5t.ORDER_LE
            assert h5io.stored_dtype(f[name]) == BF16
            assert np.array_equal(bits(h5io.read(f[name])), bits(generated(name)))
            # plain h5py: HDF5 converts to float32, the same values
            plain = f[name][...]
            assert plain.dtype == np.float32
            assert np.array_equal(plain, generated(name).astype(np.float32))
        assert f.attrs["dtype"] == "bfloat16"
    assert h5io.read_meta(str(inp), need_do=True)["dtype"] == BF16


def test_special_values_round_trip_bit_for_bit(tmp_path):
    """Every bfloat16 bit pattern (NaN payloads, +-Inf, -0, subnormals) through create/write/read,
    contiguous and chunked with gzip, and through selections."""
    every = np.arange(1 << 16, dtype=np.uint16).view(BF16).reshape(1, 1 << 12, 1, 16)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        for name, kw in (("plain", {}), ("gzip", {"chunks": (1, 512, 1, 16), "compression": "gzip"})):
            ds = h5io.create(f, name, every.shape, BF16, **kw)
            h5io.write(ds, np.s_[:, :2048], every[:, :2048])
            h5io.write(ds, np.s_[:, 2048:], every[:, 2048:])
    with h5py.File(tmp_path / "x.h5", "r") as f:
        for name in ("plain", "gzip"):
            assert np.array_equal(bits(h5io.read(f[name])), bits(every))
            idx = np.array([0, 5, 4095])
            assert np.array_equal(bits(h5io.read(f[name], np.s_[:, idx])), bits(every[:, idx]))
            assert h5io.read(f[name], np.s_[:, 7:7]).shape == (1, 0, 1, 16)
            assert h5io.native_bytes(f[name]) == BF16


def test_out_of_core_source_reads_bf16_bytes_exactly(inp):
    meta = h5io.read_meta(str(inp))
    src = Source(str(inp), meta)
    try:
        assert "q" in src.raw  # gen writes contiguous datasets: the preadv path
        assert np.array_equal(bits(src.rows("q", 100, 300)), bits(generated("q")[:, 100:300]))
    finally:
        src.close()


def check_against_reference(inp, out):
    o, lse, attrs, _ = read(out)
    with h5py.File(out, "r") as f:
        assert h5io.stored_dtype(f["o"]) == BF16
        o = h5io.read(f["o"])
    q, k, v = (generated(n) for n in ("q", "k", "v"))
    o_ref, lse_ref = reference(q, k, v, np.arange(SHAPE["seq"]), parse(SPEC).bind(n_keys=SHAPE["seq"]),
                               attrs["scale"])
    o_err, lse_err, ok = errors(o, lse, o_ref, lse_ref)
    o_tol, lse_tol = tolerance("bfloat16")
    assert ok and o_err <= o_tol and lse_err <= lse_tol, (o_err, lse_err)
    return o, attrs


@pytest.mark.parametrize("P", [1, 3])
def test_gen_run_verify_forward(inp, tmp_path, P):
    out = tmp_path / "o.h5"
    res = mpiexec(P, "run", inp, out, "--mask", SPEC)
    assert res.returncode == 0, res.stderr
    _, attrs = check_against_reference(inp, out)
    assert attrs["complete"] == 1 and attrs["ranks"] == P and not attrs.get("out_of_core", 0)
    res = hpcattn("verify", inp, out)
    assert res.returncode == 0 and "PASS" in res.stdout and "tol 3e-02" in res.stdout, res.stdout


@pytest.mark.parametrize("P", [1, 3])
def test_gen_run_verify_backward(inp, tmp_path, P):
    out = tmp_path / "g.h5"
    res = mpiexec(P, "run", inp, out, "--mask", SPEC, "--backward")
    assert res.returncode == 0, res.stderr
    with h5py.File(out, "r") as f:
        assert all(h5io.stored_dtype(f[n]) == BF16 for n in ("o", "dq", "dk", "dv"))
    res = hpcattn("verify", inp, out)
    assert res.returncode == 0 and "PASS" in res.stdout and "dq/dk/dv" in res.stdout, res.stdout
    assert f"(tol {grad_tolerance('bfloat16'):.0e})" in res.stdout


@pytest.mark.parametrize("P", [1, 2])
def test_out_of_core_run_of_a_bf16_file(inp, tmp_path, P):
    """A small memory budget streams the bf16 input in chunks; o stays bf16 and within the
    bf16 tolerance, and compressed output holds the same bits."""
    out, gz = tmp_path / "ooc.h5", tmp_path / "ooc-gz.h5"
    res = mpiexec(P, "run", inp, out, "--mask", SPEC, "--max-memory", "64K")
    assert res.returncode == 0, res.stderr
    o, attrs = check_against_reference(inp, out)
    assert attrs["out_of_core"] == 1
    assert hpcattn("verify", inp, out).returncode == 0
    assert mpiexec(P, "run", inp, gz, "--mask", SPEC, "--max-memory", "64K", "--compress", "gzip").returncode == 0
    with h5py.File(gz, "r") as f:
        assert f["o"].compression == "gzip" and np.array_equal(bits(h5io.read(f["o"])), bits(o))


def test_bench_takes_bfloat16():
    assert main(["bench", "--seq", "300", "--mask", "window:8", "--head-dim", "16", "--dtype", "bfloat16",
                 "--repeat", "0", "--json"]) == 0


def test_gen_bfloat16_keywords_match_the_command_line(tmp_path):
    generate(tmp_path / "a.h5", 601, batch=2, heads=2, kv_heads=1, head_dim=16, dtype="bfloat16", seed=4)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert np.array_equal(bits(h5io.read(f["k"])), bits(generated("k")))
