"""hpcattn for PyTorch (the `torch` extra): attention on tensors, with autograd.

`attention(q, k, v, mask=..., comm=...)` takes this rank's rows as tensors (B, N, H, D) on the
CPU or a CUDA device, float32, float16 or bfloat16, and returns o as a tensor whose backward
calls hpcattn's (any variant, any number of ranks of the caller's mpi4py communicator).
Tensors cross to NumPy/CuPy and back through DLPack or the buffer protocol without copies
(bfloat16 as ml_dtypes.bfloat16); on CUDA the kernels run on torch's current stream, so
nothing waits for the device.
"""
import ml_dtypes
import numpy as np
import torch

from . import api

_BF16 = np.dtype(ml_dtypes.bfloat16)


def _array(t):
    """The NumPy (CPU) or CuPy (CUDA) array over t's memory, same strides, no copy."""
    t = t.detach()
    bf16 = t.dtype == torch.bfloat16
    if bf16:
        t = t.view(torch.int16)  # neither buffer protocol nor every DLPack consumer knows bf16
    if t.device.type == "cuda":
        import cupy
        a = cupy.from_dlpack(t)
    else:
        a = t.numpy()
    return a.view(_BF16) if bf16 else a


def _tensor(a):
    """The tensor over a NumPy or CuPy array's memory, no copy."""
    bf16 = a.dtype == _BF16
    if bf16:
        a = a.view(np.int16)
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)
    return t.view(torch.bfloat16) if bf16 else t


class _Stream:
    """CuPy's current stream set to torch's for a CUDA call; nothing on the CPU."""

    def __init__(self, t):
        self.stream = None
        if t.device.type == "cuda":
            import cupy
            self.stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream)

    def __enter__(self):
        if self.stream is not None:
            self.stream.__enter__()

    def __exit__(self, *exc):
        if self.stream is not None:
            self.stream.__exit__(*exc)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kwargs):
        with _Stream(q):
            o, lse = api.attention(_array(q), _array(k), _array(v), **kwargs)
        o, lse = _tensor(o), _tensor(lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.kwargs = kwargs
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        kwargs = {key: val for key, val in ctx.kwargs.items() if key != "stats"}
        with _Stream(q):
            grads = api.attention_backward(*map(_array, (q, k, v, o, lse, do.contiguous())),
                                           **kwargs)
        return (*(_tensor(g) if need else None for g, need in zip(grads, ctx.needs_input_grad)),
                None)


def attention(q, k, v, mask="full", comm=None, variant="auto", layout="contiguous",
              q_positions=None, scale=None, ranks_per_node=None, stats=None, return_lse=False):
    """hpcattn.attention on torch tensors, differentiable in q, k and v (collective).

    q (B, nq, H, D), k, v (B, nk, Hkv, D): this rank's rows, on one device, one dtype of
    float32, float16, bfloat16. Arguments as for `hpcattn.attention`; comm is an mpi4py
    communicator (default COMM_WORLD), which the backward uses too: every rank must run
    backward when one does. Returns o (like q), or (o, lse (B, H, nq) float32) with
    return_lse. The backward returns gradients of the dtype of the inputs.
    """
    kwargs = dict(mask=mask, comm=comm, variant=variant, layout=layout, q_positions=q_positions,
                  scale=scale, ranks_per_node=ranks_per_node, stats=stats)
    o, lse = _Attention.apply(q, k, v, kwargs)
    return (o, lse) if return_lse else o
