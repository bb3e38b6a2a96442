"""hpcattn.torch at P ranks: a sharded training step's gradients against PyTorch's SDPA in
float64 over the whole sequence (run under mpiexec -n P ... -m mpi), on CPU tensors and, where
PyTorch sees a GPU and CuPy is installed, on CUDA tensors (ranks may share the GPU)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import hpcattn.torch as ht  # noqa: E402
from helpers import leaves, rel, sdpa, world  # noqa: E402
from hpcattn.partition import positions, segments  # noqa: E402
from hpcattn.reference import grad_tolerance, tolerance  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]


def on(dev):
    """dev, or a skip saying why CUDA tensors cannot be tried here."""
    if dev == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("CUDA TENSORS NOT TRIED: PyTorch sees no GPU")
        pytest.importorskip("cupy", reason="CUDA TENSORS NOT TRIED: hpcattn's GPU backend needs CuPy")
    return dev


@pytest.mark.parametrize("variant,layout", [("ring", "contiguous"), ("burst", "zigzag"),
                                            ("sparse", "contiguous"), ("auto", "zigzag")])
@pytest.mark.parametrize("spec,dtype", [("causal+window:40", "bfloat16"), ("window:30+global:2", "float32"),
                                        ("block:50+causal", "float16"), ("full", "float32")])
@pytest.mark.parametrize("dev", ["cpu", "cuda"])
def test_sharded_gradients_match_sdpa(variant, layout, spec, dtype, dev):
    dev = on(dev)
    comm = world()
    P, r = comm.size, comm.rank
    B, N, H, Hkv, D = 1, 203, 4, 2, 32  # D = 32: the tensor-core kernels take half precision on a GPU
    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    Q, K, V = leaves([(B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, D)], dt, 7)  # the same on every rank
    DO = torch.randn(Q.shape, generator=torch.Generator().manual_seed(8)).to(dt)
    mine = torch.from_numpy(positions(segments(N, P, r, layout)))
    q, k, v = (x.detach()[:, mine].clone().to(dev).requires_grad_() for x in (Q, K, V))
    o = ht.attention(q, k, v, mask=spec, comm=comm, variant=variant, layout=layout)
    assert o.device.type == dev
    (o.float() * DO[:, mine].to(dev).float()).sum().backward()
    ref = [x.detach().double().requires_grad_() for x in (Q, K, V)]
    o_ref = sdpa(*ref, spec, np.arange(N), N)
    (o_ref * DO.double()).sum().backward()
    assert rel(o.cpu(), o_ref[:, mine]) <= tolerance(dtype)[0]
    for x, x_ref in zip((q, k, v), ref):
        assert x.grad.device.type == dev and x.grad.dtype == dt
        assert rel(x.grad.cpu(), x_ref.grad[:, mine]) <= grad_tolerance(dtype)
