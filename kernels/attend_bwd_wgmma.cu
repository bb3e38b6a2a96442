// The tensor-core backward's key-major pass on Hopper's warpgroup MMA (wgmma, sm_90a) for
// float16/bfloat16 with D in {64, 128}: attend_bwd_kv_wg takes attend_bwd_kv's arguments and
// keeps its contract (attend_bwd_mma.cu), its mask handling and its rounding of P and dS to the
// input dtype (bwd.cuh), so that either can be launched. A block owns 64 NWG keys of one kv
// head, a warpgroup per 64 keys, and walks the 64-row query tiles that reach them for all G
// query heads of the group; all its threads double-buffer the (Q, dO) tiles and the rows'
// statistics with cp.async, as attend_bwd_kv does. Per tile, each warpgroup runs
// S^T = K Q^T and dP^T = V dO^T as wgmma m64n64k16 with both operands K-major in shared memory,
// then dV += P^T dO and dK += dS^T Q as wgmma m64nDk16 with P^T and dS^T re-packed from the
// accumulators in registers and dO and Q read N-major from the same tiles (FlashAttention-3's
// backward without its producer warpgroup). K, V, Q and dO sit in 128-byte swizzle atoms.
#include "bwd.cuh"
#include "wgmma.cuh"

// Shape: NWG warpgroups of 64 keys, MINB blocks per SM asked of the register allocator. Shared
// memory (1024-byte aligned: the host adds 1024 bytes): two stages of (Q, dO) tiles, the
// block's K and V rows, two stages of (lse, delta, positions).
template <typename T, int D, typename TO, int NWG, int MINB>
__global__ void __launch_bounds__(128 * NWG, MINB)
attend_bwd_kv_wg(const T* __restrict__ q, const long long* __restrict__ qpos, const T* __restrict__ k,
                 const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
                 const float* __restrict__ delta, TO* __restrict__ dk, TO* __restrict__ dv,
                 const long long* __restrict__ mask_words, const int* __restrict__ unsorted, int nq, int nk, int G,
                 long long k0, float scale, long long q0, BWD_STRIDES) {
    constexpr int BN = 64 * NWG, NT = 128 * NWG, TILE = BM * D;  // TILE in elements
    constexpr int WV = NWG > 1 ? 1 : 0;  // the warpgroup that loads V and dO (K and Q: warpgroup 0)
    extern __shared__ __align__(128) unsigned char smem_wg[];
    T* QO = reinterpret_cast<T*>(smem_wg + ((1024 - ((unsigned)__cvta_generic_to_shared(smem_wg) & 1023)) & 1023));
    T* Ks = QO + 4 * TILE;  // stage s: Q at QO + 2s TILE, dO at QO + (2s + 1) TILE
    T* Vs = Ks + BN * D;
    float* Ls = reinterpret_cast<float*>(Vs + BN * D);  // stage s at Ls + s BM; delta likewise
    float* Dls = Ls + 2 * BM;
    long long* Ps = reinterpret_cast<long long*>(Dls + 2 * BM);
    __shared__ MaskDev mk;
    __shared__ int nr_s, tlo_s[HPCATTN_MAX_SPANS], thi_s[HPCATTN_MAX_SPANS];

    const Strides qs{qbs, qhs, qrs}, ks{kbs, khs, krs};
    const int hk = blockIdx.y, kc0 = blockIdx.x * BN, kc1 = min(nk, kc0 + BN);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0), wq = warp & 3, wt = tid & 127;  // wg warp-uniform
    const size_t krow0 = ks.head(hk, H / G) + (size_t)kc0 * krs;  // the block's first key row
    if (wg == 0) load_tile_sw<T, D, BN>(k + krow0, krs, kc1 - kc0, Ks, wt);
    if (wg == WV) load_tile_sw<T, D, BN>(v + krow0, krs, kc1 - kc0, Vs, wt);
    cp_commit();
    if (warp == 0)
        key_block_tiles(mask_words, mk, qpos, unsorted, q0, nq, k0 + kc0, k0 + kc1 - 1, lane, tlo_s, thi_s, nr_s);
    __syncthreads();
    const int nr = nr_s;
    if (nr == 0 && sizeof(TO) == 4) {  // no query reaches these keys: the sums are unchanged
        cp_wait<0>();
        return;
    }

    // work items (query head gq of the group, query tile t), fetched one ahead of compute; none
    // when no query reaches these keys (dk, dv are then written as zeros)
    const int g_first = nr ? 0 : G, t_first = nr ? tlo_s[0] : 0;
    int fg = g_first, fr = 0, ft = t_first;
    auto fetch = [&](int s) {
        if (fg < G) {
            const int hq = hk * G + fg, r0 = ft * BM, rows = min(BM, nq - r0);
            const size_t qrow0 = qs.head(hq, H) + (size_t)r0 * qrs;
            if (wg == 0) load_tile_sw<T, D, BM>(q + qrow0, qrs, rows, QO + 2 * s * TILE, wt);
            if (wg == WV) load_tile_sw<T, D, BM>(dout + qrow0, qrs, rows, QO + (2 * s + 1) * TILE, wt);
            load_stats(lse, delta, qpos, hq, nq, r0, rows, Ls + s * BM, Dls + s * BM, Ps + s * BM, tid, NT);
            next_item(fg, fr, ft, nr, tlo_s, thi_s);
        }
        cp_commit();
    };
    fetch(0);

    // descriptors: this warpgroup's K and V rows (A, K-major), stage 0's Q and dO tiles as K-major
    // B operands of S^T and dP^T, and as N-major ones (atoms of 64 d's) of dK and dV
    const unsigned kdesc = wg_desc_lo(reinterpret_cast<const char*>(Ks) + wg * 64 * 128, 16);
    const unsigned vdesc = wg_desc_lo(reinterpret_cast<const char*>(Vs) + wg * 64 * 128, 16);
    const unsigned qk = wg_desc_lo(QO, 16), ok = wg_desc_lo(QO + TILE, 16);
    const unsigned qn = wg_desc_lo(QO, BM * 128), on = wg_desc_lo(QO + TILE, BM * 128);
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[j][e] = dva[j][e] = 0.f;
    const int kw0 = kc0 + 64 * wg + 16 * wq;  // this warp's first key row
    const bool live[1][2] = {{kw0 + g < kc1, kw0 + g + 8 < kc1}};
    const long long jpos[1][2] = {{k0 + kw0 + g, k0 + kw0 + g + 8}};
    const bool wg_live = kc0 + 64 * wg < kc1;  // uniform over the warpgroup, as wgmma needs
    const float sl2 = scale * MLOG2E;

    for (int buf = 0, cg = g_first, cr = 0, ct = t_first; cg < G; buf ^= 1) {
        fetch(buf ^ 1);
        cp_wait<1>();
        proxy_fence();  // the landed copies, before wgmma reads them through the async proxy
        __syncthreads();
        const int rows = min(BM, nq - ct * BM);
        const long long* Pb = Ps + buf * BM;
        if (wg_live) {
            const unsigned sb = buf * 2 * TILE * (unsigned)sizeof(T);  // the stage's byte offset
            float s[1][MK / 8][4], dp[1][MK / 8][4];
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {  // k16 = 32 bytes of a 128-byte atom row; atoms of 64 columns
                const unsigned a = (kk >> 2) * BN * 128 + (kk & 3) * 32, b = sb + (kk >> 2) * BM * 128 + (kk & 3) * 32;
                WgmmaSS<T>::run(s[0], wg_desc(kdesc, a), wg_desc(qk, b), kk > 0);
            }
            wg_commit();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned a = (kk >> 2) * BN * 128 + (kk & 3) * 32, b = sb + (kk >> 2) * BM * 128 + (kk & 3) * 32;
                WgmmaSS<T>::run(dp[0], wg_desc(vdesc, a), wg_desc(ok, b), kk > 0);
            }
            wg_commit();
            const TileRows tr = tile_rows(qpos != nullptr, Pb, q0 + (long long)ct * BM, rows, lane);  // MMAs run
            wgmma_wait<1>();  // S^T
            fence_regs(s[0]);
            kv_tile_mask(s, mk, tr, Pb, rows, k0 + kw0, k0 + min(kw0 + 16, kc1), live, jpos, tq);
            wgmma_wait<0>();  // dP^T
            fence_regs(dp[0]);
            float L[MK / 8][2], dl[MK / 8][2];
            column_stats(Ls + buf * BM, Dls + buf * BM, rows, tq, L, dl);
            unsigned pa[MK / 16][4], da[MK / 16][4];
            probabilities<T, true>(s[0], dp[0], sl2, nullptr, nullptr, L, dl, pa, da);
            fence_regs(dva);
            fence_regs(dka);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)  // a k16 step is 16 query rows
                Wgmma<T, D, 1>::run(dva, pa[kk], wg_desc(on, sb + kk * 16 * 128), 1);  // dV += P^T dO
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
                Wgmma<T, D, 1>::run(dka, da[kk], wg_desc(qn, sb + kk * 16 * 128), 1);  // dK += dS^T Q
            wg_commit();
            wgmma_wait<0>();  // before the stage is refilled and pa, da are overwritten
            fence_regs(dva);
            fence_regs(dka);
        }
        __syncthreads();  // every warpgroup is done with this stage before it is refilled
        next_item(cg, cr, ct, nr, tlo_s, thi_s);
    }
    cp_wait<0>();
    if (kw0 < kc1) {
        const size_t base = krow0 + (size_t)(kw0 - kc0) * krs;
        put_rows<D, TO>(dk + base, krs, dka, live[0], scale, g, tq);
        put_rows<D, TO>(dv + base, krs, dva, live[0], 1.f, g, tq);
    }
}
