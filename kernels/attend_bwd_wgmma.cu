// The tensor-core backward's two passes on Hopper's warpgroup MMA (wgmma, sm_90a) for
// float16/bfloat16 with D in {64, 128}, drop-ins for attend_bwd_mma.cu's: attend_bwd_kv_wg (dk,
// dv) takes attend_bwd_kv's arguments and contract, attend_bwd_q_wg (dq and the edges)
// attend_bwd_q's, with their mask handling and rounding of P and dS to the input dtype (bwd.cuh),
// so that either can be launched. Both are warp-specialised as attend_wgmma.cu's forward is
// (FlashAttention-3's layout): warpgroup 0 loads tiles into a ring of ST shared-memory stages
// (Ring; attend_bwd_q_wg with cp.async, attend_bwd_kv_wg by TMA), NWG consumer warpgroups compute, each at its own pace, so that one's mask
// and probabilities overlap another's MMAs; setmaxnreg moves registers to the consumers.
// Per tile, a consumer runs the two score products as wgmma m64n64k16 with both operands
// K-major in shared memory, then the gradient products as wgmma m64nDk16 with P or dS re-packed
// from the accumulators in registers and the other operand read N-major from the same tiles.
// Every operand sits in 128-byte swizzle atoms.
#include "bwd_keys.cuh"

// The key-major pass (bwd_keys.cuh's key_pass without dq): dk and dv of a block of 64 NWG keys
// of one kv head, on a grid of (key blocks, kv heads); q, k, v and dout read through tm's maps.
template <typename T, int D, typename TO, int NWG, int ST, int MINB>
__global__ void __launch_bounds__(128 * (NWG + 1), MINB)
attend_bwd_kv_wg(const T* __restrict__ q, const long long* __restrict__ qpos, const T* __restrict__ k,
                 const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
                 const float* __restrict__ delta, TO* __restrict__ dk, TO* __restrict__ dv,
                 const long long* __restrict__ mask_words, const int* __restrict__ unsorted, int nq, int nk, int G,
                 long long k0, float scale, long long q0, BWD_STRIDES, const __grid_constant__ TmaMaps tm) {
    key_pass<T, D, TO, NWG, ST, MINB, false, false, false>(&tm, qpos, lse, delta, dk, dv, nullptr, nullptr,
                                                         nullptr, nullptr, mask_words, unsorted, nq, nk, G, k0, scale, q0,
                                                         BWD_STRIDE_ARGS);
}

// A query-major block's head and first row, blocks in the order of falling row tiles across all
// heads (block i: head i % heads, tile ntiles - 1 - i / heads on a grid of ntiles heads blocks):
// under a causal mask the last tiles reach the most keys, and blocks start in blockIdx order.
__device__ __forceinline__ void heavy_first(int nq, int BR, int& head, int& t0) {
    const int nt = (nq + BR - 1) / BR, heads = gridDim.x / nt, i = blockIdx.x;
    head = i % heads;
    t0 = (nt - 1 - i / heads) * BR;
}

// Warp 0's part of attend_bwd_q_wg's set-up: the mask words; the key spans of the block's rows
// [t0, t1) (lo_s, hi_s, nsp_s: the tiles the block walks); for warpgroup w, the lowest and
// highest position of its rows [t0 + 64 w, t0 + 64 w + 64) (qlo_s[w], qhi_s[w]) and their key
// spans (wlo_s[w], whi_s[w], wn_s[w]: the tiles it computes, within the block's; none when it
// has no row).
template <int NWG>
__device__ __forceinline__ void q_block_spans(const long long* __restrict__ mask_words, MaskDev& mk,
                                              const long long* __restrict__ qpos, long long q0, int t0, int t1,
                                              long long k0, int nk, int lane, long long* qlo_s, long long* qhi_s,
                                              long long (*wlo_s)[HPCATTN_MAX_SPANS],
                                              long long (*whi_s)[HPCATTN_MAX_SPANS], int* wn_s, long long* lo_s,
                                              long long* hi_s, int& nsp_s) {
    load_mask_warp(mask_words, mk, lane);
    long long blo = 0x7fffffffffffffffLL, bhi = -0x7fffffffffffffffLL - 1;
#pragma unroll
    for (int w = 0; w < NWG; ++w) {
        const int r0 = min(t1, t0 + 64 * w), r1 = min(t1, r0 + 64);
        long long lo, hi;
        row_positions(qpos, q0, r0, r1, lane, lo, hi);
        if (r0 < r1) {
            blo = min(blo, lo);
            bhi = max(bhi, hi);
        }
        if (lane == w) {
            qlo_s[w] = lo;
            qhi_s[w] = hi;
            wn_s[w] = r0 < r1 ? mask_spans(mk, lo, hi, k0, k0 + nk, wlo_s[w], whi_s[w]) : 0;
        }
    }
    if (lane == 0) nsp_s = mask_spans(mk, blo, bhi, k0, k0 + nk, lo_s, hi_s);
}

