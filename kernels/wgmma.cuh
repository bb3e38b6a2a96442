// Hopper warpgroup-MMA (wgmma, sm_90a) helpers shared by attend_wgmma.cu's forward and
// attend_bwd_wgmma.cu's backward: shared-memory descriptors in the 128-byte swizzle, the MMAs
// (A from registers or shared memory), their fences, the mbarriers and register moves of
// warp-specialised kernels, and tile loads into swizzle atoms.
#pragma once
#include "tiles.cuh"

// Shared-memory matrix descriptors in the 128-byte swizzle (8 rows of 128 bytes whose 16-byte
// chunks are permuted by XOR with the row index mod 8: CUTLASS's Swizzle<3,4,3>; atoms
// 1024-byte aligned), kept as their low word: the start address in 16-byte units (14 bits: it
// never carries, shared memory is below 256 KiB) and the byte distance between atoms adjacent in
// the leading (K) dimension. The high word is the same for every operand here: 1024 bytes
// between atoms adjacent in the stride (M/N) dimension, and the swizzle mode.
__device__ __forceinline__ unsigned wg_desc_lo(const void* p, unsigned lbo) {
    return (((unsigned)__cvta_generic_to_shared(p) & 0x3FFFFu) >> 4) | ((lbo >> 4) << 16);
}
// the descriptor of low word lo moved by `bytes` (a multiple of 16)
__device__ __forceinline__ unsigned long long wg_desc(unsigned lo, unsigned bytes) {
    unsigned long long d;
    asm("mov.b64 %0, {%1, %2};" : "=l"(d) : "r"(lo + (bytes >> 4)), "n"((1024 >> 4) | (1u << 30)));
    return d;
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }
// Keeps the compiler from moving accesses to wgmma accumulators across a fence or wait
// (CUTLASS's warpgroup_fence_operand): the asm "redefines" every register of the array.
template <int N> __device__ __forceinline__ void fence_regs(float (&d)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}
template <int H, int N> __device__ __forceinline__ void fence_regs(float (&d)[H][N][4]) {
#pragma unroll
    for (int h = 0; h < H; ++h) fence_regs(d[h]);
}
// cp.async and ordinary stores write through the generic proxy; wgmma reads through the async one
__device__ __forceinline__ void proxy_fence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// shared-memory barriers with phases (mbarrier): a phase completes when its count of arrivals is in
__device__ __forceinline__ void mb_init(unsigned long long* b, int n) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"((unsigned)__cvta_generic_to_shared(b)), "r"(n) : "memory");
}
// whether the phase with this parity has completed (no wait)
__device__ __forceinline__ bool mb_test(unsigned long long* b, int parity) {
    unsigned done;
    asm volatile("{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"((unsigned)__cvta_generic_to_shared(b)), "r"(parity) : "memory");
    return done;
}
__device__ __forceinline__ void mb_arrive(unsigned long long* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"((unsigned)__cvta_generic_to_shared(b)) : "memory");
}
// waits for the completion of the phase with this parity (phase k: parity k & 1). A pipeline
// that stops moving (a bug) ends the kernel with an error after 10 minutes instead of hanging
// the job; no legitimate wait comes near that (the longest is one work item's compute).
__device__ __forceinline__ void mb_wait(unsigned long long* b, int parity) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(b);
    unsigned long long t0 = 0;
    for (;;) {
        unsigned done;  // up to 65,536 polls in a tight loop, then a look at the clock (ns)
        asm volatile("{\n.reg .pred p;\n.reg .u32 n;\nmov.u32 n, 0;\nW:\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n@p bra D;\n"
                     "add.u32 n, n, 1;\nsetp.lt.u32 p, n, 65536;\n@p bra W;\nD:\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(a), "r"(parity) : "memory");
        if (done) return;
        unsigned long long now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if (t0 == 0) t0 = now;
        else if (now - t0 > 600000000000ull) __trap();
    }
}
// mb_wait with its poll and timeout in one asm statement (the backward's kernels):
// around mb_wait's C++ branch to the clock and __trap the compiler keeps registers it then spills
__device__ __forceinline__ void mb_wait_asm(unsigned long long* b, int parity) {
    asm volatile("{\n.reg .pred p;\n.reg .u32 n;\n.reg .u64 t0, t;\nmov.u64 t0, 0;\nR:\nmov.u32 n, 0;\nW:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@p bra D;\n"
                 "add.u32 n, n, 1;\nsetp.lt.u32 p, n, 65536;\n@p bra W;\n"  // 65,536 polls, then the clock (ns)
                 "mov.u64 t, %%globaltimer;\nsetp.eq.u64 p, t0, 0;\n@p mov.u64 t0, t;\nsub.u64 t, t, t0;\n"
                 "setp.gt.u64 p, t, 600000000000;\n@p trap;\nbra R;\nD:\n}\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(b)), "r"(parity) : "memory");
}
// The bulk tensor copies (TMA, cp.async.bulk.tensor) of the backward's loaders. A TmaMap is a
// CUtensorMap (128 bytes) that the host encodes (hpcattn/gpu/tma.py, cuTensorMapEncodeTiled) for
// a 4-D array (columns, rows, heads, batch) of float16/bfloat16, boxes of 64 columns (128
// bytes) by R rows, in the 128-byte swizzle the descriptors above read, rows past the array's
// end filled with zeros; TmaMaps holds q's, k's, v's and dout's, passed by value as a
// __grid_constant__ kernel parameter.
struct __align__(64) TmaMap {
    unsigned long long w[16];
};
struct TmaMaps {
    TmaMap q, k, v, o;
};
// the phase's expected transaction bytes raised by `bytes` (no arrival)
__device__ __forceinline__ void mb_expect_tx(unsigned long long* b, unsigned bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(b)), "r"(bytes) : "memory");
}
// an arrival on b once this thread's cp.async copies so far have landed, counted in b's
// arrivals at init (.noinc)
__device__ __forceinline__ void cp_arrive(unsigned long long* b) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(b)) : "memory");
}
// the box of map m at (column c, row r, head h, batch e) into shared dst (1024-byte aligned),
// its bytes completing on barrier b
__device__ __forceinline__ void tma_load4(void* dst, const TmaMap* m, int c, int r, int h, int e,
                                          unsigned long long* b) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(reinterpret_cast<unsigned long long>(m)),
                    "r"(c), "r"(r), "r"(h), "r"(e), "r"((unsigned)__cvta_generic_to_shared(b))
                 : "memory");
}
// rows [r, r + R) of the (R, D) tile of head h, batch e into shared dst as load_tile_sw lays it
// out (columns [64i, 64i + 64) at i R 128 bytes on), by D / 64 boxes of map m
template <typename T, int D, int R>
__device__ __forceinline__ void tma_tile(T* dst, const TmaMap* m, int r, int h, int e, unsigned long long* b) {
#pragma unroll
    for (int i = 0; i < D / 64; ++i) tma_load4(reinterpret_cast<char*>(dst) + i * R * 128, m, 64 * i, r, h, e, b);
}

