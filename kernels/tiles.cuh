// Device helpers shared by the tensor-core kernels (attend_mma.cu, attend_wgmma.cu, attend_bwd_mma.cu): packing and
// stores of half-precision pairs, ldmatrix, cp.async, and the mask's row bits over one MK-key tile.
#pragma once
#include "mask.cuh"

#define MK 64
#define MLOG2E 1.4426950408889634f
#define MLN2 0.6931471805599453f

template <typename T> __device__ __forceinline__ unsigned pack2(float a, float b);
template <> __device__ __forceinline__ unsigned pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<unsigned*>(&h);
}

template <typename T> __device__ __forceinline__ void store2(T* p, float a, float b);
template <> __device__ __forceinline__ void store2<float>(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
template <> __device__ __forceinline__ void store2<__half>(__half* p, float a, float b) {
    *reinterpret_cast<unsigned*>(p) = pack2<__half>(a, b);
}
template <> __device__ __forceinline__ void store2<__nv_bfloat16>(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<unsigned*>(p) = pack2<__nv_bfloat16>(a, b);
}

// How an array's rows lie, in elements: head `head` = b * H + h (batch b, head h of H) starts at
// b * bs + h * hs and its rows are rs apart. The tensor-core forwards read q, k, v and write o in
// any such layout: head-major (B, H, n, D) has bs = H n D, hs = n D, rs = D; the caller's
// (B, n, H, D) has bs = n H D, hs = D, rs = H D. Rows start on 16 bytes (the host checks).
struct Strides {
    long long bs, hs, rs;
    __device__ __forceinline__ size_t head(int head, int H) const {
        return (size_t)((long long)(head / H) * bs + (long long)(head % H) * hs);
    }
};
// The kernels' arguments for the Strides of q, of k and v, and of o (scalars: what every
// launcher passes), and H, the query heads per batch entry.
#define STRIDE_ARGS long long qbs, long long qhs, long long qrs, long long kbs, long long khs, long long krs, \
                    long long obs, long long ohs, long long ors, int H

__device__ __forceinline__ void ldsm4(unsigned* r, const void* p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// 16 bytes global -> shared, zero-filled when !pred (src must still be a valid address)
__device__ __forceinline__ void cp16(void* dst, const void* src, bool pred) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(s), "l"(src), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// Local columns [lo, hi) clipped to [0, 64) as bits.
__device__ __forceinline__ unsigned long long bit_range(long long lo, long long hi) {
    lo = max(lo, 0LL);
    hi = min(hi, 64LL);
    if (lo >= hi) return 0ull;
    const unsigned long long upper = hi >= 64 ? ~0ull : (1ull << hi) - 1ull;
    return upper & ~((1ull << lo) - 1ull);
}

// Bit c set when key c0 + c (c < nkt <= 64) is an edge of the query at position i: mask_allows
// for a whole tile row at once (window, block, global and causal are intervals). TR: the
// transpose, i a key's position and c0 + c the queries' (every term is symmetric but causal).
template <bool TR = false>
__device__ __forceinline__ unsigned long long row_bits(const MaskDev& m, long long i, long long c0, int nkt) {
    const long long d = i - c0;  // the row's position in tile-local columns
    unsigned long long bits = 0ull;
    for (int t = 0; t < m.n; ++t) {
        const long long a = min(m.a[t], (1LL << 62) - 1);
        switch (m.kind[t]) {
        case T_FULL: bits = ~0ull; break;
        case T_WINDOW: bits |= bit_range(d - a, d + a + 1); break;
        case T_DILATED: {
            const long long r = m.b[t];
            if (r == 1) { bits |= bit_range(d - a, d + a + 1); break; }
            const long long lo = max(d - a, 0LL), hi = min(d + a + 1, 64LL);
            for (long long c = lo + (((d - lo) % r) + r) % r; c < hi; c += r) bits |= 1ull << c;
            break;
        }
        case T_BLOCK: bits |= bit_range(i / a * a - c0, (i / a + 1) * a - c0); break;
        case T_GLOBAL: bits |= i < a ? ~0ull : bit_range(-c0, a - c0); break;
        }
    }
    if (m.causal) bits &= TR ? bit_range(d, 64) : bit_range(0, d + 1);
    return bits & bit_range(0, nkt);
}

// 2^x by the MUFU alone: exp2f wraps it in a fix-up for outputs below 2^-126 (a compare and two
// multiplies per element, a third of the backward's per-score instructions). Outputs that small
// flush to 0 here: far below a row sum's rounding, and 0 in float16 all the same.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// One 16-row block's scores of this lane: -inf where the row's bit word (shifted by 2 tq, so
// that column 8j + 2tq + e is bit 8j + e) has no bit.
__device__ __forceinline__ void mask_bits(float (&s)[MK / 8][4], unsigned long long c0b, unsigned long long c1b) {
#pragma unroll
    for (int j = 0; j < MK / 8; ++j) {
        const unsigned w0 = (unsigned)(c0b >> (8 * j)), w1 = (unsigned)(c1b >> (8 * j));
        if (!(w0 & 1u)) s[j][0] = -INFINITY;
        if (!(w0 & 2u)) s[j][1] = -INFINITY;
        if (!(w1 & 1u)) s[j][2] = -INFINITY;
        if (!(w1 & 2u)) s[j][3] = -INFINITY;
    }
}

// lo and hi reduced to the lowest and highest over the 32 lanes of the warp
__device__ __forceinline__ void warp_min_max(long long& lo, long long& hi) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, s));
        hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, s));
    }
}

// Tile cursor over the spans [lo[sp], hi[sp]): the next MK-key tile after c0.
__device__ __forceinline__ void next_tile(int& sp, long long& c0, int nsp, const long long* lo, const long long* hi) {
    c0 += MK;
    if (c0 >= hi[sp]) {
        ++sp;
        c0 = sp < nsp ? lo[sp] : 0;
    }
}
