// Local sparse attention forward on tensor cores (wmma, HMMA) for float16/bfloat16 with head
// dim D in {32, 64, 96, 128}: same contract and mask handling as attend_fwd in attend.cu.
// A block of 4 warps takes 64 query rows (16 per warp) of one query head and walks the
// 64-key tiles of the block's key spans: S = Q K^T and O += P V run as 16x16x16 MMAs,
// the online softmax runs on S in shared memory (two lanes per row), O lives in shared
// memory as float32 so that its per-row rescale needs no knowledge of fragment layouts.
#include <mma.h>
#include "mask.cuh"

#define MQ 64
#define MK 64
#define MWARPS 4
#define MLOG2E 1.4426950408889634f
#define MLN2 0.6931471805599453f

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// rows [0, rows) of a (rows, D) block into shared memory (row stride LD), zeros up to MK/MQ rows.
template <typename T, int D, int LD>
__device__ __forceinline__ void stage(const T* __restrict__ src, int rows, int pad_to, T* dst, int tid) {
    constexpr int VEC = 8, PER_ROW = D / VEC;
    for (int e = tid; e < pad_to * PER_ROW; e += MWARPS * 32) {
        const int r = e / PER_ROW, c = (e - r * PER_ROW) * VEC;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (r < rows) x = *reinterpret_cast<const uint4*>(src + (size_t)r * D + c);
        *reinterpret_cast<uint4*>(dst + r * LD + c) = x;
    }
}

// TO: the type o is written in (float for the merge contract; T halves o's memory where a
// caller keeps the output as is). qpos == nullptr: query r sits at position q0 + r (no
// position array: 8 bytes per token less for self-attention on long sequences). o may be q
// itself (TO = T): a block stages its own q rows before the loop and writes the same rows of o
// after it, and no block reads another's rows, hence no __restrict__ on q and o.
template <typename T, int D, typename TO>
__global__ void __launch_bounds__(MWARPS * 32)
attend_fwd_mma(const T* q, const long long* __restrict__ qpos, const T* __restrict__ k,
               const T* __restrict__ v, TO* o, float* __restrict__ lse,
               unsigned long long* __restrict__ edges, const long long* __restrict__ mask_words,
               int nq, int nk, int G, long long k0, float scale, long long q0) {
    using namespace nvcuda;
    constexpr int LDT = D + 8, LDS = MK + 4, LDP = MK + 8, LDO = D + 4;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw);              // MQ x LDT
    T* Ks = Qs + MQ * LDT;                               // MK x LDT
    T* Vs = Ks + MK * LDT;                               // MK x LDT
    float* Sw = reinterpret_cast<float*>(Vs + MK * LDT); // per warp 16 x LDS
    T* Pw = reinterpret_cast<T*>(Sw + MWARPS * 16 * LDS); // per warp 16 x LDP
    float* Ow = reinterpret_cast<float*>(Pw + MWARPS * 16 * LDP); // per warp 16 x LDO
    __shared__ MaskDev mk;
    __shared__ long long qlo_s, qhi_s, lo_s[HPCATTN_MAX_SPANS], hi_s[HPCATTN_MAX_SPANS];
    __shared__ int nsp_s;

    const int head = blockIdx.y, kvh = head / G;
    const int t0 = blockIdx.x * MQ, t1 = min(nq, t0 + MQ);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    float* S = Sw + warp * 16 * LDS;
    T* P = Pw + warp * 16 * LDP;
    float* O = Ow + warp * 16 * LDO;

    if (tid == 0) {
        load_mask(mask_words, mk);
        long long lo = q0 + t0, hi = q0 + t1 - 1;
        if (qpos) {
            lo = hi = qpos[t0];
            for (int r = t0 + 1; r < t1; ++r) { lo = min(lo, qpos[r]); hi = max(hi, qpos[r]); }
        }
        qlo_s = lo;
        qhi_s = hi;
        nsp_s = mask_spans(mk, lo, hi, k0, k0 + nk, lo_s, hi_s);
    }
    stage<T, D, LDT>(q + ((size_t)head * nq + t0) * D, t1 - t0, MQ, Qs, tid);
    for (int e = lane; e < 16 * LDO; e += 32) O[e] = 0.f;

    // two lanes per query row: lane 2r and 2r+1 own row r of this warp, half of its columns each
    const int row = lane >> 1, half = lane & 1, grow = t0 + warp * 16 + row;
    const bool live = grow < t1;
    const long long pos = !live ? 0 : qpos ? qpos[grow] : q0 + grow;
    float m = -INFINITY, l = 0.f;
    unsigned long long n_edges = 0;
    const float sl2 = scale * MLOG2E;
    const T* kh = k + (size_t)kvh * nk * D;
    const T* vh = v + (size_t)kvh * nk * D;
    __syncthreads();

    for (int sp = 0; sp < nsp_s; ++sp) {
        for (long long c0 = lo_s[sp]; c0 < hi_s[sp]; c0 += MK) {
            const int nkt = (int)min((long long)MK, hi_s[sp] - c0);
            const bool full = mask_tile_full(mk, qlo_s, qhi_s, c0, c0 + nkt);
            __syncthreads();
            stage<T, D, LDT>(kh + (size_t)(c0 - k0) * D, nkt, MK, Ks, tid);
            stage<T, D, LDT>(vh + (size_t)(c0 - k0) * D, nkt, MK, Vs, tid);
            __syncthreads();
            // S = Q_w K^T
#pragma unroll
            for (int c = 0; c < MK / 16; ++c) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::fill_fragment(acc, 0.f);
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
                    wmma::load_matrix_sync(a, Qs + warp * 16 * LDT + kk * 16, LDT);
                    wmma::load_matrix_sync(b, Ks + c * 16 * LDT + kk * 16, LDT);
                    wmma::mma_sync(acc, a, b, acc);
                }
                wmma::store_matrix_sync(S + c * 16, acc, LDS, wmma::mem_row_major);
            }
            __syncwarp();
            // online softmax on this row's half (32 columns)
            float* srow = S + row * LDS + half * 32;
            T* prow = P + row * LDP + half * 32;
            float tmax = -INFINITY;
            unsigned int okbits = 0;
