// The Hopper forward for one full or window term (causal or not) over rows in one run (no
// positions array): dense causal blocks among them. FlashAttention-3's shape: 128-key tiles
// (S = Q K^T as one wgmma m64n128 per k16 step, one softmax over 128 columns), K and V in rings
// of their own, so that a K buffer goes back to the loader in the step of its S and a V buffer
// once its P V is done; the rest as attend_fwd_wgmma (persistent, heavy-first items, a loader
// warpgroup with cp.async, consumer warpgroups of 64 rows, S of tile t beside P V of tile t - 1).
// No per-tile plan: a run's rows give every tile's mask by arithmetic.
#include "attend_wgmma.cu"

constexpr int DN = 128;  // keys per tile

// The keys [lo, hi) (positions) an item's or a consumer's rows at positions [plo, phi] reach
// through the term (half-width a; causal: none after the row), within the block's [k0, k0 + nk)
__device__ __forceinline__ void dense_reach(long long plo, long long phi, long long a, bool causal, long long k0,
                                            int nk, long long& lo, long long& hi) {
    lo = max(k0, plo - a);
    hi = min(k0 + nk, (causal ? phi : phi + a) + 1);
}

template <typename T, int D, typename TO, int NWG, int STK, int STV, bool QREG>
__global__ void __launch_bounds__(128 * (NWG + 1), 1)
attend_fwd_dense(const T* q, const long long* __restrict__ qpos, const T* __restrict__ k,
                 const T* __restrict__ v, TO* o, float* __restrict__ lse,
                 unsigned long long* __restrict__ edges, const long long* __restrict__ mask_words,
                 int nq, int nk, int G, long long k0, float scale, long long q0, STRIDE_ARGS, int heads) {
    constexpr int BM = 64 * NWG, TILE = DN * D;  // TILE in elements
    constexpr int PREG = 24, CREG = consumer_regs(NWG, 1, PREG);
    extern __shared__ __align__(128) unsigned char smem_wg[];
    // K buffers, then V buffers, then two q buffers of BM rows (128-byte swizzle atoms)
    T* Kb = reinterpret_cast<T*>(smem_wg + ((1024 - ((unsigned)__cvta_generic_to_shared(smem_wg) & 1023)) & 1023));
    T* Vb = Kb + STK * TILE;
    T* Qbuf = Vb + STV * TILE;
    __shared__ MaskDev mk;
    __shared__ __align__(8) unsigned long long fullk[STK], emptyk[STK], fullv[STV], emptyv[STV], qfull_b[2], qempty_b[2];
    __shared__ unsigned long long edges_s;

    const Strides qs{qbs, qhs, qrs}, ks{kbs, khs, krs}, os{obs, ohs, ors};
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0), wq = warp & 3;
    const int nblk = (nq + BM - 1) / BM, nitems = nblk * heads;

    if (qpos) __trap();  // the host gives this kernel rows in one run only (forward.hopper_form)
    if (warp == 0) load_mask_warp(mask_words, mk, lane);
    if (tid == 0) {
        for (int b = 0; b < STK; ++b) {
            mb_init(&fullk[b], 128);
            mb_init(&emptyk[b], 4 * NWG);
        }
        for (int b = 0; b < STV; ++b) {
            mb_init(&fullv[b], 128);
            mb_init(&emptyv[b], 4 * NWG);
        }
        for (int b = 0; b < 2; ++b) {
            mb_init(&qfull_b[b], 128);
            mb_init(&qempty_b[b], 4 * NWG);
        }
        edges_s = 0ull;
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    const bool causal = mk.causal;
    const long long a = mk.kind[0] == T_FULL ? (1LL << 62) : min(mk.a[0], 1LL << 62);
    unsigned long long n_edges = 0;

    if (wg == 0) {  // the loader: per item its q rows, then K tile i + 1 before V tile i
        regs_dec<PREG>();
        int nkt = 0, nvt = 0;            // K and V tiles issued so far, over all items
        unsigned long long* pend = nullptr;  // the full barrier of the newest commit group, not yet signalled
        auto commit = [&](unsigned long long* bar) {  // signal the group before this one once it landed
            cp_commit();
            cp_wait<1>();
            if (pend) {
                proxy_fence();
                mb_arrive(pend);
            }
            pend = bar;
        };
        for (int n = 0, it = snake_item(0); it < nitems; it = snake_item(++n)) {
            int head, t0;
            item_place(it, heads, nblk, BM, head, t0);
            const int slot = n & 1, kvh = head / G, t1 = min(nq, t0 + BM);
            if (n >= 2) mb_wait(&qempty_b[slot], (n / 2 - 1) & 1);
            load_tile_sw<T, D, BM>(q + qs.head(head, H) + (size_t)t0 * qs.rs, qs.rs, t1 - t0, Qbuf + slot * BM * D, tid);
            commit(&qfull_b[slot]);
            long long lo, hi;
            dense_reach(q0 + t0, q0 + t1 - 1, a, causal, k0, nk, lo, hi);
            const int nt = lo < hi ? (int)((hi - lo + DN - 1) / DN) : 0;
            const T* kh = k + ks.head(kvh, H / G) + (size_t)(lo - k0) * ks.rs;
            const T* vh = v + ks.head(kvh, H / G) + (size_t)(lo - k0) * ks.rs;
            for (int i = 0; i <= nt; ++i) {
                if (i < nt) {
                    const int b = nkt % STK;
                    if (nkt >= STK) mb_wait(&emptyk[b], (nkt / STK - 1) & 1);
                    load_tile_sw<T, D, DN>(kh + (size_t)i * DN * ks.rs, ks.rs, (int)min((long long)DN, hi - lo - (long long)i * DN),
                                           Kb + b * TILE, tid);
                    commit(&fullk[b]);
                    ++nkt;
                }
                if (i > 0) {
                    const int b = nvt % STV;
                    if (nvt >= STV) mb_wait(&emptyv[b], (nvt / STV - 1) & 1);
                    load_tile_sw<T, D, DN>(vh + (size_t)(i - 1) * DN * ks.rs, ks.rs,
                                           (int)min((long long)DN, hi - lo - (long long)(i - 1) * DN), Vb + b * TILE, tid);
                    commit(&fullv[b]);
                    ++nvt;
                }
            }
        }
        cp_wait<0>();
        if (pend) {
            proxy_fence();
            mb_arrive(pend);
        }
    } else {
        regs_inc<CREG>();
        const int cw = wg - 1;
        const float sl2 = scale * MLOG2E;
        const unsigned kdesc = wg_desc_lo(Kb, 16), vdesc = wg_desc_lo(Vb, DN * 128);
        const unsigned qdesc = wg_desc_lo(reinterpret_cast<const char*>(Qbuf) + cw * 64 * 128, 16);
        int kb = 0, kph = 0, vb = 0, vph = 0;  // the next K / V buffer and its fill's parity
        auto waitk = [&]() { mb_wait(&fullk[kb], kph); };
        auto waitv = [&]() { mb_wait(&fullv[vb], vph); };
        auto relk = [&](int b) {
            __syncwarp();
            if (lane == 0) mb_arrive(&emptyk[b]);
        };
        auto relv = [&](int b) {
            __syncwarp();
            if (lane == 0) mb_arrive(&emptyv[b]);
        };
        auto nextk = [&]() {
            if (++kb == STK) {
                kb = 0;
                kph ^= 1;
            }
        };
        auto nextv = [&]() {
            if (++vb == STV) {
                vb = 0;
                vph ^= 1;
            }
        };
        for (int n = 0, it = snake_item(0); it < nitems; it = snake_item(++n)) {
            int head, t0;
            item_place(it, heads, nblk, BM, head, t0);
            const int slot = n & 1, t1 = min(nq, t0 + BM);
            long long lo, hi;
            dense_reach(q0 + t0, q0 + t1 - 1, a, causal, k0, nk, lo, hi);
            const int nt = lo < hi ? (int)((hi - lo + DN - 1) / DN) : 0;
            // this consumer's rows [w0, w1), the tiles [first, last] they reach, and the keys [lo_max, hi_min]
            // that every one of them reaches (a tile inside them needs no mask)
            const int w0 = t0 + 64 * cw, w1 = min(t1, w0 + 64);
            int first = 1, last = 0;
            long long lo_max = 0, hi_min = 0;
            if (w0 < w1 && nt > 0) {
                long long wl, wh, unused;
                dense_reach(q0 + w0, q0 + w1 - 1, a, causal, k0, nk, wl, wh);
                if (wl < wh) {
                    first = (int)((wl - lo) / DN);
                    last = (int)((wh - 1 - lo) / DN);
                }
                dense_reach(q0 + w1 - 1, q0 + w1 - 1, a, causal, k0, nk, lo_max, unused);  // the last row's first key
                dense_reach(q0 + w0, q0 + w0, a, causal, k0, nk, unused, hi_min);        // the first row's end
                hi_min -= 1;
            }
            const int r0 = w0 + 16 * wq + g, r1 = r0 + 8;
            const bool live0 = r0 < t1, live1 = r1 < t1;
            long long rl0, rh0, rl1, rh1;  // row keys [rl, rh), empty for rows past the block
            dense_reach(q0 + r0, q0 + r0, a, causal, k0, nk, rl0, rh0);
            dense_reach(q0 + r1, q0 + r1, a, causal, k0, nk, rl1, rh1);
            if (!live0) rl0 = rh0 = 0;
            if (!live1) rl1 = rh1 = 0;
            if (head == 0 && tq == 0) n_edges += (unsigned long long)(max(rh0 - rl0, 0LL) + max(rh1 - rl1, 0LL));

            mb_wait(&qfull_b[slot], (n / 2) & 1);
            const T* Qs = Qbuf + slot * BM * D;
            float oacc[D / 8][4];
#pragma unroll
            for (int j = 0; j < D / 8; ++j) oacc[j][0] = oacc[j][1] = oacc[j][2] = oacc[j][3] = 0.f;
            float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f, a0 = 1.f, a1 = 1.f;
            float s[16][4];
            unsigned pa[2][MK / 16][4];
            unsigned qa[QREG ? D / 16 : 1][4];
            if (QREG) {
                const int r = 64 * cw + 16 * wq + (lane & 15);
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const int c = 2 * kk + (lane >> 4);
                    ldsm4(qa[QREG ? kk : 0], reinterpret_cast<const char*>(Qs) + (c >> 3) * BM * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
                }
            }
            auto issue_s = [&](int b) {
                const unsigned qb = slot * BM * D * (unsigned)sizeof(T), kbo = b * TILE * (unsigned)sizeof(T);
                fence_regs(s);
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const unsigned long long kd = wg_desc(kdesc, kbo + (kk >> 2) * DN * 128 + (kk & 3) * 32);
                    if (QREG)
                        Wgmma<T, 128, 0>::run(s, qa[QREG ? kk : 0], kd, kk > 0);
                    else
                        WgmmaSS<T, 0, 0, 128>::run(s, wg_desc(qdesc, qb + (kk >> 2) * BM * 128 + (kk & 3) * 32), kd, kk > 0);
                }
                wg_commit();
            };
            auto issue_pv = [&](int b) {
                fence_regs(oacc);
                scale_rows(oacc, a0, a1);
                fence_regs(oacc);
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < DN / 16; ++kk)
                    Wgmma<T, D, 1>::run(oacc, pa[kk / (MK / 16)][kk % (MK / 16)],
                                        wg_desc(vdesc, b * TILE * (unsigned)sizeof(T) + kk * 16 * 128), 1);
                wg_commit();
            };
            // tile t's scores: the mask where the tile is not wholly inside it, then the softmax
            auto softmax = [&](int t) {
                const long long c0 = lo + (long long)t * DN;
                if (!(c0 >= lo_max && c0 + DN - 1 <= hi_min)) {
                    const int l0c = (int)max(min(rl0 - c0, (long long)DN), -1LL), h0c = (int)max(min(rh0 - c0, (long long)DN), -1LL);
                    const int l1c = (int)max(min(rl1 - c0, (long long)DN), -1LL), h1c = (int)max(min(rh1 - c0, (long long)DN), -1LL);
#pragma unroll
                    for (int j = 0; j < 16; ++j)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int c = 8 * j + 2 * tq + e;
                            if (!(c >= l0c && c < h0c)) s[j][e] = -INFINITY;
                            if (!(c >= l1c && c < h1c)) s[j][2 + e] = -INFINITY;
                        }
                }
                wg_softmax<2>(reinterpret_cast<float(&)[2][MK / 8][4]>(s), sl2, m0, m1, l0, l1, a0, a1);
            };
            auto pack = [&]() {
#pragma unroll
                for (int h = 0; h < 2; ++h) wg_pack<T>(reinterpret_cast<float(&)[2][MK / 8][4]>(s)[h], pa[h]);
            };
            auto skip = [&]() {  // a tile this consumer's rows do not reach
                waitk();
                relk(kb);
                nextk();
                waitv();
                relv(vb);
                nextv();
            };
            int t = 0;
            for (; t < first && t < nt; ++t) skip();  // tiles before this consumer's rows reach
            if (first <= last) {
                int pvb;
                waitk();
                issue_s(kb);
                wgmma_wait<0>();
                fence_regs(s);
                relk(kb);
                nextk();
                softmax(t);
                pack();
                for (++t; t <= last; ++t) {
                    waitk();
                    issue_s(kb);
                    waitv();
                    pvb = vb;
                    issue_pv(pvb);
                    wgmma_wait<1>();
                    fence_regs(s);
                    softmax(t);
                    relk(kb);
                    nextk();
                    // the next tile's K, which the next step takes anyway: the wait's loop ends ptxas' basic
                    // block, so that the wait for P V stays after the softmax (ptxas moves a wgmma wait to the
                    // top of its block; tests/gpu/test_gpu_sass.py checks the order)
                    if (t + 1 < nt) waitk();
                    wgmma_wait<0>();
                    fence_regs(oacc);
                    relv(pvb);
                    nextv();
                    pack();
                }
                waitv();
                pvb = vb;
                issue_pv(pvb);
                wgmma_wait<0>();
                fence_regs(oacc);
                relv(pvb);
                nextv();
            }
            for (; t < nt; ++t) skip();  // tiles after
            __syncwarp();
            if (lane == 0) mb_arrive(&qempty_b[slot]);

            l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
            l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
            const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
            const size_t ohead = os.head(head, H);
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                if (live0) store2<TO>(o + ohead + (size_t)r0 * os.rs + 8 * j + 2 * tq, oacc[j][0] * i0, oacc[j][1] * i0);
                if (live1) store2<TO>(o + ohead + (size_t)r1 * os.rs + 8 * j + 2 * tq, oacc[j][2] * i1, oacc[j][3] * i1);
            }
            if (tq == 0 && live0) lse[(size_t)head * nq + r0] = l0 > 0.f ? (m0 + log2f(l0)) * MLN2 : -INFINITY;
            if (tq == 0 && live1) lse[(size_t)head * nq + r1] = l1 > 0.f ? (m1 + log2f(l1)) * MLN2 : -INFINITY;
        }
    }

#pragma unroll
    for (int sh = 16; sh > 0; sh >>= 1) n_edges += __shfl_xor_sync(0xffffffffu, n_edges, sh);
    if (lane == 0 && n_edges) atomicAdd(&edges_s, n_edges);
    __syncthreads();
    if (tid == 0 && edges_s) atomicAdd(edges, edges_s);
}