// The query-major pass: a block owns 64 NWG query rows of one query head, a consumer warpgroup
// per 64 rows. The loader loads the block's q and dO rows once, then streams the K/V tiles of
// the block's key spans into the ring; a consumer computes the tiles its own rows' key spans
// reach and releases every stage, computed or skipped. Per tile, S = Q K^T and dP = dO V^T, then
// dQ += dS K (no atomics: each block owns its rows' dq, in float32 registers until the end).
// Shape: NWG consumer warpgroups, ST stages, MINB blocks per SM asked of the register allocator.
// Shared memory (1024-byte aligned: the host adds 1024 bytes): ST stages of (K, V) tiles, then
// the block's q and dO rows. A 1-D grid of ntiles heads blocks (heavy_first).
template <typename T, int D, typename TO, int NWG, int ST, int MINB>
__global__ void __launch_bounds__(128 * (NWG + 1), MINB)
attend_bwd_q_wg(const T* __restrict__ q, const long long* __restrict__ qpos, const T* __restrict__ k,
                const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
                const float* __restrict__ delta, TO* __restrict__ dq, unsigned long long* __restrict__ edges,
                const long long* __restrict__ mask_words, int nq, int nk, int G, long long k0, float scale,
                long long q0, BWD_STRIDES) {
    constexpr int BR = 64 * NWG, TILE = MK * D;  // TILE in elements
    // the loader's copies of a D = 128 tile need more than 24 registers; the consumers need ~200
    constexpr int PREG = D > 64 ? 56 : 24, CREG = consumer_regs(NWG, MINB, PREG);
    static_assert(ST >= 2, "the loader fills one stage while the consumers compute another");
    extern __shared__ __align__(128) unsigned char smem_wg[];
    T* KV = reinterpret_cast<T*>(smem_wg + ((1024 - ((unsigned)__cvta_generic_to_shared(smem_wg) & 1023)) & 1023));
    T* Qs = KV + 2 * ST * TILE;  // stage s: K at KV + 2s TILE, V at KV + (2s + 1) TILE; then q, dO rows
    T* Os = Qs + BR * D;
    __shared__ MaskDev mk;
    __shared__ long long lo_s[HPCATTN_MAX_SPANS], hi_s[HPCATTN_MAX_SPANS];
    __shared__ long long wqlo_s[NWG], wqhi_s[NWG], wlo_s[NWG][HPCATTN_MAX_SPANS], whi_s[NWG][HPCATTN_MAX_SPANS];
    __shared__ int nsp_s, wn_s[NWG];
    __shared__ unsigned long long edges_s;
    __shared__ __align__(8) Ring<ST> ring;

    const Strides qs{qbs, qhs, qrs}, ks{kbs, khs, krs};
    int head, t0;
    heavy_first(nq, BR, head, t0);
    const int kvh = head / G, t1 = min(nq, t0 + BR);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0), wq = warp & 3;  // wg warp-uniform
    const size_t qrow0 = qs.head(head, H) + (size_t)t0 * qrs;
    if (wg == 0) {  // q and dO: the first commit group, landed before the first tile is signalled
        load_tile_sw<T, D, BR>(q + qrow0, qrs, t1 - t0, Qs, tid);
        load_tile_sw<T, D, BR>(dout + qrow0, qrs, t1 - t0, Os, tid);
        cp_commit();
        if (warp == 0) {
            q_block_spans<NWG>(mask_words, mk, qpos, q0, t0, t1, k0, nk, lane, wqlo_s, wqhi_s, wlo_s, whi_s, wn_s,
                               lo_s, hi_s, nsp_s);
            if (lane == 0) edges_s = 0ull;
        }
    } else if (tid == 128) {
        ring.init(NWG);
    }
    __syncthreads();
    const int nsp = nsp_s;
    if (nsp == 0 && sizeof(TO) == 4) {  // the rows reach no key here: their sums are unchanged, no edge
        cp_wait<0>();
        return;
    }
    unsigned long long n_edges = 0;

    if (wg == 0) {  // the loader: K/V tiles [c0, c0 + 64) of the spans in order
        regs_dec<PREG>();
        const T* kh = k + ks.head(kvh, H / G);
        const T* vh = v + ks.head(kvh, H / G);
        RingLoad<ST> ld{ring};
        int sp = 0;
        for (long long c0 = nsp ? lo_s[0] : 0; sp < nsp; next_tile(sp, c0, nsp, lo_s, hi_s)) {
            const int s = ld.stage(), n = (int)min((long long)MK, hi_s[sp] - c0);
            const size_t off = (size_t)(c0 - k0) * krs;
            load_tile_sw<T, D, MK>(kh + off, krs, n, KV + 2 * s * TILE, tid);
            load_tile_sw<T, D, MK>(vh + off, krs, n, KV + (2 * s + 1) * TILE, tid);
            ld.issued();
        }
        ld.finish();
    } else {
        regs_inc<CREG>();
        const int cw = wg - 1;  // consumer index: rows [t0 + 64 cw, t0 + 64 cw + 64)
        // this thread's rows r0 + 8h of the consumer's 64 (the accumulators' rows)
        const int rw0 = t0 + 64 * cw + 16 * wq;  // this warp's first row
        bool live[1][2];
        long long pos[1][2];
        float Lr[2], dr[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = rw0 + g + 8 * h;
            live[0][h] = r < t1;
            pos[0][h] = r >= t1 ? 0 : qpos ? qpos[r] : q0 + r;
            const float x = r < t1 ? lse[(size_t)head * nq + r] : -INFINITY;
            Lr[h] = x == -INFINITY ? INFINITY : x * MLOG2E;
            dr[h] = r < t1 ? delta[(size_t)head * nq + r] : 0.f;
        }
        const int wn = wn_s[cw];
        const long long wqlo = wqlo_s[cw], wqhi = wqhi_s[cw];
        const long long* wlo = wlo_s[cw];
        const long long* whi = whi_s[cw];
        int ws = 0;  // the first of the consumer's spans that ends past the current tile's first key
        float dqa[D / 8][4];
#pragma unroll
        for (int j = 0; j < D / 8; ++j) dqa[j][0] = dqa[j][1] = dqa[j][2] = dqa[j][3] = 0.f;
        const float sl2 = scale * MLOG2E;
        const float dummy[MK / 8][2] = {};
        // descriptors: this consumer's q and dO rows (A, K-major: atoms of 64 d's BR rows apart),
        // stage 0's K and V tiles as K-major B operands of S and dP, and K as the N-major B of dQ
        const unsigned qdesc = wg_desc_lo(reinterpret_cast<const char*>(Qs) + cw * 64 * 128, 16);
        const unsigned odesc = wg_desc_lo(reinterpret_cast<const char*>(Os) + cw * 64 * 128, 16);
        const unsigned kdesc = wg_desc_lo(KV, 16), vdesc = wg_desc_lo(KV + TILE, 16);
        const unsigned kn = wg_desc_lo(KV, MK * 128);
        RingUse<ST> use{ring};
        // a tile's dQ MMA runs on beside the next tile's S and dP: its stage is held (use.hold)
        // and released once that MMA is done, before this consumer waits for a later refill. The
        // waits do not depend on whether a stage is held (ptxas then sees every use of dqa after one).
        auto done_held = [&]() {
            fence_regs(dqa);
            use.release_held();
        };
        int sp = 0;
        for (long long c0 = nsp ? lo_s[0] : 0; sp < nsp; next_tile(sp, c0, nsp, lo_s, hi_s)) {
            const int nkt = (int)min((long long)MK, hi_s[sp] - c0);
            use.wait();
            while (ws < wn && whi[ws] <= c0) ++ws;
            if (ws < wn && wlo[ws] < c0 + nkt) {  // uniform over the warpgroup, as wgmma needs
                const unsigned kb = use.s * 2 * TILE * (unsigned)sizeof(T);  // the stage's byte offset
                float s[1][MK / 8][4], dp[1][MK / 8][4];
                wg_fence();
                score_products<T, D, BR, MK>(s[0], dp[0], qdesc, kdesc, odesc, vdesc, kb);
                const bool full = nkt == MK && mask_tile_full(mk, wqlo, wqhi, c0, c0 + MK);  // the MMAs run
                wgmma_wait<2>();  // the last tile's dQ, if any (the oldest of three groups)
                done_held();
                wgmma_wait<1>();  // S
                fence_regs(s[0]);
                mask_scores<1>(s, mk, live, pos, c0, nkt, full, tq, n_edges);
                weights<false>(s[0], sl2, Lr, dummy);  // P, as far as ptxas lets it, while dP runs
                wgmma_wait<0>();  // dP
                fence_regs(dp[0]);
                unsigned pa[MK / 16][4], da[MK / 16][4];
                score_grads<T, false>(s[0], dp[0], dr, dummy, pa, da);
                fence_regs(dqa);
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < MK / 16; ++kk)  // a k16 step is 16 keys; K is N-major, atoms of 64 d's
                    Wgmma<T, D, 1>::run(dqa, da[kk], wg_desc(kn, kb + kk * 16 * 128), 1);  // dQ += dS K
                wg_commit();
                use.hold();
            } else {
                wgmma_wait<0>();
                done_held();
                use.release();
            }
        }
        wgmma_wait<0>();
        done_held();
        put_rows<D, TO>(dq + qrow0 + (size_t)(rw0 - t0) * qrs, qrs, dqa, live[0], scale, g, tq);
    }

#pragma unroll
    for (int s = 16; s > 0; s >>= 1) n_edges += __shfl_xor_sync(0xffffffffu, n_edges, s);
    if (lane == 0 && n_edges) atomicAdd(&edges_s, n_edges);
    __syncthreads();
    if (tid == 0 && head == 0 && edges_s) atomicAdd(edges, edges_s);
}
