// Local sparse attention, CUDA cores, any head dim up to DMAX, float16/bfloat16/float32 input,
// float32 accumulation. Layout (hpcattn/cpu/local.py): q (B,Hkv,G,nq,D), k/v (B,Hkv,nk,D) holding
// keys k0..k0+nk-1, o (B,Hkv,G,nq,D) float32 normalised, lse (B,Hkv,G,nq) float32.
// Grid: x = query tiles of BQ rows, y = query heads (b, hkv, g). 4 warps, BQ/4 rows each;
// each key tile of BK keys is staged once in shared memory for all BQ rows.
#include "mask.cuh"

#define BQ 16
#define BK 32
#define NWARP 4
#define ROWS (BQ / NWARP)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

struct TileInfo {
    MaskDev mask;
    long long qlo, qhi;
    int n_spans;
    long long lo[HPCATTN_MAX_SPANS], hi[HPCATTN_MAX_SPANS];
};

// Thread 0 fills the tile's mask, position range and key spans; returns after a barrier.
__device__ __forceinline__ void tile_setup(TileInfo& ti, const long long* __restrict__ mask_words,
                                           const long long* __restrict__ qpos, int t0, int t1,
                                           long long k0, int nk) {
    if (threadIdx.x == 0) {
        load_mask(mask_words, ti.mask);
        long long lo = qpos[t0], hi = qpos[t0];
        for (int r = t0 + 1; r < t1; ++r) { lo = min(lo, qpos[r]); hi = max(hi, qpos[r]); }
        ti.qlo = lo;
        ti.qhi = hi;
        ti.n_spans = mask_spans(ti.mask, lo, hi, k0, k0 + nk, ti.lo, ti.hi);
    }
    __syncthreads();
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(NWARP * 32)
attend_fwd(const T* __restrict__ q, const long long* __restrict__ qpos, const T* __restrict__ k,
           const T* __restrict__ v, float* __restrict__ o, float* __restrict__ lse,
           unsigned long long* __restrict__ edges, const long long* __restrict__ mask_words,
           int nq, int nk, int D, int G, long long k0, float scale) {
    constexpr int PER = DMAX / 32;
    extern __shared__ float smem[];
    float* qs = smem;                   // BQ x DMAX, pre-multiplied by scale*log2(e)
    float* ks = qs + BQ * DMAX;         // BK x (DMAX+1): lane-per-key reads are conflict-free
    float* vs = ks + BK * (DMAX + 1);   // BK x DMAX
    __shared__ TileInfo ti;

    const int head = blockIdx.y, kvh = head / G;
    const int t0 = blockIdx.x * BQ, t1 = min(nq, t0 + BQ);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const T* kh = k + (size_t)kvh * nk * D;
    const T* vh = v + (size_t)kvh * nk * D;
    tile_setup(ti, mask_words, qpos, t0, t1, k0, nk);
    load_rows<T>(q + ((size_t)head * nq + t0) * D, t1 - t0, D, qs, DMAX, scale * LOG2E, tid, NWARP * 32);

    float m[ROWS], l[ROWS], acc[ROWS][PER];
    long long pos[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.f;
        const int row = t0 + warp * ROWS + r;
        pos[r] = row < t1 ? qpos[row] : 0;
#pragma unroll
        for (int u = 0; u < PER; ++u) acc[r][u] = 0.f;
    }
    unsigned long long n_edges = 0;

    for (int sp = 0; sp < ti.n_spans; ++sp) {
        for (long long c0 = ti.lo[sp]; c0 < ti.hi[sp]; c0 += BK) {
            const int nkt = (int)min((long long)BK, ti.hi[sp] - c0);
            const bool full = mask_tile_full(ti.mask, ti.qlo, ti.qhi, c0, c0 + nkt);
            __syncthreads();  // previous tile fully consumed
            load_rows<T>(kh + (size_t)(c0 - k0) * D, nkt, D, ks, DMAX + 1, 1.f, tid, NWARP * 32);
            load_rows<T>(vh + (size_t)(c0 - k0) * D, nkt, D, vs, DMAX, 1.f, tid, NWARP * 32);
            __syncthreads();
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int lr = warp * ROWS + r;
                if (t0 + lr >= t1) break;
                const bool ok = lane < nkt && (full || mask_allows(ti.mask, pos[r], c0 + lane));
                n_edges += __popc(__ballot_sync(0xffffffffu, ok)) * (lane == 0);
                float s = -INFINITY;
                if (ok) {
                    const float* qr = qs + lr * DMAX;
                    const float* kr = ks + lane * (DMAX + 1);
                    float d0 = 0.f, d1 = 0.f;
                    int d = 0;
                    for (; d + 1 < D; d += 2) { d0 = fmaf(qr[d], kr[d], d0); d1 = fmaf(qr[d + 1], kr[d + 1], d1); }
                    if (d < D) d0 = fmaf(qr[d], kr[d], d0);
                    s = d0 + d1;
                }
                const float m_new = fmaxf(m[r], warp_max(s));
                if (m_new == -INFINITY) continue;  // no edge of this row in the tile yet
                const float p = ok ? exp2f(s - m_new) : 0.f;
                const float alpha = exp2f(m[r] - m_new);  // 0 when m was -inf
                l[r] = l[r] * alpha + warp_sum(p);
                m[r] = m_new;
#pragma unroll
                for (int u = 0; u < PER; ++u) acc[r][u] *= alpha;
                for (int e = 0; e < nkt; ++e) {
                    const float pe = __shfl_sync(0xffffffffu, p, e);
                    if (pe == 0.f) continue;
                    const float* vr = vs + e * DMAX;
#pragma unroll
                    for (int u = 0; u < PER; ++u) acc[r][u] = fmaf(pe, vr[lane + 32 * u], acc[r][u]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = t0 + warp * ROWS + r;
        if (row >= t1) break;
        const bool any = l[r] > 0.f;
        const float inv = any ? 1.f / l[r] : 0.f;
        float* orow = o + ((size_t)head * nq + row) * D;
#pragma unroll
        for (int u = 0; u < PER; ++u)
            if (lane + 32 * u < D) orow[lane + 32 * u] = acc[r][u] * inv;
        if (lane == 0) lse[(size_t)head * nq + row] = any ? (m[r] + log2f(l[r])) * LN2 : -INFINITY;
    }
    if (head == 0 && lane == 0 && n_edges) atomicAdd(edges, n_edges);
}

// Backward over one key block, given the forward's global lse and delta = rowsum(dO * O):
// adds this block's share to dq (like q, float32; each row owned by one block) and, atomically,
// to dk, dv (like k, float32). Same tiling as attend_fwd; edges counted as there.
template <typename T, int DMAX>
__global__ void __launch_bounds__(NWARP * 32)
attend_bwd(const T* __restrict__ q, const long long* __restrict__ qpos, const T* __restrict__ k,
           const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
           const float* __restrict__ delta, float* __restrict__ dq, float* __restrict__ dk,
           float* __restrict__ dv, unsigned long long* __restrict__ edges,
           const long long* __restrict__ mask_words,
           int nq, int nk, int D, int G, long long k0, float scale) {
    constexpr int PER = DMAX / 32;
    extern __shared__ float smem[];
    float* qs = smem;                   // BQ x DMAX (unscaled q)
    float* dos = qs + BQ * DMAX;        // BQ x DMAX
    float* ks = dos + BQ * DMAX;        // BK x (DMAX+1)
    float* vs = ks + BK * (DMAX + 1);   // BK x (DMAX+1)
    float* dks = vs + BK * (DMAX + 1);  // BK x DMAX, this tile's dK, dV sums over the BQ rows
    float* dvs = dks + BK * DMAX;
    __shared__ TileInfo ti;

    const int head = blockIdx.y, kvh = head / G;
    const int t0 = blockIdx.x * BQ, t1 = min(nq, t0 + BQ);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const T* kh = k + (size_t)kvh * nk * D;
    const T* vh = v + (size_t)kvh * nk * D;
    tile_setup(ti, mask_words, qpos, t0, t1, k0, nk);
    load_rows<T>(q + ((size_t)head * nq + t0) * D, t1 - t0, D, qs, DMAX, 1.f, tid, NWARP * 32);
    load_rows<T>(dout + ((size_t)head * nq + t0) * D, t1 - t0, D, dos, DMAX, 1.f, tid, NWARP * 32);

    float acc[ROWS][PER], lrow[ROWS], drow[ROWS];
    long long pos[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = t0 + warp * ROWS + r;
        pos[r] = row < t1 ? qpos[row] : 0;
        lrow[r] = row < t1 ? lse[(size_t)head * nq + row] : -INFINITY;
        drow[r] = row < t1 ? delta[(size_t)head * nq + row] : 0.f;
#pragma unroll
        for (int u = 0; u < PER; ++u) acc[r][u] = 0.f;
    }
    unsigned long long n_edges = 0;

    for (int sp = 0; sp < ti.n_spans; ++sp) {
        for (long long c0 = ti.lo[sp]; c0 < ti.hi[sp]; c0 += BK) {
            const int nkt = (int)min((long long)BK, ti.hi[sp] - c0);
            const bool full = mask_tile_full(ti.mask, ti.qlo, ti.qhi, c0, c0 + nkt);
            __syncthreads();
            load_rows<T>(kh + (size_t)(c0 - k0) * D, nkt, D, ks, DMAX + 1, 1.f, tid, NWARP * 32);
            load_rows<T>(vh + (size_t)(c0 - k0) * D, nkt, D, vs, DMAX + 1, 1.f, tid, NWARP * 32);
            for (int e = tid; e < BK * DMAX; e += NWARP * 32) { dks[e] = 0.f; dvs[e] = 0.f; }
            __syncthreads();
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int lr = warp * ROWS + r;
                if (t0 + lr >= t1) break;
                const bool ok = lane < nkt && (full || mask_allows(ti.mask, pos[r], c0 + lane));
                n_edges += __popc(__ballot_sync(0xffffffffu, ok)) * (lane == 0);
                if (lrow[r] == -INFINITY) continue;  // a row with no edge anywhere
                float p = 0.f, ds = 0.f;
                if (ok) {
                    const float* qr = qs + lr * DMAX;
                    const float* dr = dos + lr * DMAX;
                    const float* kr = ks + lane * (DMAX + 1);
                    const float* vr = vs + lane * (DMAX + 1);
                    float s = 0.f, dp = 0.f;
                    for (int d = 0; d < D; ++d) { s = fmaf(qr[d], kr[d], s); dp = fmaf(dr[d], vr[d], dp); }
                    p = expf(s * scale - lrow[r]);
                    ds = p * (dp - drow[r]) * scale;
                }
                if (!__any_sync(0xffffffffu, ok)) continue;
                const float* qr = qs + lr * DMAX;
                const float* dr = dos + lr * DMAX;
                for (int e = 0; e < nkt; ++e) {
                    const float pe = __shfl_sync(0xffffffffu, p, e);
                    const float dse = __shfl_sync(0xffffffffu, ds, e);
                    if (pe == 0.f && dse == 0.f) continue;
                    const float* kr = ks + e * (DMAX + 1);
#pragma unroll
                    for (int u = 0; u < PER; ++u) {
                        const int d = lane + 32 * u;
                        if (d < D) {
                            acc[r][u] = fmaf(dse, kr[d], acc[r][u]);
                            atomicAdd(dks + e * DMAX + d, dse * qr[d]);
                            atomicAdd(dvs + e * DMAX + d, pe * dr[d]);
                        }
                    }
                }
            }
            __syncthreads();
            float* dkh = dk + ((size_t)kvh * nk + (c0 - k0)) * D;
            float* dvh = dv + ((size_t)kvh * nk + (c0 - k0)) * D;
            for (int e = tid; e < nkt * D; e += NWARP * 32) {
                const int j = e / D, d = e - j * D;
                const float a = dks[j * DMAX + d], b = dvs[j * DMAX + d];
                if (a != 0.f) atomicAdd(dkh + e, a);
                if (b != 0.f) atomicAdd(dvh + e, b);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = t0 + warp * ROWS + r;
        if (row >= t1) break;
        float* out = dq + ((size_t)head * nq + row) * D;
#pragma unroll
        for (int u = 0; u < PER; ++u)
            if (lane + 32 * u < D) out[lane + 32 * u] += acc[r][u];
    }
    if (head == 0 && lane == 0 && n_edges) atomicAdd(edges, n_edges);
}
