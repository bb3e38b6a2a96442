"""hpcattn.gpu.tma without a GPU: what the Hopper backward's tensor maps are asked of the driver
(extents, byte strides, boxes, swizzle, which array in which slot), the cache per addresses, and
a refused encoding named. A fake cuTensorMapEncodeTiled records each call and writes a marker."""
import ctypes

import numpy as np
import pytest

from hpcattn.errors import HpcattnError
from hpcattn.gpu.tma import MAPS, TensorMaps, layout


class FakeEncode:
    """cuTensorMapEncodeTiled's stand-in: records (dtype, rank, address, extents, strides, box,
    element strides, interleave, swizzle, L2 promotion, OOB fill), writes the call's index + 1
    into the map's 128 bytes, returns `fail` for the addresses in it (a CUresult), else 0."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, out, dtype, rank, addr, dims, strides, box, elem, interleave, swizzle, l2, oob):
        assert out % 64 == 0  # the driver's requirement of the map's address
        self.calls.append((dtype, rank, addr.value, list(dims), list(strides), list(box), list(elem), interleave,
                           swizzle, l2, oob))
        ctypes.memmove(out, bytes([len(self.calls)]) * 128, 128)
        return 1 if addr.value in self.fail else 0


# (B, Hkv, G, nq, D) = (2, 3, 2, 100, 64), q contiguous (B, H, nq, D); k (B, Hkv, nk, D) contiguous
Q_SHAPE, NK = (2, 3, 2, 100, 64), 90
SQ = (6 * 100 * 64, 100 * 64, 64)
SK = (3 * 90 * 64, 90 * 64, 64)


def test_layout_gives_columns_rows_heads_batch_and_packs_zero_strides():
    assert layout((2, 6, 100, 64), SQ, 2) == ((64, 100, 6, 2), (128, 12800, 76800))
    # row_strides gives 0 for an extent of 1 (B = 1, one head, one row): the driver takes no zero
    assert layout((1, 1, 1, 128), (0, 0, 0), 2) == ((128, 1, 1, 1), (256, 256, 256))
    # a (B, N, H, D) layout read in place (rows H D apart, heads D apart), B = 1: the batch stride
    # past the rows' span
    assert layout((1, 8, 4096, 128), (0, 128, 8 * 128), 2) == ((128, 4096, 8, 1), (2048, 256, 4096 * 2048))


def test_maps_are_encoded_in_kernel_order_with_their_boxes():
    fake = FakeEncode()
    maps = TensorMaps("__nv_bfloat16", Q_SHAPE, NK, SQ, SK, 128, encode=fake)(0x1000, 0x2000, 0x3000, 0x4000)
    assert maps.dtype == MAPS and maps.nbytes == 512
    q = ([64, 100, 6, 2], [128, 12800, 76800], [64, 64, 1, 1])
    k = ([64, 90, 3, 2], [128, 11520, 34560], [64, 128, 1, 1])
    assert [(c[2], c[3], c[4], c[5]) for c in fake.calls] == [
        (0x1000, *q), (0x2000, *k), (0x3000, *k), (0x4000, *q)]
    # bfloat16 (9), rank 4, unit element strides, no interleave, 128-byte swizzle, 256-byte L2 promotion, zero fill
    assert {(c[0], c[1], tuple(c[6]), *c[7:]) for c in fake.calls} == {(9, 4, (1, 1, 1, 1), 0, 3, 3, 0)}
    # each map in its own 128 bytes: q, k, v, do (TmaMaps' order)
    assert list(maps.view(np.uint8)[::128]) == [1, 2, 3, 4]


def test_float16_maps_and_key_rows_follow_the_kernel_shape():
    fake = FakeEncode()
    TensorMaps("__half", Q_SHAPE, NK, SQ, SK, 64, encode=fake)(1 << 20, 2 << 20, 3 << 20, 4 << 20)
    assert {c[0] for c in fake.calls} == {6}
    assert [c[5][1] for c in fake.calls] == [64, 64, 64, 64]


def test_maps_are_kept_per_addresses():
    fake = FakeEncode()
    tm = TensorMaps("__half", Q_SHAPE, NK, SQ, SK, 128, encode=fake)
    a = tm(16, 32, 48, 64)
    assert tm(16, 32, 48, 64) is a and len(fake.calls) == 4  # a training loop's reused buffers: no encoding
    b = tm(16, 32, 48, 80)
    assert b is not a and len(fake.calls) == 8 and b.view(np.uint8)[0] == 5
    for i in range(8):  # the cache holds at most 8 address sets, then starts again
        tm(16, 32, 48, 96 + 16 * i)
    assert len(tm.cache) <= 8
    tm(16, 32, 48, 64)
    assert len(fake.calls) == 4 * 11  # the first set was dropped with the rest and encoded again


def test_a_refused_encoding_names_the_array():
    tm = TensorMaps("__half", Q_SHAPE, NK, SQ, SK, 128, encode=FakeEncode(fail={0x3008}))
    with pytest.raises(HpcattnError, match=r"cannot read v by TMA .*error 1: address 0x3008"):
        tm(0x1000, 0x2000, 0x3008, 0x4000)
    assert not tm.cache  # nothing kept of a failed set
