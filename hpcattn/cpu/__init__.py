"""The CPU kernels' Python side: the local forward kernel (`local`), its backward (`grad`), the
compiled gather and band kernels of kernels/gather.c loaded with ctypes (`cgather`, built by
setup.py as `_gather*.so` beside it), and the optional numba widening (`jit`)."""
