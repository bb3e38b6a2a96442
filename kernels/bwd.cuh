// Device helpers shared by the tensor-core backward's key-major kernels (attend_bwd_mma.cu on
// mma.sync, attend_bwd_wgmma.cu on Hopper's wgmma) and its query-major one: which query tiles
// reach a block of keys and the mask over one tile, the query rows' statistics, P and dS, and
// the stores of dq, dk, dv.
#pragma once
#include "mma.cuh"

constexpr int BM = 64;  // query rows per tile of the key-major kernels

__device__ __forceinline__ void cp4(void* dst, const void* src, bool pred) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(s), "l"(src), "r"(pred ? 4 : 0));
}
__device__ __forceinline__ void cp8(void* dst, const void* src, bool pred) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" :: "r"(s), "l"(src), "r"(pred ? 8 : 0));
}

// The backward kernels' layout arguments: the Strides of q (do, dq) and of k (v, dk, dv), and H,
// the query heads per batch entry.
#define BWD_STRIDES long long qbs, long long qhs, long long qrs, long long kbs, long long khs, long long krs, int H
#define BWD_STRIDE_ARGS qbs, qhs, qrs, kbs, khs, krs, H  // BWD_STRIDES passed on

// The first row whose position is >= x (nq if none), rows in ascending order of position; the
// 32 lanes of a warp probe 32 rows at once (a 32-ary search) and all return the answer.
__device__ __forceinline__ int first_row(const long long* __restrict__ qpos, long long q0, int nq, long long x,
                                         int lane) {
    if (!qpos) return (int)min(max(x - q0, 0LL), (long long)nq);
    int lo = 0, hi = nq;  // the answer lies in [lo, hi]
    while (hi - lo > 32) {
        const int step = (hi - lo + 31) / 32, p = lo + lane * step;
        const int below = __popc(__ballot_sync(0xffffffffu, p < hi && qpos[p] < x));  // a prefix of lanes
        if (below == 0) return lo;
        hi = min(hi, lo + below * step);
        lo += (below - 1) * step + 1;
    }
    return lo + __popc(__ballot_sync(0xffffffffu, lo + lane < hi && qpos[lo + lane] < x));
}

// Warp 0's part of a key-major block's set-up: the mask words, and the query tiles [tlo_s[i],
// thi_s[i]) (i < nr_s) whose rows reach the key positions [j0, j1], in order, disjoint; every
// tile when the positions are not in ascending order (*unsorted: rows_unsorted's flag).
__device__ __forceinline__ void key_block_tiles(const long long* __restrict__ mask_words, MaskDev& mk,
                                                const long long* __restrict__ qpos,
                                                const int* __restrict__ unsorted, long long q0, int nq,
                                                long long j0, long long j1, int lane, int* tlo_s, int* thi_s,
                                                int& nr_s) {
    load_mask_warp(mask_words, mk, lane);
    long long lo[HPCATTN_MAX_SPANS], hi[HPCATTN_MAX_SPANS];
    const int ns = mask_spans(mk, j0, j1, 0, 1LL << 62, lo, hi, true);
    int n = 0, done = 0;
    if (qpos && *unsorted) {
        if (lane == 0 && nq > 0) { tlo_s[0] = 0; thi_s[0] = (nq + BM - 1) / BM; }
        n = nq > 0;
    } else {
        for (int s = 0; s < ns; ++s) {
            const int r0 = first_row(qpos, q0, nq, lo[s], lane), r1 = first_row(qpos, q0, nq, hi[s], lane);
            const int a = max(r0 / BM, done), b = r1 > r0 ? (r1 - 1) / BM + 1 : 0;
            if (a < b) {
                if (lane == 0) { tlo_s[n] = a; thi_s[n] = b; }
                ++n;
                done = b;
            }
        }
    }
    if (lane == 0) nr_s = n;
}