#pragma unroll 8
            for (int j = 0; j < 32; ++j) {
                const int col = half * 32 + j;
                const bool ok = live && col < nkt && (full || mask_allows(mk, pos, c0 + col));
                okbits |= (unsigned int)ok << j;
                const float s = ok ? srow[j] * sl2 : -INFINITY;
                srow[j] = s;
                tmax = fmaxf(tmax, s);
            }
            n_edges += __popc(okbits);
            tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
            const float m_new = fmaxf(m, tmax);
            const float alpha = m_new == -INFINITY ? 1.f : exp2f(m - m_new);
            float psum = 0.f;
#pragma unroll 8
            for (int j = 0; j < 32; ++j) {
                const float p = (okbits >> j) & 1 ? exp2f(srow[j] - m_new) : 0.f;
                prow[j] = from_f<T>(p);
                psum += p;
            }
            psum += __shfl_xor_sync(0xffffffffu, psum, 1);
            l = l * alpha + psum;
            m = m_new;
            float* orow = O + row * LDO + half * (D / 2);
#pragma unroll 8
            for (int d = 0; d < D / 2; ++d) orow[d] *= alpha;
            __syncwarp();
            // O += P V
#pragma unroll
            for (int dt = 0; dt < D / 16; ++dt) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::load_matrix_sync(acc, O + dt * 16, LDO, wmma::mem_row_major);
#pragma unroll
                for (int kk = 0; kk < MK / 16; ++kk) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                    wmma::load_matrix_sync(a, P + kk * 16, LDP);
                    wmma::load_matrix_sync(b, Vs + kk * 16 * LDT + dt * 16, LDT);
                    wmma::mma_sync(acc, a, b, acc);
                }
                wmma::store_matrix_sync(O + dt * 16, acc, LDO, wmma::mem_row_major);
            }
            __syncwarp();
        }
    }
    if (live) {
        const bool any = l > 0.f;
        const float inv = any ? 1.f / l : 0.f;
        const float* orow = O + row * LDO + half * (D / 2);
        TO* out = o + ((size_t)head * nq + grow) * D + half * (D / 2);
        for (int d = 0; d < D / 2; ++d) out[d] = from_f<TO>(orow[d] * inv);
        if (half == 0) lse[(size_t)head * nq + grow] = any ? (m + log2f(l)) * MLN2 : -INFINITY;
    }
    n_edges += __shfl_down_sync(0xffffffffu, n_edges, 16);
    n_edges += __shfl_down_sync(0xffffffffu, n_edges, 8);
    n_edges += __shfl_down_sync(0xffffffffu, n_edges, 4);
    n_edges += __shfl_down_sync(0xffffffffu, n_edges, 2);
    n_edges += __shfl_down_sync(0xffffffffu, n_edges, 1);
    if (head == 0 && lane == 0 && n_edges) atomicAdd(edges, n_edges);
}
