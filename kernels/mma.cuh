// mma.sync (m16n8k16) helpers shared by the tensor-core kernels of every GPU (attend_mma.cu's
// forward, attend_bwd_mma.cu's backward): the MMA itself, ldmatrix, tile loads, the scores of one
// key tile, a tile's mask applied to scores, and the P*V-shaped accumulation.
#pragma once
#include "tiles.cuh"

// c (16x8 f32) += a (16x16, row) * b (16x8, col)
template <typename T> __device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma16816<__half>(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm4t(unsigned* r, const void* p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// rows [0, rows) of a (rows, D) block at src (rows ld elements apart) into shared memory with row
// stride LD, zeros up to `pad` rows: asynchronous, completes with the caller's next cp_commit group.
template <typename T, int D, int LD>
__device__ __forceinline__ void load_tile(const T* __restrict__ src, long long ld, int rows, int pad, T* dst, int tid,
                                          int nthreads) {
    constexpr int CH = D / 8;
    for (int e = tid; e < pad * CH; e += nthreads) {
        const int r = e / CH, c = (e - r * CH) * 8;
        cp16(dst + r * LD + c, src + (size_t)(r < rows ? r : 0) * ld + c, r < rows);
    }
}

// The lowest and highest position of rows [r0, r1) (row r sits at q0 + r without qpos),
// reduced over the 32 lanes of one warp.
__device__ __forceinline__ void row_positions(const long long* __restrict__ qpos, long long q0, int r0, int r1,
                                              int lane, long long& lo, long long& hi) {
    lo = q0 + r0;
    hi = q0 + r1 - 1;
    if (qpos) {
        lo = 0x7fffffffffffffffLL;
        hi = -0x7fffffffffffffffLL - 1;
        for (int r = r0 + lane; r < r1; r += 32) { lo = min(lo, qpos[r]); hi = max(hi, qpos[r]); }
        warp_min_max(lo, hi);
    }
}

// s = Q K^T for one key tile: RM 16 x MK blocks per warp, n-tile j holds keys 8j .. 8j+7. Q comes
// from registers (qa) or from shared rows (Qw: this lane's ldmatrix address).
template <typename T, int D, int RM, bool QREG, int LD>
__device__ __forceinline__ void tile_scores(float (&s)[RM][MK / 8][4], const unsigned (&qa)[QREG ? RM : 1][QREG ? D / 16 : 1][4],
                                            const T* Qw, const T* Kb, int lane) {
#pragma unroll
    for (int mi = 0; mi < RM; ++mi)
#pragma unroll
        for (int j = 0; j < MK / 8; ++j) s[mi][j][0] = s[mi][j][1] = s[mi][j][2] = s[mi][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned a[RM][4];
#pragma unroll
        for (int mi = 0; mi < RM; ++mi) {
            if (QREG) {
#pragma unroll
                for (int e = 0; e < 4; ++e) a[mi][e] = qa[QREG ? mi : 0][QREG ? kk : 0][e];
            } else {
                ldsm4(a[mi], Qw + mi * 16 * LD + kk * 16);
            }
        }
#pragma unroll
        for (int np = 0; np < MK / 16; ++np) {
            unsigned b[4];
            ldsm4(b, Kb + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int mi = 0; mi < RM; ++mi) {
                mma16816<T>(s[mi][2 * np], a[mi], b[0], b[1]);
                mma16816<T>(s[mi][2 * np + 1], a[mi], b[2], b[3]);
            }
        }
    }
}

// Warp 0's part of a query-major block's set-up, in one memory round trip: the mask words, the
// lowest and highest position of rows [t0, t1) and the key spans they reach, into shared memory.
__device__ __forceinline__ void row_block_spans(const long long* __restrict__ mask_words, MaskDev& mk,
                                                const long long* __restrict__ qpos, long long q0, int t0, int t1,
                                                long long k0, int nk, int lane, long long& qlo_s, long long& qhi_s,
                                                long long* lo_s, long long* hi_s, int& nsp_s) {
    load_mask_warp(mask_words, mk, lane);
    long long lo, hi;
    row_positions(qpos, q0, t0, t1, lane, lo, hi);
    if (lane == 0) {
        qlo_s = lo;
        qhi_s = hi;
        nsp_s = mask_spans(mk, lo, hi, k0, k0 + nk, lo_s, hi_s);
    }
}

// acc (RM 16 x D blocks) += A (RM 16 x MK, packed half pairs as mma A fragments) * B, where B is
// an MK x D tile of shared rows (LD apart): O += P V in the forward, dV += P^T dO, dK += dS^T Q
// and dQ += dS K in the backward.
template <typename T, int D, int RM, int LD>
__device__ __forceinline__ void pv_accumulate(float (&acc)[RM][D / 8][4], const unsigned (&pa)[RM][MK / 16][4],
                                              const T* Vb, int lane) {
#pragma unroll
    for (int kk = 0; kk < MK / 16; ++kk) {
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            unsigned b[4];
            ldsm4t(b, Vb + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + dp * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int mi = 0; mi < RM; ++mi) {
                mma16816<T>(acc[mi][2 * dp], pa[mi][kk], b[0], b[1]);
                mma16816<T>(acc[mi][2 * dp + 1], pa[mi][kk], b[2], b[3]);
            }
        }
    }
}

// Scores of the pairs the mask leaves out set to -inf over one MK-key tile at c0 (nkt keys):
// row h of 16-row block mi sits at position pos[mi][h] (`live` when it is a real row), this
// lane's columns are 8j + 2tq + e. `full`: every pair of the tile is an edge (no test). The
// tile's edges are added to n_edges by the lanes with tq == 0. TR: rows are keys and columns
// queries (row_bits<true>), the backward's key-major pass.
template <int RM, bool TR = false>
__device__ __forceinline__ void mask_scores(float (&s)[RM][MK / 8][4], const MaskDev& mk, const bool (&live)[RM][2],
                                            const long long (&pos)[RM][2], long long c0, int nkt, bool full,
                                            int tq, unsigned long long& n_edges) {
#pragma unroll
    for (int mi = 0; mi < RM; ++mi) {
        if (full) {
            if (tq == 0) n_edges += (unsigned long long)(live[mi][0] + live[mi][1]) * MK;
        } else {
            const unsigned long long b0 = live[mi][0] ? row_bits<TR>(mk, pos[mi][0], c0, nkt) : 0ull;
            const unsigned long long b1 = live[mi][1] ? row_bits<TR>(mk, pos[mi][1], c0, nkt) : 0ull;
            if (tq == 0) n_edges += __popcll(b0) + __popcll(b1);
            mask_bits(s[mi], b0 >> (2 * tq), b1 >> (2 * tq));
        }
    }
}