// The key-major kernels' work item after (query head gq of the group, query tile t of range r):
// the ranges [tlo[r], thi[r]) of key_block_tiles, for each of the group's heads in turn.
__device__ __forceinline__ void next_item(int& gq, int& r, int& t, int nr, const int* tlo, const int* thi) {
    if (++t == thi[r]) {
        if (++r == nr) { r = 0; ++gq; }
        t = tlo[r];
    }
}

// The statistics of rows [r0, r0 + rows) of query head hq into shared memory, BM of each, zeros
// past `rows`: lse at Ls, delta at Ds and (qpos) the positions at Ps, by NT threads (tid in [0,
// NT)); asynchronous, completes with the caller's next cp_commit group.
template <int NT>
__device__ __forceinline__ void load_stats(const float* __restrict__ lse, const float* __restrict__ delta,
                                           const long long* __restrict__ qpos, int hq, int nq, int r0, int rows,
                                           float* Ls, float* Ds, long long* Ps, int tid) {
#pragma unroll
    for (int i = 0; i < (BM + NT - 1) / NT; ++i) {  // a fixed count: no loop state to keep
        const int e = tid + i * NT;
        if (e >= BM) break;
        const bool ok = e < rows;
        const size_t j = (size_t)hq * nq + r0 + (ok ? e : 0);
        cp4(Ls + e, lse + j, ok);
        cp4(Ds + e, delta + j, ok);
        if (qpos) cp8(Ps + e, qpos + r0 + (ok ? e : 0), ok);
    }
}

// A query tile's rows [0, rows) at positions Pb[r] (positions) or p0 + r, as the key-major mask
// sees them: their lowest and highest position, and whether they are a run (row r at plo + r).
struct TileRows {
    long long plo, phi;
    bool run;
};
__device__ __forceinline__ TileRows tile_rows(bool positions, const long long* Pb, long long p0, int rows, int lane) {
    TileRows t{p0, p0 + rows - 1, true};
    if (positions) {
        const long long b0 = Pb[0];
        t.plo = 0x7fffffffffffffffLL;
        t.phi = -0x7fffffffffffffffLL - 1;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = lane + 32 * h;
            if (r < rows) {
                t.plo = min(t.plo, Pb[r]);
                t.phi = max(t.phi, Pb[r]);
            }
            t.run &= r >= rows || Pb[r] == b0 + r;
        }
        warp_min_max(t.plo, t.phi);
        t.run = __all_sync(0xffffffffu, t.run);
    }
    return t;
}

// The mask over one warp's 16 keys x that query tile of S^T (s: this lane's share), the keys at
// jpos (live: real keys): by row_bits when the rows are a run, else pair by pair; nothing is
// masked when the tile lies wholly inside the mask for the warp's key positions [j0, j1).
// COUNT: the lane's share of the edges (live keys x the tile's rows) added to *n_edges.
template <bool COUNT = false>
__device__ __forceinline__ void kv_tile_mask(float (&s)[1][MK / 8][4], const MaskDev& mk, const TileRows& t,
                                             const long long* Pb, int rows, long long j0, long long j1,
                                             const bool (&live)[1][2], const long long (&jpos)[1][2], int tq,
                                             unsigned long long* n_edges = nullptr) {
    const bool full = rows == BM && mask_tile_full(mk, t.plo, t.phi, j0, j1);
    unsigned long long ne = 0;
    if (t.run) {
        mask_scores<1, true>(s, mk, live, jpos, t.plo, rows, full, tq, ne);
    } else if (full) {
        if (COUNT && tq == 0) ne += (unsigned long long)(live[0][0] + live[0][1]) * MK;
    } else {  // positions that are no run: each pair of this lane tested
        unsigned long long b[2] = {0ull, 0ull};
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < MK / 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = 8 * j + 2 * tq + e;
                    if (live[0][h] && c < rows && mask_allows(mk, Pb[c], jpos[0][h])) b[h] |= 1ull << (8 * j + e);
                }
        mask_bits(s[0], b[0], b[1]);
        if (COUNT) ne += __popcll(b[0]) + __popcll(b[1]);
    }
    if (COUNT) *n_edges += ne;
}

