"""hpcattn.torch on one rank: gradients against PyTorch's SDPA in float64 with the mask as an
explicit boolean matrix, gradcheck, zero-copy in and out, no_grad and partial requires_grad."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from mpi4py import MPI  # noqa: E402

import hpcattn.torch as ht  # noqa: E402
from hpcattn import api  # noqa: E402
from hpcattn.reference import grad_tolerance, tolerance  # noqa: E402
from helpers import leaves, rel, sdpa  # noqa: E402

SPECS = ["full", "causal", "window:40", "causal+window:33", "dilated:2:9", "block:64+causal",
         "global:3+window:20", "random:20", "window:50+global:2+dilated:2:9"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS)
def test_gradients_match_sdpa_in_float64(spec, dtype):
    B, N, H, Hkv, D = 2, 257, 4, 2, 32
    q, k, v = leaves([(B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, D)], DTYPES[dtype], 1)
    o = ht.attention(q, k, v, mask=spec, comm=MPI.COMM_SELF)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(o.dtype)
    (o.float() * do.float()).sum().backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref = sdpa(*ref, spec, np.arange(N), N)
    (o_ref * do.double()).sum().backward()
    assert o.dtype == q.dtype and not torch.isnan(o).any()
    assert rel(o, o_ref) <= tolerance(dtype)[0]
    for x, x_ref in zip((q, k, v), ref):
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        assert rel(x.grad, x_ref.grad) <= grad_tolerance(dtype)


def test_gradcheck_on_a_tiny_case():
    """torch.autograd.gradcheck in float64 around the float32 kernels: hpcattn's backward is
    the Jacobian of its forward."""
    q, k, v = leaves([(1, 9, 2, 4), (1, 9, 1, 4), (1, 9, 1, 4)], torch.float64, 3)

    def f(q, k, v):
        return ht.attention(q.float(), k.float(), v.float(), mask="causal+window:5",
                            comm=MPI.COMM_SELF).double()
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_tensors_cross_without_copies(monkeypatch):
    """The kernel reads the tensors' memory and o is the kernel's output, not a copy."""
    seen = {}
    real = api.attention

    def spy(q, k, v, **kw):
        seen["in"] = (q, k, v)
        seen["out"] = real(q, k, v, **kw)
        return seen["out"]
    monkeypatch.setattr(api, "attention", spy)
    for dtype in DTYPES.values():
        q, k, v = leaves([(1, 64, 2, 16), (1, 64, 2, 16), (1, 64, 2, 16)], dtype, 4)
        o, lse = ht.attention(q, k, v, mask="causal", comm=MPI.COMM_SELF, return_lse=True)
        for t, a in zip((q, k, v), seen["in"]):
            assert a.ctypes.data == t.data_ptr() and a.shape == tuple(t.shape)
        assert o.data_ptr() == seen["out"][0].ctypes.data
        assert lse.data_ptr() == seen["out"][1].ctypes.data and lse.dtype == torch.float32


def test_no_grad_and_gradients_for_some_inputs_only():
    q, k, v = leaves([(1, 80, 2, 16), (1, 80, 1, 16), (1, 80, 1, 16)], torch.float32, 5)
    with torch.no_grad():
        o = ht.attention(q, k, v, mask="window:9", comm=MPI.COMM_SELF)
    assert not o.requires_grad and o.grad_fn is None
    q.requires_grad_(False)
    v.requires_grad_(False)
    ht.attention(q, k, v, mask="window:9", comm=MPI.COMM_SELF).sum().backward()
    assert q.grad is None and v.grad is None and k.grad is not None
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    sdpa(*ref, "window:9", np.arange(80), 80).sum().backward()
    assert rel(k.grad, ref[1].grad) <= 1e-4


def test_a_bad_input_names_the_problem():
    q = torch.zeros(1, 8, 2, 16)
    with pytest.raises(Exception, match="multiple of kv heads"):
        ht.attention(q, torch.zeros(1, 8, 3, 16), torch.zeros(1, 8, 3, 16), comm=MPI.COMM_SELF)
