"""`hpcattn info`: what this installation will use."""
import os
import platform

import h5py
import numpy as np

from .. import __version__
from ..cpu import cgather
from ..dist.transport import cuda_aware, cuda_aware_word


def blas_name():
    """numpy's BLAS and the kernel set it runs. OpenBLAS picks the set by CPU unless
    OPENBLAS_CORETYPE forces one (e.g. Haswell's AVX2 kernels on an AVX-512 CPU run at about
    half the rate: docs/benchmarks-log.md, "csr, 1% random density"), so a forced set is named as such."""
    from threadpoolctl import threadpool_info
    for lib in threadpool_info():
        if lib.get("user_api") == "blas":
            name = f"{lib.get('internal_api')} {lib.get('version')} {lib.get('architecture') or ''}".strip()
            forced = os.environ.get("OPENBLAS_CORETYPE") if lib.get("internal_api") == "openblas" else None
            return f"{name} (forced by OPENBLAS_CORETYPE={forced})" if forced else name
    return "unknown"


def gpus():
    """(count, names) of CUDA devices seen through CuPy; (0, reason) without them."""
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
        names = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(n)]
        return n, ", ".join(names)
    except Exception as e:  # no cupy, no driver, no device: all mean "no GPU here"
        return 0, f"none ({type(e).__name__})"


def gpu_kernels(cc):
    """The tensor-core kernels that `auto` takes for float16/bfloat16 and the implicit mask terms
    on a device of compute capability cc ("90"; None: no GPU)."""
    if cc is None:
        return "none (no GPU)"
    from ..gpu.shapes import BWD_DIMS, BWD_WG_DIMS, MMA_DIMS, WG_DIMS
    mma = "mma.sync at D = {} (backward {})"
    if cc == "90":
        return (f"Hopper warpgroup MMA at D = {'/'.join(map(str, WG_DIMS))} (backward "
                f"{'/'.join(map(str, BWD_WG_DIMS))}), else " + mma.format(
                    "/".join(str(d) for d in MMA_DIMS if d not in WG_DIMS),
                    "/".join(str(d) for d in BWD_DIMS if d not in BWD_WG_DIMS)))
    return (mma.format("/".join(map(str, MMA_DIMS)), "/".join(map(str, BWD_DIMS)))
            + f" (compute capability {cc[:-1]}.{cc[-1]}; the Hopper kernels need 9.0)")


def compute_capability():
    """Device 0's compute capability as CuPy writes it ("90")."""
    import cupy
    return cupy.cuda.Device(0).compute_capability


def nccl_version():
    """NCCL's version through cupy.cuda.nccl, or None when it is not there."""
    try:
        from cupy.cuda import nccl
        return nccl.get_version() if nccl.available else None
    except Exception:  # no cupy, no libnccl: NCCL is not available
        return None


def auto_transport(n_gpu, aware, nccl):
    """What `--transport auto` picks for device arrays (transport.choose decides per job)."""
    if not n_gpu:
        return "mpi (host arrays; no GPU)"
    return "mpi (CUDA-aware)" if aware else "nccl" if nccl else "host (pinned staging)"


def report():
    from mpi4py import MPI
    n_gpu, gpu_names = gpus()
    aware = cuda_aware()
    return {
        "hpcattn": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas_name(),
        "gather kernel": cgather.describe(),
        "backend": "cupy" if n_gpu else "numpy",
        "mpi library": MPI.Get_library_version().splitlines()[0].strip().strip("\0"),
        "mpi standard": "%d.%d" % MPI.Get_version(),
        "mpi4py": __import__("mpi4py").__version__,
        "cuda-aware mpi": "unknown (library does not say)" if aware is None else cuda_aware_word(),
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "parallel hdf5": "yes" if h5py.get_config().mpi else "no",
        "gpus": f"{n_gpu}: {gpu_names}" if n_gpu else gpu_names,
        "gpu kernels": gpu_kernels(compute_capability() if n_gpu else None),
        "nccl": nccl_version() or "no",
        "transport": auto_transport(n_gpu, aware, nccl_version()),
    }


def add_parser(sub):
    return sub.add_parser("info", help="backend, MPI, CUDA-awareness, parallel HDF5, GPUs")


def cmd_info(args, comm):
    rep = report()
    if comm.rank == 0:
        for key, val in rep.items():
            print(f"{key:>15}: {val}")
        print(f"{'ranks':>15}: {comm.size}")
    return 0