// This lane's query columns 8j + 2tq + e of a tile: L = lse log2(e) (+inf where the row is not
// real or has no edge, so that P = 0 there) and delta.
__device__ __forceinline__ void column_stats(const float* Ls, const float* Ds, int rows, int tq, float (&L)[MK / 8][2],
                                             float (&dl)[MK / 8][2]) {
#pragma unroll
    for (int j = 0; j < MK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int c = 8 * j + 2 * tq + e;
            const float x = Ls[c];
            L[j][e] = c < rows && x != -INFINITY ? x * MLOG2E : INFINITY;
            dl[j][e] = Ds[c];
        }
}

// P = exp2(sl2 s - L) of one 16-row block, in place; per-row statistics (Lr: rows g, g + 8) or
// per-column ones (Lc), as COLS says. Apart from score_grads so that a Hopper kernel can compute
// P while its dP MMA runs.
template <bool COLS>
__device__ __forceinline__ void weights(float (&s)[MK / 8][4], float sl2, const float* Lr, const float (&Lc)[MK / 8][2]) {
#pragma unroll
    for (int j = 0; j < MK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = ex2(fmaf(s[j][e], sl2, -(COLS ? Lc[j][e & 1] : Lr[e >> 1])));
}

// dS = P (dP - delta) of one 16-row block, and P and dS packed as MMA A fragments; delta per row
// (dr) or per column (dc), as COLS says.
template <typename T, bool COLS>
__device__ __forceinline__ void score_grads(const float (&p)[MK / 8][4], const float (&dp)[MK / 8][4], const float* dr,
                                            const float (&dc)[MK / 8][2], unsigned (&pa)[MK / 16][4],
                                            unsigned (&da)[MK / 16][4]) {
#pragma unroll
    for (int j = 0; j < MK / 8; ++j) {
        float d[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) d[e] = p[j][e] * (dp[j][e] - (COLS ? dc[j][e & 1] : dr[e >> 1]));
        pa[j >> 1][(j & 1) * 2] = pack2<T>(p[j][0], p[j][1]);
        pa[j >> 1][(j & 1) * 2 + 1] = pack2<T>(p[j][2], p[j][3]);
        da[j >> 1][(j & 1) * 2] = pack2<T>(d[0], d[1]);
        da[j >> 1][(j & 1) * 2 + 1] = pack2<T>(d[2], d[3]);
    }
}

// weights, then score_grads (the mma.sync kernels, whose dP is complete by then)
template <typename T, bool COLS>
__device__ __forceinline__ void probabilities(float (&s)[MK / 8][4], const float (&dp)[MK / 8][4], float sl2,
                                              const float* Lr, const float* dr, const float (&Lc)[MK / 8][2],
                                              const float (&dc)[MK / 8][2], unsigned (&pa)[MK / 16][4],
                                              unsigned (&da)[MK / 16][4]) {
    weights<COLS>(s, sl2, Lr, Lc);
    score_grads<T, COLS>(s, dp, dr, dc, pa, da);
}

// Row g (h = 0) and g + 8 (h = 1) of a 16-row block starting at `base` (rows rs apart), columns
// 2tq + 8j + e: mul * acc added into float32 accumulators (TO = float) or stored (TO = T, the
// input dtype). Rows for which live[h] is false are left alone.
template <int D, typename TO>
__device__ __forceinline__ void put_rows(TO* base, long long rs, const float (&acc)[D / 8][4], const bool (&live)[2],
                                         float mul, int g, int tq) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (!live[h]) continue;
        TO* row = base + (size_t)(g + 8 * h) * rs + 2 * tq;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            float a = mul * acc[j][2 * h], b = mul * acc[j][2 * h + 1];
            if (sizeof(TO) == 4) {
                const float2 x = *reinterpret_cast<const float2*>(row + 8 * j);
                a += x.x;
                b += x.y;
            }
            store2<TO>(row + 8 * j, a, b);
        }
    }
}
