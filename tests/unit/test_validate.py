"""validate.values: NaN, Inf and huge magnitudes found on bit patterns, a block at a time."""
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from hpcattn.errors import HpcattnError
from hpcattn.io import validate

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("value, words", [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (-np.inf, "NaN or Inf"),
                                          (-3e19, "values beyond"), (2e18, "values beyond")])
@pytest.mark.parametrize("block", [validate.CHECK_ELEMS, 37])  # 37: blocks that cut rows
def test_a_bad_value_is_found_at_its_row(monkeypatch, dtype, value, words, block):
    monkeypatch.setattr(validate, "CHECK_ELEMS", block)
    if dtype is np.float16 and np.isfinite(value):
        words = "NaN or Inf"  # beyond float16's range: stored as Inf
    x = np.ones((2, 50, 3, 4), dtype)
    with np.errstate(over="ignore"):
        x[1, 41, 2, 3] = value
    with pytest.raises(HpcattnError, match=f"in.h5'?: k holds {words}.*first at row {41 + 100}"):
        validate.values("in.h5", "k", x, 100)


@pytest.mark.parametrize("dtype", [">f2", ">f4", ">f8"])
def test_big_endian_values_are_checked_as_numbers(dtype):
    """Files may store big-endian floats (h5py reads them so): ordinary values pass, a bad
    one is found at its row (bit patterns compare only in the machine's byte order)."""
    x = np.random.default_rng(0).standard_normal((1, 30, 2, 4)).astype(dtype)
    validate.values("in.h5", "k", x, 0)
    x[0, 17, 1, 2] = np.nan
    with pytest.raises(HpcattnError, match="k holds NaN or Inf.*first at row 17"):
        validate.values("in.h5", "k", x, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float16", "bfloat16", "float32"])
def test_the_largest_allowed_magnitudes_pass(dtype):
    top = min(validate.MAX_ABS, float(np.finfo(dtype).max))
    x = np.array([[[[0.0, -0.0, top, -top, 1e-40]]]]).astype(dtype)
    x[np.abs(x.astype(np.float64)) > validate.MAX_ABS] = 0  # rounded past the limit
    validate.values("in.h5", "q", x, 0)


def test_no_temporary_the_size_of_the_array():
    x = np.random.default_rng(0).standard_normal((1, 1 << 18, 4, 64)).astype(np.float16)  # 128 MiB
    tracemalloc.start()
    validate.values("in.h5", "q", x, 0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak <= 2 * validate.CHECK_ELEMS * x.itemsize + (64 << 10)
