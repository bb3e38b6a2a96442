"""The GPU's float32 reduction rate into global memory in the one-pass backward's dq patterns
(kernels/bwd_keys.cuh), alone: the ceiling its dq adds run against. Each item adds a 64-row x
64-column float32 slice into a head-major dq buffer of --mb MiB (rows of --dim floats), items
spread over the buffer as key blocks spread over query tiles; three ways:
  red2  red.global.add.v2.f32 from registers in the MMA accumulator layout (the default red path:
        lane (g, tq) adds rows g, g + 8 of its warp's 16, columns 8j + 2tq);
  red4  red.global.add.v4.f32, a warp adding 2 rows of 64 columns per instruction (whole lines);
  bulk  cp.reduce.async.bulk of 256-byte rows from shared memory (the BULK path), one lane per row.
Prints a JSON line per way: float32 bytes added, milliseconds (CUDA events, median of --rounds),
GB/s. Causal 16K, D = 128, 8 heads at 64 x 64 slices adds about 4.3 GB of dq (131K items of 64 x
128) in the one-pass kernel's 3.33 ms (2026-12-05).

    PYTHONPATH=$PWD python3 jobs/red_rate.py [--mb 64] [--dim 128] [--items 262144] [--rounds 5]
"""
import argparse
import json

import cupy as cp
import numpy as np

SRC = r"""
// item i adds into the slice at rows (i * 7919 % nt) * 64, columns (i % (dim / 64)) * 64
__device__ __forceinline__ float* slice_at(float* dq, int i, int nt, int dim) {
    return dq + (size_t)((long long)i * 7919 % nt) * 64 * dim + (i % (dim / 64)) * 64;
}
extern "C" __global__ void red2(float* dq, int items, int nt, int dim) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    for (int i = blockIdx.x; i < items; i += gridDim.x) {  // 4 warps of 16 rows
        float* base = slice_at(dq, i, nt, dim) + (size_t)(16 * warp) * dim + 2 * tq;
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < 8; ++j)
                asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" :: "l"(base + (size_t)(g + 8 * h) * dim + 8 * j),
                             "f"(1.f), "f"(1.f) : "memory");
    }
}
extern "C" __global__ void red4(float* dq, int items, int nt, int dim) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = blockIdx.x; i < items; i += gridDim.x) {  // 4 warps of 16 rows, 2 rows an instruction
        float* base = slice_at(dq, i, nt, dim) + (size_t)(16 * warp + (lane >> 4)) * dim + 4 * (lane & 15);
#pragma unroll
        for (int r = 0; r < 16; r += 2)
            asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(base + (size_t)r * dim),
                         "f"(1.f), "f"(1.f), "f"(1.f), "f"(1.f) : "memory");
    }
}
extern "C" __global__ void bulk(float* dq, int items, int nt, int dim) {
    __shared__ __align__(128) float rows[64 * 64];
    for (int k = threadIdx.x; k < 64 * 64; k += blockDim.x) rows[k] = 1.f;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = blockIdx.x; i < items; i += gridDim.x) {  // lanes 0-15 of 4 warps, a row each
        if (lane < 16) {
            const int r = 16 * warp + lane;
            float* dst = slice_at(dq, i, nt, dim) + (size_t)r * dim;
            asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], 256;"
                         :: "l"(dst), "r"((unsigned)__cvta_generic_to_shared(rows + 64 * r)) : "memory");
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        }
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64, help="the dq buffer's MiB")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--items", type=int, default=262144)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    nt = a.mb * 2**20 // (64 * a.dim * 4)  # 64-row tiles in the buffer
    dq = cp.zeros(nt * 64 * a.dim, dtype=cp.float32)
    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    blocks = cp.cuda.Device().attributes["MultiProcessorCount"] * 8
    nbytes = a.items * 64 * 64 * 4
    for way in ("red2", "red4", "bulk"):
        fn = mod.get_function(way)
        dq.fill(0)
        args = (dq, np.int32(a.items), np.int32(nt), np.int32(a.dim))
        fn((blocks,), (128,), args)  # warm-up, and the check: every float added once per item that hits it
        cp.cuda.runtime.deviceSynchronize()
        want = nbytes // 4
        got = int(dq.sum(dtype=cp.float64))
        times = []
        for _ in range(a.rounds):
            s, e = cp.cuda.Event(), cp.cuda.Event()
            s.record()
            fn((blocks,), (128,), args)
            e.record()
            e.synchronize()
            times.append(cp.cuda.get_elapsed_time(s, e))
        ms = float(np.median(times))
        print(json.dumps({"way": way, "dq_MiB": a.mb, "dim": a.dim, "items": a.items, "bytes": nbytes,
                          "ms": round(ms, 4), "GB/s": round(nbytes / ms / 1e6, 1), "adds_ok": got == want}),
              flush=True)


if __name__ == "__main__":
    main()