template <int N> __device__ __forceinline__ void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(N)); }
template <int N> __device__ __forceinline__ void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(N)); }

// The registers per consumer thread of a warp-specialised block (a loader warpgroup set to PREG,
// NWG consumer warpgroups, MINB blocks per SM): the consumers share what the block got at launch
// (per thread 65536 / MINB / its threads, in steps of 8) less the loader's, up to 240.
// setmaxnreg.inc takes only registers that the block's setmaxnreg.dec gave back.
__host__ __device__ constexpr int consumer_regs(int NWG, int MINB, int PREG) {
    const int launch = 65536 / MINB / (128 * (NWG + 1)) / 8 * 8, c = (launch * (NWG + 1) - PREG) / NWG / 8 * 8;
    return c > 240 ? 240 : c;
}

#define WG_ACC32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
    "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_ACC64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
    "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, " \
    "%39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, " \
    "%59, %60, %61, %62, %63}"
#define WG_F4(a, j) "+f"(a[j][0]), "+f"(a[j][1]), "+f"(a[j][2]), "+f"(a[j][3])
#define WG_OUT8(a) WG_F4(a, 0), WG_F4(a, 1), WG_F4(a, 2), WG_F4(a, 3), WG_F4(a, 4), WG_F4(a, 5), WG_F4(a, 6), WG_F4(a, 7)
#define WG_OUT16(a) WG_OUT8(a), WG_F4(a, 8), WG_F4(a, 9), WG_F4(a, 10), WG_F4(a, 11), WG_F4(a, 12), \
    WG_F4(a, 13), WG_F4(a, 14), WG_F4(a, 15)

