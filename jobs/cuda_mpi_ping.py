"""Device buffers straight through MPI, without hpcattn: is this MPI CUDA-aware in practice?

Run under mpiexec with 2 ranks (they may share one GPU):

  mpiexec -n 2 python3 jobs/cuda_mpi_ping.py [--sizes-mib 1,64,512] [--repeat 5]

Checks, on CuPy arrays of random data: a device-to-device Send/Recv arrives intact, an
Allreduce(SUM) and (MAX) of device buffers gives NumPy's result (Open MPI runs reductions on the
host: its coll/cuda component stages them), and times rank 0 -> rank 1 for each size three ways:
device buffers handed to MPI, staging through pinned host memory (copy out, MPI, copy in, as
hpcattn's `host` transport does), and host buffers alone. Prints one table on rank 0; exits 1
if any check fails. MPIX_Query_cuda_support is printed first (Open MPI's answer, 1 = built with
CUDA support).
"""
import argparse
import ctypes
import sys
import time

import cupy as cp
import cupyx
import numpy as np
from mpi4py import MPI


def query():
    try:
        lib = ctypes.CDLL(MPI.__file__)
        return int(lib.MPIX_Query_cuda_support())
    except (OSError, AttributeError):
        return None


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        MPI.COMM_WORLD.Barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mib", default="1,64,512")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    r, P = comm.Get_rank(), comm.Get_size()
    if P != 2:
        raise SystemExit("run with 2 ranks")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cp.cuda.Device(local.Get_rank() % cp.cuda.runtime.getDeviceCount()).use()
    stream = cp.cuda.Stream(non_blocking=True)
    stream.use()  # like hpcattn: compute on a non-blocking stream, synchronised before MPI
    ok = True
    if r == 0:
        print(f"MPI: {MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"MPIX_Query_cuda_support: {query()}")
        print(f"GPU: {cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)['name'].decode()}, "
              f"ranks on device {cp.cuda.Device().id}: {local.Get_size()}")
    # correctness: random data, a different seed per rank
    rng = np.random.default_rng(7 + r)
    host = rng.standard_normal(3_000_001).astype(np.float32)
    x = cp.asarray(host)
    got = cp.full_like(x, np.nan)
    stream.synchronize()
    if r == 0:
        comm.Send(x, dest=1, tag=1)
        comm.Recv(got, source=1, tag=2)
    else:
        comm.Recv(got, source=0, tag=1)
        comm.Send(x, dest=0, tag=2)
    other = np.random.default_rng(7 + 1 - r).standard_normal(3_000_001).astype(np.float32)
    ok &= bool(np.array_equal(got.get(), other))
    for name, op, ref in (("SUM", MPI.SUM, np.add), ("MAX", MPI.MAX, np.maximum)):
        out = cp.empty_like(x)
        stream.synchronize()
        comm.Allreduce(x, out, op=op)
        want = ref(host, other) if r == 0 else ref(other, host)
        good = bool(np.allclose(out.get(), want, rtol=1e-6, atol=0))
        ok &= good
        if r == 0:
            print(f"Allreduce({name}) of device buffers: {'ok' if good else 'WRONG'}")
    ok = comm.allreduce(ok, op=MPI.LAND)
    if r == 0:
        print(f"Send/Recv of device buffers, random data both ways: {'ok' if ok else 'WRONG'}")
        print("| MiB | device buffers to MPI GB/s | staged through pinned host GB/s | host buffers GB/s |")
        print("|---|---|---|---|")
    for mib in map(int, a.sizes_mib.split(",")):
        n = mib << 18  # float32 elements
        d = cp.asarray(np.random.default_rng(mib).standard_normal(n, dtype=np.float32))
        pin = cupyx.empty_pinned((n,), np.float32)
        h = np.empty(n, np.float32)
        stream.synchronize()

        def send_recv(buf):
            if r == 0:
                comm.Send(buf, dest=1)
            else:
                comm.Recv(buf, source=0)

        def device():
            send_recv(d)

        def staged():
            if r == 0:
                d.get(stream=stream, out=pin)
                stream.synchronize()
                comm.Send(pin, dest=1)
            else:
                comm.Recv(pin, source=0)
                d.set(pin, stream=stream)
                stream.synchronize()

        def plain():
            send_recv(h)
        device()  # first use: CUDA IPC handles, registrations
        row = [mib] + [n * 4 / timed(fn, a.repeat) / 1e9 for fn in (device, staged, plain)]
        if r == 0:
            print("| {} | {:.1f} | {:.1f} | {:.1f} |".format(*row), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
