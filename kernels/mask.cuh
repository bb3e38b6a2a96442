// Mask terms evaluated on the fly (DESIGN.md section 3), shared by every kernel in kernels/.
// The host encodes a mask as int64 words: [n_terms, causal, (kind, a, b) * n_terms], kinds below.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef INFINITY  // NVRTC has no <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

#define HPCATTN_MAX_TERMS 8
#define HPCATTN_MAX_SPANS (HPCATTN_MAX_TERMS + 1)

enum { T_FULL = 0, T_WINDOW = 1, T_DILATED = 2, T_BLOCK = 3, T_GLOBAL = 4 };

struct MaskDev {
    int n, causal;
    long long kind[HPCATTN_MAX_TERMS], a[HPCATTN_MAX_TERMS], b[HPCATTN_MAX_TERMS];
};

// Dilated terms arrive as (reach = W*R clamped by the host, R). The host pads the words to
// HPCATTN_MAX_TERMS terms, so that a warp can read them all at once (load_mask_warp).
__device__ __forceinline__ void load_mask(const long long* __restrict__ w, MaskDev& m) {
    m.n = (int)w[0];
    m.causal = (int)w[1];
    for (int t = 0; t < m.n; ++t) {
        m.kind[t] = w[2 + 3 * t];
        m.a[t] = w[3 + 3 * t];
        m.b[t] = w[4 + 3 * t];
    }
}

// load_mask by the 32 lanes of one warp, one word each: one memory round trip.
__device__ __forceinline__ void load_mask_warp(const long long* __restrict__ w, MaskDev& m, int lane) {
    if (lane < 2 + 3 * HPCATTN_MAX_TERMS) {
        const long long x = w[lane];
        if (lane == 0) m.n = (int)x;
        else if (lane == 1) m.causal = (int)x;
        else {
            const int t = (lane - 2) / 3, f = (lane - 2) % 3;
            (f == 0 ? m.kind : f == 1 ? m.a : m.b)[t] = x;
        }
    }
    __syncwarp();
}

__device__ __forceinline__ bool term_allows(const MaskDev& m, int t, long long i, long long j) {
    const long long a = m.a[t], d = i - j;
    switch (m.kind[t]) {
    case T_FULL: return true;
    case T_WINDOW: return (d < 0 ? -d : d) <= a;
    case T_DILATED: return (d < 0 ? -d : d) <= a && d % m.b[t] == 0;
    case T_BLOCK: return i / a == j / a;
    case T_GLOBAL: return i < a || j < a;
    default: return false;
    }
}

__device__ __forceinline__ bool mask_allows(const MaskDev& m, long long i, long long j) {
    if (m.causal && j > i) return false;
    for (int t = 0; t < m.n; ++t)
        if (term_allows(m, t, i, j)) return true;
    return false;
}

// True when every (i, j) with i in [qlo, qhi] and j in [c0, c1) is an edge: no per-pair test.
__device__ __forceinline__ bool mask_tile_full(const MaskDev& m, long long qlo, long long qhi,
                                               long long c0, long long c1) {
    if (m.causal && c1 - 1 > qlo) return false;
    for (int t = 0; t < m.n; ++t) {
        const long long a = m.a[t];
        switch (m.kind[t]) {
        case T_FULL: return true;
        case T_WINDOW:
            if (qhi - c0 <= a && c1 - 1 - qlo <= a) return true;
            break;
        case T_DILATED:
            if (m.b[t] == 1 && qhi - c0 <= a && c1 - 1 - qlo <= a) return true;
            break;
        case T_BLOCK:
            if (qlo / a == qhi / a && c0 / a == qlo / a && (c1 - 1) / a == qlo / a) return true;
            break;
        case T_GLOBAL:
            if (qhi < a || c1 - 1 < a) return true;
            break;
        }
    }
    return false;
}

// Sorted disjoint key intervals [lo, hi) within [k0, k1) holding every edge of the query
// positions [qlo, qhi] (the device twin of Mask.spans). Returns how many were written.
// transposed: the query intervals within [k0, k1) holding every edge of the keys [qlo, qhi]
// (every term is symmetric; causal bounds them below instead of above).
__device__ __forceinline__ int mask_spans(const MaskDev& m, long long qlo, long long qhi,
                                          long long k0, long long k1,
                                          long long* lo, long long* hi, bool transposed = false) {
    const long long cap = m.causal && !transposed ? min(k1, qhi + 1) : k1;
    if (m.causal && transposed) k0 = max(k0, qlo);
    int n = 0;
    for (int t = 0; t < m.n; ++t) {
        long long a = k0, b = cap, w = m.a[t];
        switch (m.kind[t]) {
        case T_WINDOW:
        case T_DILATED: a = qlo - w; b = qhi + w + 1; break;
        case T_BLOCK: a = qlo / w * w; b = (qhi / w + 1) * w; break;
        case T_GLOBAL: if (qlo >= w) { a = 0; b = w; } break;
        default: break;
        }
        a = max(a, k0);
        b = min(b, cap);
        if (a < b) {  // insertion sort by start
            int p = n++;
            while (p > 0 && lo[p - 1] > a) { lo[p] = lo[p - 1]; hi[p] = hi[p - 1]; --p; }
            lo[p] = a;
            hi[p] = b;
        }
    }
    int out = 0;
    for (int s = 0; s < n; ++s) {
        if (out > 0 && lo[s] <= hi[out - 1]) {
            hi[out - 1] = max(hi[out - 1], hi[s]);
        } else {
            lo[out] = lo[s];
            hi[out] = hi[s];
            ++out;
        }
    }
    return out;
}

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// The 8 elements of T at p (16-byte aligned: one load) as floats.
template <typename T> __device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = to_f<T>(x[e]);
}

// Copy rows [0, rows) of a (rows, D) block of T at src into float shared memory with row
// stride `ld`, multiplied by `mul`; 16-byte loads when a row is a whole number of them.
template <typename T>
__device__ __forceinline__ void load_rows(const T* __restrict__ src, int rows, int D, float* dst,
                                          int ld, float mul, int tid, int nthreads) {
    constexpr int VEC = 16 / sizeof(T);
    if ((D * (int)sizeof(T)) % 16 == 0 && (reinterpret_cast<size_t>(src) & 15) == 0) {
        const int per_row = D / VEC, total = rows * per_row;
        for (int e = tid; e < total; e += nthreads) {
            const int r = e / per_row, c = (e - r * per_row) * VEC;
            uint4 raw = *reinterpret_cast<const uint4*>(src + (size_t)r * D + c);
            const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int u = 0; u < VEC; ++u) dst[r * ld + c + u] = to_f<T>(x[u]) * mul;
        }
    } else {
        for (int e = tid; e < rows * D; e += nthreads) {
            const int r = e / D, c = e - r * D;
            dst[r * ld + c] = to_f<T>(src[(size_t)r * D + c]) * mul;
        }
    }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, s));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) x += __shfl_xor_sync(0xffffffffu, x, s);
    return x;
}