// d (64 x N per warpgroup; this thread's share as [N/8][4]) (+)= a (registers) * B (descriptor).
// TNSP: B is stored N-major (its N index contiguous) rather than K-major.
template <typename T, int N, int TNSP> struct Wgmma;
#define WG_DEFINE(TY, N, OUT, OPS)                                                                   \
    template <int TNSP> struct Wgmma<TY, N, TNSP> {                                                  \
        static __device__ __forceinline__ void run(float (&d)[N / 8][4], const unsigned (&a)[4],     \
                                                   unsigned long long b, int accumulate) {           \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " OPS ";\n}\n"                            \
                         : OUT(d)                                                                    \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TNSP)); \
        }                                                                                            \
    };
// operands: the accumulators %0.., then a (4 registers), b, accumulate, TNSP
#define WG_OPS64(PTXTY) "%37, 0;\nwgmma.mma_async.sync.aligned.m64n64k16.f32." PTXTY " " WG_ACC32 \
    ", {%32, %33, %34, %35}, %36, p, 1, 1, %38"
#define WG_OPS128(PTXTY) "%69, 0;\nwgmma.mma_async.sync.aligned.m64n128k16.f32." PTXTY " " WG_ACC64 \
    ", {%64, %65, %66, %67}, %68, p, 1, 1, %70"
WG_DEFINE(__half, 64, WG_OUT8, WG_OPS64("f16.f16"))
WG_DEFINE(__half, 128, WG_OUT16, WG_OPS128("f16.f16"))
WG_DEFINE(__nv_bfloat16, 64, WG_OUT8, WG_OPS64("bf16.bf16"))
WG_DEFINE(__nv_bfloat16, 128, WG_OUT16, WG_OPS128("bf16.bf16"))

// d (64 x N) (+)= A * B, both in shared memory (descriptors), K-major unless TA (A stored
// M-major) or TB (B stored N-major); N 64, or 128 (attend_fwd_dense's S of a 128-key tile)
template <typename T, int TA = 0, int TB = 0, int N = 64> struct WgmmaSS;
#define WGSS_DEFINE(TY, N, OUT, OPS)                                                                 \
    template <int TA, int TB> struct WgmmaSS<TY, TA, TB, N> {                                        \
        static __device__ __forceinline__ void run(float (&d)[N / 8][4], unsigned long long a,       \
                                                   unsigned long long b, int accumulate) {           \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " OPS ";\n}\n"                           \
                         : OUT(d)                                                                    \
                         : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));                       \
        }                                                                                            \
    };
// operands: the accumulators %0.., a, b, accumulate, TA, TB
#define WGSS_OPS64(PTXTY) "%34, 0;\nwgmma.mma_async.sync.aligned.m64n64k16.f32." PTXTY " " WG_ACC32 \
    ", %32, %33, p, 1, 1, %35, %36"
#define WGSS_OPS128(PTXTY) "%66, 0;\nwgmma.mma_async.sync.aligned.m64n128k16.f32." PTXTY " " WG_ACC64 \
    ", %64, %65, p, 1, 1, %67, %68"
WGSS_DEFINE(__half, 64, WG_OUT8, WGSS_OPS64("f16.f16"))
WGSS_DEFINE(__half, 128, WG_OUT16, WGSS_OPS128("f16.f16"))
WGSS_DEFINE(__nv_bfloat16, 64, WG_OUT8, WGSS_OPS64("bf16.bf16"))
WGSS_DEFINE(__nv_bfloat16, 128, WG_OUT16, WGSS_OPS128("bf16.bf16"))

// rows [0, rows) of a (rows, D) block at src into shared memory in 128-byte swizzle atoms, zeros
// up to PAD rows, by NT threads (tid in [0, NT)): columns [64h, 64h + 64) of row r at h * PAD * 128 +
// r * 128, their 16-byte chunk c at position c ^ (r % 8). A thread copies one chunk column of
// every STEP = (NT / (D / 8))-th row from row r0 < STEP; with STEP a multiple of 8 its swizzle is
// the same in every row it copies, else row r0 + i STEP's is r0's xor (i STEP) % 8 (no carry:
// STEP is a power of two above r0).
template <typename T, int D, int PAD, int NT = 128>
__device__ __forceinline__ void load_tile_sw(const T* __restrict__ src, long long ld, int rows, T* dst, int tid) {
    constexpr int CH = D / 8, STEP = NT / CH;  // chunks per row; rows between a thread's copies
    static_assert(PAD % STEP == 0, "every thread copies the same number of rows");
    const int c = tid % CH, r0 = tid / CH;
    if constexpr (STEP % 8 != 0) {  // each row its own swizzle
        char* row = reinterpret_cast<char*>(dst) + (c >> 3) * PAD * 128 + r0 * 128;
        const T* g = src + (size_t)r0 * ld + c * 8;
#pragma unroll
        for (int i = 0; i < PAD / STEP; ++i) {
            const bool in = r0 + i * STEP < rows;
            cp16(row + i * STEP * 128 + (((c & 7) ^ (r0 & 7) ^ ((i * STEP) & 7)) << 4),
                 in ? g + (size_t)i * STEP * ld : src, in);
        }
        return;
    }
    char* d = reinterpret_cast<char*>(dst) + (c >> 3) * PAD * 128 + r0 * 128 + (((c & 7) ^ (r0 & 7)) << 4);
    const T* g = src + (size_t)r0 * ld + c * 8;
    const size_t step = (size_t)STEP * ld;
    if (rows >= PAD) {  // the common case: no bounds
#pragma unroll
        for (int i = 0; i < PAD / STEP; ++i) cp16(d + i * STEP * 128, g + i * step, true);
        return;
    }
#pragma unroll
    for (int i = 0; i < PAD / STEP; ++i) {
        const bool in = r0 + i * STEP < rows;
        cp16(d + i * STEP * 128, in ? g + i * step : src, in);
    }
}
