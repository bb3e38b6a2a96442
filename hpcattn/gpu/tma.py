"""Tensor maps for the Hopper backward's TMA loads (kernels/wgmma.cuh, TmaMaps): q, k, v and do
as 4-D arrays (columns, rows, heads, batch) of 2-byte elements, boxes of 64 columns (128 bytes,
the 128-byte swizzle) by the kernel's tile rows, rows past the end read as zeros. Encoded by the
driver's cuTensorMapEncodeTiled through ctypes (CuPy binds no tensor-map call), once per shape
and array addresses: a training loop that reuses its buffers encodes nothing after its first
step."""
import ctypes

import numpy as np

from ..errors import HpcattnError

MAPS = np.dtype("V512")  # TmaMaps: four CUtensorMap of 128 bytes, passed by value
_DTYPES = {"__half": 6, "__nv_bfloat16": 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16, _BFLOAT16
_SWIZZLE_128B, _L2_256B = 3, 3
_KEEP = 8  # address sets kept per shape (more: the cache starts again)
_encode = None


def _encoder():
    """cuTensorMapEncodeTiled from the driver library, loaded once."""
    global _encode
    if _encode is None:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
        except (OSError, AttributeError) as e:
            raise HpcattnError(f"the Hopper backward loads by TMA and needs the CUDA driver's "
                               f"cuTensorMapEncodeTiled: {e}") from e
        u32, u64 = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64, u64, u32, u32,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        _encode = fn
    return _encode


def layout(shape, strides, item):
    """(extents, byte strides) of a (batch, heads, rows, D) array with row_strides' element
    strides (bs, hs, rs) as a tensor map's columns, rows, heads, batch; a stride that row_strides
    gives as 0 (an extent of 1) becomes one past the inner dimensions' span, since the driver
    takes no zero."""
    B, H, n, D = shape
    bs, hs, rs = strides
    rs = rs or D
    hs = hs or max(n * rs, D)
    bs = bs or max(H * hs, n * rs, D)
    return (D, n, H, B), tuple(item * s for s in (rs, hs, bs))


class TensorMaps:
    """The four tensor maps (q, k, v, do) of one launch shape: q and do (B, Hkv G, nq, D) with
    element strides sq in boxes of 64 rows, k and v (B, Hkv, nk, D) with sk in boxes of
    `key_rows` rows (the block's keys); called with the arrays (or their addresses), the TmaMaps
    argument as a 512-byte numpy array."""

    def __init__(self, ctype, q_shape, nk, sq, sk, key_rows, encode=None):
        B, Hkv, G, nq, D = q_shape
        self.dtype, self.encode = _DTYPES[ctype], encode
        self.q = (*layout((B, Hkv * G, nq, D), sq, 2), (64, 64, 1, 1))
        self.k = (*layout((B, Hkv, nk, D), sk, 2), (64, key_rows, 1, 1))
        self.cache = {}

    def __call__(self, q, k, v, do):
        ptrs = tuple(x if isinstance(x, int) else x.data.ptr for x in (q, k, v, do))
        maps = self.cache.get(ptrs)
        if maps is None:
            if len(self.cache) >= _KEEP:
                self.cache.clear()
            buf = np.zeros(MAPS.itemsize + 64, np.uint8)  # the driver writes a map only at a 64-byte aligned address
            raw = buf[-buf.ctypes.data % 64:][:MAPS.itemsize]
            for i, (name, ptr, (dims, strides, box)) in enumerate(zip(("q", "k", "v", "do"), ptrs,
                                                                      (self.q, self.k, self.k, self.q))):
                self._encode_one(raw[128 * i:128 * (i + 1)], name, ptr, dims, strides, box)
            maps = raw.copy().view(MAPS)
            self.cache[ptrs] = maps
        return maps

    def _encode_one(self, out, name, ptr, dims, strides, box):
        encode = self.encode or _encoder()
        u32, u64 = ctypes.c_uint32 * 4, ctypes.c_uint64
        err = encode(out.ctypes.data, self.dtype, 4, ctypes.c_void_p(ptr), (u64 * 4)(*dims), (u64 * 3)(*strides),
                     u32(*box), u32(1, 1, 1, 1), 0, _SWIZZLE_128B, _L2_256B, 0)
        if err:
            raise HpcattnError(f"the Hopper backward cannot read {name} by TMA (cuTensorMapEncodeTiled error {err}: "
                               f"address {ptr:#x}, extents {dims}, byte strides {strides}, box {box})")
