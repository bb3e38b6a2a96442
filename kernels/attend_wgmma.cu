// Local sparse attention forward on Hopper's warpgroup MMA (wgmma, sm_90a) for float16/bfloat16
// with head dim D in {64, 128}: same contract and mask handling as attend_fwd_mma in
// attend_mma.cu, whose helpers it shares (tiles.cuh); the structure (persistent, a loader
// warpgroup and consumer warpgroups) is described above the kernel. S = Q K^T is wgmma m64n64k16
// with Q in registers or shared memory and the K tile in shared memory; O += P V is wgmma m64nDk16
// with P re-packed from S's accumulators in registers and the V tile read N-major from shared
// memory. q, K and V sit in shared memory in 128-byte swizzle atoms (without the swizzle the MMAs'
// reads were bank-bound).
#include "wgmma.cuh"

// named barrier ID: wait for N threads (this warp's included) / count this warp among them
template <int ID, int N> __device__ __forceinline__ void named_sync() { asm volatile("bar.sync %0, %1;\n" :: "n"(ID), "n"(N) : "memory"); }
template <int ID, int N> __device__ __forceinline__ void named_arrive() { asm volatile("bar.arrive %0, %1;\n" :: "n"(ID), "n"(N) : "memory"); }

// The tile columns [lo, hi) (empty: lo = hi = 0) a row d columns past the tile's first key
// reaches through a single window term of half-width a (row_bits' window and causal cases, in 32
// bits at the end).
__device__ __forceinline__ void window_cols(const MaskDev& mk, long long a, bool live, long long d, int nkt, int& lo,
                                            int& hi) {
    const long long l = max(d - a, 0LL), h = min(mk.causal ? d + 1 : d + a + 1, (long long)nkt);
    lo = live && l < h ? (int)l : 0;
    hi = live && l < h ? (int)h : 0;
}

// Masks s (the tile's scores of this thread's rows r0, r0 + 8) outside the mask and counts the
// edges; full: the tile lies wholly inside the mask, counted in n_full (its edges: the caller's).
// WIN: the host found the mask to be one full or window term, causal or not (dense causal
// blocks among them): a column range per row, and none of the general terms' code, whose
// registers the consumers then keep for scores.
template <bool WIN = false>
__device__ __forceinline__ void wg_mask(float (&s)[MK / 8][4], const MaskDev& mk, bool full, bool live0, bool live1,
                                        long long pos0, long long pos1, long long c0, int nkt, int tq,
                                        unsigned long long& n_edges, int& n_full) {
    if (full) {
        ++n_full;
        return;
    }
    if (WIN || (mk.n == 1 && mk.kind[0] == T_WINDOW)) {  // one window (maybe causal): a column range per row
        const long long a = WIN && mk.kind[0] == T_FULL ? (1LL << 62) - 1 : min(mk.a[0], (1LL << 62) - 1);
        int lo0, hi0, lo1, hi1;
        window_cols(mk, a, live0, pos0 - c0, nkt, lo0, hi0);
        window_cols(mk, a, live1, pos1 - c0, nkt, lo1, hi1);
        if (tq == 0) n_edges += (hi0 - lo0) + (hi1 - lo1);
#pragma unroll
        for (int j = 0; j < MK / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int c = 8 * j + 2 * tq + e;  // this lane's column
                if ((unsigned)(c - lo0) >= (unsigned)(hi0 - lo0)) s[j][e] = -INFINITY;
                if ((unsigned)(c - lo1) >= (unsigned)(hi1 - lo1)) s[j][2 + e] = -INFINITY;
            }
        return;
    }
    const unsigned long long b0 = live0 ? row_bits(mk, pos0, c0, nkt) : 0ull;
    const unsigned long long b1 = live1 ? row_bits(mk, pos1, c0, nkt) : 0ull;
    if (tq == 0) n_edges += __popcll(b0) + __popcll(b1);
    mask_bits(s, b0 >> (2 * tq), b1 >> (2 * tq));
}


// Online softmax of one step's KT tiles in log2 units (the 4 lanes of a quad share rows g and
// g + 8): updates the rows' reference maxima m and sums l, turns the scores into exp2 weights in
// place, and returns in a0, a1 the factors by which O must be rescaled before the step's P V.
// A reference is raised only when the tile's row maximum passes it by more than 8 (FlashAttention-4's
// lazy rescaling): weights stay below 2^8 (exact in float16/bfloat16 and float32 sums), and
// once a row's maximum settles its factor is exactly 1, so most tiles skip O's rescale.
template <int KT>
__device__ __forceinline__ void wg_softmax(float (&st)[KT][MK / 8][4], float sl2, float& m0, float& m1, float& l0,
                                           float& l1, float& a0, float& a1) {
    float x0 = -INFINITY, x1 = -INFINITY;
#pragma unroll
    for (int h = 0; h < KT; ++h)
#pragma unroll
        for (int j = 0; j < MK / 8; ++j) {
            x0 = fmaxf(x0, fmaxf(st[h][j][0], st[h][j][1]));
            x1 = fmaxf(x1, fmaxf(st[h][j][2], st[h][j][3]));
        }
    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 1));
    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 2));
    x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 1));
    x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 2));
    const float y0 = x0 * sl2, y1 = x1 * sl2;  // sl2 > 0: checked by the host
    const float n0 = y0 > m0 + 8.f ? y0 : m0, n1 = y1 > m1 + 8.f ? y1 : m1;
    const float u0 = n0 == -INFINITY ? 0.f : n0, u1 = n1 == -INFINITY ? 0.f : n1;
    a0 = ex2(m0 - u0);
    a1 = ex2(m1 - u1);
    m0 = n0;
    m1 = n1;
    l0 *= a0;
    l1 *= a1;
#pragma unroll
    for (int h = 0; h < KT; ++h)
#pragma unroll
        for (int j = 0; j < MK / 8; ++j) {
            float (&s)[4] = st[h][j];
            s[0] = ex2(fmaf(s[0], sl2, -u0));
            s[1] = ex2(fmaf(s[1], sl2, -u0));
            s[2] = ex2(fmaf(s[2], sl2, -u1));
            s[3] = ex2(fmaf(s[3], sl2, -u1));
            l0 += s[0] + s[1];
            l1 += s[2] + s[3];
        }
}

// O = a O for this thread's rows (a0: row g, a1: row g + 8), skipped when no row of the warp
// changes (rare after a row's first tiles: wg_softmax's lazy rescaling)
template <int J> __device__ __forceinline__ void scale_rows(float (&oacc)[J][4], float a0, float a1) {
    if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
        for (int j = 0; j < J; ++j) {
            oacc[j][0] *= a0;
            oacc[j][1] *= a0;
            oacc[j][2] *= a1;
            oacc[j][3] *= a1;
        }
    }
}

// The weights as the A operand of P V (16-bit pairs in the mma fragment order)
template <typename T> __device__ __forceinline__ void wg_pack(const float (&s)[MK / 8][4], unsigned (&pa)[MK / 16][4]) {
#pragma unroll
    for (int j = 0; j < MK / 8; ++j) {
        pa[j >> 1][(j & 1) * 2] = pack2<T>(s[j][0], s[j][1]);
        pa[j >> 1][(j & 1) * 2 + 1] = pack2<T>(s[j][2], s[j][3]);
    }
}

// A persistent block's n-th work item and its (head, first row): items go out in rounds of
// gridDim.x, block order reversed on odd rounds (a snake), and an item's tile counts from the
// last one with heads varying fastest, so the longest items under a causal mask start first and
// every block's items add up to about the same work; the G heads of a kv head run side by side.
__device__ __forceinline__ int snake_item(int n) {
    return n * (int)gridDim.x + (n & 1 ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x);
}
__device__ __forceinline__ void item_place(int it, int heads, int nblk, int rows, int& head, int& t0) {
    const int r = it / heads;
    head = it - r * heads;
    t0 = (nblk - 1 - r) * rows;
}

// One work item's set-up, written by the loader, read by the consumers: the rows' positions
// per consumer, the block's key spans and tiles, and the range of tiles each consumer reaches.
template <int NWG> struct Item {
    long long qlo[NWG], qhi[NWG], lo[HPCATTN_MAX_SPANS], hi[HPCATTN_MAX_SPANS];
    int nsp, ntiles, first[NWG], last[NWG], run[NWG];  // run: consumer w's rows sit at qlo[w] + row - its first row
};

// Persistent and warp-specialised (FlashAttention-3's layout): each block walks work items (64 *
// NWG query rows of one head) in snake_item's order. Warpgroup 0 loads: it works out an item's key
// spans, loads its q rows, then streams its K/V tiles through a ring of ST buffers with
// cp.async, running up to two items ahead (set-up and q double-buffered), so that one item's
// set-up and first loads hide behind the last tiles of the one before. NWG consumer
// warpgroups of 64 rows each compute. mbarriers pass the buffers (full: landed; empty: every
// consumer warp is done), so consumers drift apart instead of running in lockstep, and each
// computes only the tiles from the first to the last that its own rows reach. Per consumer
// the MMAs overlap the softmax: S of tile i and O += P V of tile i - 1 are in flight together,
// then tile i's softmax runs while P V finishes. setmaxnreg moves registers to the consumers.
//
// SCHED picks how consumers share the tensor cores: 0 as above, each on its own; 1 adds
// FlashAttention-3's ping-pong between consumers: they take turns at issuing their MMAs, in the
// ring 0, 1, ..., NWG - 1, 0, ..., so that while one issues (and its MMAs run) the others run
// their softmax (NWG 2 or 3). The turns pass by named barriers PP_BAR + w (w = consumer: ids 2 to
// 1 + NWG; 0 is __syncthreads, 1 the loader's bar.sync): consumer w waits at PP_BAR + w (bar.sync,
// 256 threads) before it issues, and after issuing arrives (bar.arrive) at PP_BAR + w + 1 (mod NWG).
// A turn covers the issue of S of tile t and of P V of tile t - 1; an item's last P V is issued
// outside the turns (as in FlashAttention-3), and O's rescale is done before waiting for the turn.
// How the barriers stay matched: every consumer takes exactly one turn per tile of every item
// (items[].ntiles, the same for all, and all walk the same items), whether it computes that tile
// or not (before its first tile, after its last, or with no rows at all: an empty turn, waited
// for and passed on at once). So each of barriers 3 .. 1 + NWG (w >= 1) gets as many arrivals
// (from consumer w - 1) as waits (by w); barrier 2 gets one more arrival, from the last consumer
// at the start of its first item (consumer 0 goes first), and consumer 0 waits there once more at
// the end of its last item (there rather than after the item loop: a bar.sync after the loop made ptxas serialise
// every wgmma for want of registers).
// A barrier never holds two generations: consumer w - 1's arrival for turn k + 1 comes after its
// wait for turn k + 1, which (round the ring) follows consumer w's wait for turn k. No deadlock
// with the mbarriers (turns counted over all items, turn u = the block's tile u): between passing
// a turn and waiting for the next a consumer waits only on the loader (full_b of its next tile,
// qfull_b), never on another consumer, and it releases tile u (empty_b) in turn u or, at the
// latest, right after passing turn u + 1, blocked by nothing but its own MMAs. A consumer waiting for tile t has passed
// turn t - 1, so (ring) every consumer has passed turn t - 2 and so releases tile t - 3 >= t - ST,
// what the loader waits for before it fills tile t; a consumer waiting for item n's q has passed
// every turn of items n - 1 and before, so the others reach the end of item n - 2 (qempty_b)
// waiting only for tiles already filled.
//
// KT (SCHED 0) is a consumer's step in MK-key tiles: 2 takes two filled buffers at once (S of
// both in one MMA group, one softmax over 128 columns, one O rescale, P V of both), as
// FlashAttention-3's 128-key tiles; a step of one tile at the end of a consumer's range masks its
// second half. WIN (wg_mask) leaves the general mask terms' code out, which at D = 128 is what
// lets KT 2 fit the consumers' registers (with the loader's share cut to 40).
template <typename T, int D, typename TO, int NWG, int ST, int MINB, bool QREG, int SCHED = 0, int KT = 1,
          bool WIN = false>
__global__ void __launch_bounds__(128 * (NWG + 1), MINB)
attend_fwd_wgmma(const T* q, const long long* __restrict__ qpos, const T* __restrict__ k,
                 const T* __restrict__ v, TO* o, float* __restrict__ lse,
                 unsigned long long* __restrict__ edges, const long long* __restrict__ mask_words,
                 int nq, int nk, int G, long long k0, float scale, long long q0, STRIDE_ARGS, int heads) {
    constexpr int BM = 64 * NWG, TILE = MK * D;  // TILE in elements
    constexpr int PREG = KT == 2 ? 40 : 56, CREG = consumer_regs(NWG, MINB, PREG);
    static_assert(ST >= 3, "the loader refills tile i's buffer while tiles i + 1, i + 2 are in use");
    static_assert(SCHED == 0 || (SCHED == 1 && (NWG == 2 || NWG == 3)), "SCHED 1 takes 2 or 3 consumers");
    static_assert(KT == 1 || (KT == 2 && SCHED == 0 && ST >= 5), "KT 2 takes SCHED 0 and 5 buffers or more");
    constexpr int PP_BAR = 2;  // SCHED 1: consumer w's turn barrier is PP_BAR + w
    extern __shared__ __align__(128) unsigned char smem_wg[];
    // buffer b: K at KV + 2b*TILE, V at KV + (2b+1)*TILE, then two q buffers of BM rows
    // (128-byte swizzle atoms, 1024-byte aligned: the host adds 1024 bytes)
    T* KV = reinterpret_cast<T*>(smem_wg + ((1024 - ((unsigned)__cvta_generic_to_shared(smem_wg) & 1023)) & 1023));
    T* Qbuf = KV + 2 * ST * TILE;
    __shared__ MaskDev mk;
    __shared__ Item<NWG> items[2];
    __shared__ __align__(8) unsigned long long full_b[ST], empty_b[ST], qfull_b[2], qempty_b[2];
    __shared__ unsigned long long edges_s;

    const Strides qs{qbs, qhs, qrs}, ks{kbs, khs, krs}, os{obs, ohs, ors};
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0), wq = warp & 3;  // warp-uniform to the compiler
    const int nblk = (nq + BM - 1) / BM, nitems = nblk * heads;

    if (warp == 0) load_mask_warp(mask_words, mk, lane);
    if (tid == 0) {
        for (int b = 0; b < ST; ++b) {
            mb_init(&full_b[b], 128);       // every loader thread, once its copies landed
            mb_init(&empty_b[b], 4 * NWG);  // every consumer warp
        }
        for (int b = 0; b < 2; ++b) {
            mb_init(&qfull_b[b], 128);
            mb_init(&qempty_b[b], 4 * NWG);
        }
        edges_s = 0ull;
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    unsigned long long n_edges = 0;

    if (wg == 0) {  // the loader
        regs_dec<PREG>();
        constexpr int NONE = -3;
        int ntile = 0;      // tiles issued so far, over all items: tile n is in buffer n % ST
        int pend = NONE;    // the newest commit group, not yet signalled: tile n >= 0, or q of slot -1 - pend
        auto signal = [&]() {  // called once every group but the newest has landed
            if (pend == NONE) return;
            proxy_fence();
            if (pend >= 0) mb_arrive(&full_b[pend % ST]);
            else mb_arrive(&qfull_b[-1 - pend]);
        };
        for (int n = 0, it = snake_item(0); it < nitems; it = snake_item(++n)) {
            int head, t0;
            item_place(it, heads, nblk, BM, head, t0);
            const int slot = n & 1, kvh = head / G, t1 = min(nq, t0 + BM);
            Item<NWG>& item = items[slot];
            if (n >= 2) mb_wait(&qempty_b[slot], (n / 2 - 1) & 1);  // consumers are done with item n - 2
            load_tile_sw<T, D, BM>(q + qs.head(head, H) + (size_t)t0 * qs.rs, qs.rs, t1 - t0, Qbuf + slot * BM * D, tid);
            cp_commit();
            cp_wait<1>();
            signal();
            pend = -1 - slot;
            if (warp == 0) {  // the item's positions and key spans
                // all the item's positions in one round trip (row t0 + 64w + 32j + lane in p[w][j]), and
                // the next item's into L2 (one 128-byte line per lane)
                long long p[NWG][2];
#pragma unroll
                for (int w = 0; w < NWG; ++w)
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const int r = t0 + 64 * w + 32 * j + lane;
                        p[w][j] = r >= t1 ? 0 : qpos ? qpos[r] : q0 + r;
                    }
                const int nx = snake_item(n + 1);
                if (qpos && nx < nitems && lane < BM / 16) {
                    int nh, nt0;
                    item_place(nx, heads, nblk, BM, nh, nt0);
                    nt0 += 16 * lane;
                    if (nt0 < nq) asm volatile("prefetch.global.L2 [%0];\n" :: "l"(qpos + nt0));
                }
                long long blo = 0x7fffffffffffffffLL, bhi = -0x7fffffffffffffffLL - 1;
#pragma unroll
                for (int w = 0; w < NWG; ++w) {
                    const int r0 = t0 + 64 * w, r1 = min(t1, r0 + 64);
                    const long long p0 = __shfl_sync(0xffffffffu, p[w][0], 0);
                    long long lo = 0x7fffffffffffffffLL, hi = -0x7fffffffffffffffLL - 1;
                    bool run = true;  // row r at p0 + r - r0
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                        if (r0 + 32 * j + lane < r1) {
                            lo = min(lo, p[w][j]);
                            hi = max(hi, p[w][j]);
                            run = run && p[w][j] == p0 + 32 * j + lane;
                        }
                    run = __all_sync(0xffffffffu, run);
                    if (run) {
                        lo = p0;
                        hi = p0 + (r1 - r0 - 1);
                    } else {
                        warp_min_max(lo, hi);
                    }
                    if (lane == 0) {
                        item.qlo[w] = lo;
                        item.qhi[w] = hi;
                        item.run[w] = run;
                    }
                    if (r0 < r1) {
                        blo = min(blo, lo);
                        bhi = max(bhi, hi);
                    }
                }
                if (lane == 0) {
                    const int ns = mask_spans(mk, blo, bhi, k0, k0 + nk, item.lo, item.hi);
                    int nt = 0;
                    for (int sp = 0; sp < ns; ++sp) nt += (int)((item.hi[sp] - item.lo[sp] + MK - 1) / MK);
                    item.nsp = ns;
                    item.ntiles = nt;
                }
                __syncwarp();
                if (lane < NWG) {  // the first and last tiles consumer `lane`'s key spans reach
                    const int w = lane, ns = item.nsp, nt = item.ntiles;
                    int first = 1, last = 0;
                    if (t0 + 64 * w < t1) {
                        long long wl[HPCATTN_MAX_SPANS], wh[HPCATTN_MAX_SPANS];
                        const int wn = mask_spans(mk, item.qlo[w], item.qhi[w], k0, k0 + nk, wl, wh);
                        int ws = 0, sp = 0;
                        long long c = ns ? item.lo[0] : 0;
                        for (int t = 0; t < nt; ++t) {
                            const long long ce = min(c + MK, item.hi[sp]);
                            while (ws < wn && wh[ws] <= c) ++ws;
                            if (ws < wn && wl[ws] < ce) {
                                if (first > last) first = t;
                                last = t;
                            }
                            next_tile(sp, c, ns, item.lo, item.hi);
                        }
                    }
                    item.first[w] = first;
                    item.last[w] = last;
                }
            }
            asm volatile("bar.sync 1, 128;\n" ::: "memory");  // the loader's warps see the spans
            const T* kh = k + ks.head(kvh, H / G);
            const T* vh = v + ks.head(kvh, H / G);
            const int nsp = item.nsp, nt = item.ntiles;
            int sp = 0;
            long long c0 = nsp ? item.lo[0] : 0;
            for (int t = 0; t < nt; ++t, ++ntile) {
                const int b = ntile % ST;
                if (ntile >= ST) mb_wait(&empty_b[b], (ntile / ST - 1) & 1);  // consumers are done with tile n - ST
                const int rows = (int)min((long long)MK, item.hi[sp] - c0);
                load_tile_sw<T, D, MK>(kh + (size_t)(c0 - k0) * ks.rs, ks.rs, rows, KV + 2 * b * TILE, tid);
                load_tile_sw<T, D, MK>(vh + (size_t)(c0 - k0) * ks.rs, ks.rs, rows, KV + (2 * b + 1) * TILE, tid);
                cp_commit();
                cp_wait<1>();
                signal();
                pend = ntile;
                next_tile(sp, c0, nsp, item.lo, item.hi);
            }
        }
        cp_wait<0>();
        signal();
    } else {
        regs_inc<CREG>();
        const int cw = wg - 1;  // consumer index
        const float sl2 = scale * MLOG2E;
        // descriptors of buffer 0's K and V tiles and of q buffer 0's rows of this consumer
        const unsigned kdesc = wg_desc_lo(KV, 16), vdesc = wg_desc_lo(KV + TILE, MK * 128);
        const unsigned qdesc = wg_desc_lo(reinterpret_cast<const char*>(Qbuf) + cw * 64 * 128, 16);
        int kb = 0, kph = 0;  // the buffer of this consumer's next tile, and its fill's parity
        // SCHED 1: wait for this consumer's turn to issue MMAs; pass the turn to the next consumer
        auto turn_wait = [&]() {
            if constexpr (SCHED == 1) {
                if (cw == 0) named_sync<PP_BAR, 256>();
                else if (NWG == 2 || cw == 1) named_sync<PP_BAR + 1, 256>();
                else named_sync<PP_BAR + 2, 256>();
            }
        };
        auto turn_pass = [&]() {  // to consumer cw + 1 mod NWG
            if constexpr (SCHED == 1) {
                if (cw == NWG - 1) named_arrive<PP_BAR, 256>();
                else if (NWG == 2 || cw == 0) named_arrive<PP_BAR + 1, 256>();
                else named_arrive<PP_BAR + 2, 256>();
            }
        };
        for (int n = 0, it = snake_item(0); it < nitems; it = snake_item(++n)) {
            int head, t0;
            item_place(it, heads, nblk, BM, head, t0);
            const int slot = n & 1, t1 = min(nq, t0 + BM);
            if (SCHED == 1 && n == 0 && cw == NWG - 1) turn_pass();  // consumer 0 takes the first turn
            const Item<NWG>& item = items[slot];
            const int r0 = t0 + 64 * cw + 16 * wq + g, r1 = r0 + 8;
            const bool live0 = r0 < t1, live1 = r1 < t1;
            mb_wait(&qfull_b[slot], (n / 2) & 1);  // q rows landed, set-up written
            const long long qlo = item.qlo[cw], qhi = item.qhi[cw];
            // this thread's rows' positions: from qlo when the consumer's rows are a run (no memory read)
            const bool run = item.run[cw];
            const long long pos0 = !live0 ? 0 : run ? qlo + (r0 - t0 - 64 * cw) : qpos[r0];
            const long long pos1 = !live1 ? 0 : run ? qlo + (r1 - t0 - 64 * cw) : qpos[r1];
            const int nsp = item.nsp, ntiles = item.ntiles;
            const int first = __shfl_sync(0xffffffffu, item.first[cw], 0), last = __shfl_sync(0xffffffffu, item.last[cw], 0);
            const T* Qs = Qbuf + slot * BM * D;
            float oacc[D / 8][4];
#pragma unroll
            for (int j = 0; j < D / 8; ++j) oacc[j][0] = oacc[j][1] = oacc[j][2] = oacc[j][3] = 0.f;
            float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
            float s[KT][MK / 8][4], a0 = 1.f, a1 = 1.f;  // a step's scores: its KT tiles'
            unsigned pa[KT][MK / 16][4];
            unsigned qa[QREG ? D / 16 : 1][4];
            if (QREG) {
                const int r = 64 * cw + 16 * wq + (lane & 15);  // this lane's ldmatrix row
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const int c = 2 * kk + (lane >> 4);
                    ldsm4(qa[QREG ? kk : 0], reinterpret_cast<const char*>(Qs) + (c >> 3) * BM * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
                }
            }
            unsigned long long item_edges = 0;
            int n_full = 0;  // full tiles: MK edges a live row
            // The tiles' plan, lane-parallel: lane l holds tile base + l's first key and its class
            // (key count | 128 when wholly inside the mask), read by a shuffle at each tile.
            long long pc0 = 0;
            int pinfo = 0;
            auto plan = [&](int base) {
                int t = base + lane, sp = 0;
                for (; sp < nsp; ++sp) {
                    const int n = (int)((item.hi[sp] - item.lo[sp] + MK - 1) / MK);
                    if (t < n) break;
                    t -= n;
                }
                pc0 = 0;
                pinfo = 0;
                if (sp < nsp && base + lane <= last) {
                    pc0 = item.lo[sp] + (long long)t * MK;
                    const int nkt = (int)min((long long)MK, item.hi[sp] - pc0);
                    pinfo = nkt | (nkt == MK && mask_tile_full(mk, qlo, qhi, pc0, pc0 + MK) ? 128 : 0);
                }
            };
            // S = Q K^T of the step's tiles in buffers b (and b2: KT 2), committed, not waited for
            auto issue_s = [&](int b, int b2) {
                const unsigned qb = slot * BM * D * (unsigned)sizeof(T);
                fence_regs(s);
                wg_fence();
#pragma unroll
                for (int h = 0; h < KT; ++h) {
                    const unsigned kb = (h ? b2 : b) * 2 * TILE * (unsigned)sizeof(T);
#pragma unroll
                    for (int kk = 0; kk < D / 16; ++kk) {  // k16 = 32 bytes of a 128-byte atom row; atoms of 64 columns
                        const unsigned long long kd = wg_desc(kdesc, kb + (kk >> 2) * MK * 128 + (kk & 3) * 32);
                        if (QREG)
                            Wgmma<T, MK, 0>::run(s[h], qa[QREG ? kk : 0], kd, kk > 0);
                        else
                            WgmmaSS<T>::run(s[h], wg_desc(qdesc, qb + (kk >> 2) * BM * 128 + (kk & 3) * 32), kd, kk > 0);
                    }
                }
                wg_commit();
            };
            // O = a O + P V of the tile in buffer b, committed, not waited for (SCHED 1: O = a O by
            // rescale_o, before the consumer waits for its turn)
            auto issue_pv = [&](int b, int b2) {
                fence_regs(oacc);
                if (SCHED == 0) scale_rows(oacc, a0, a1);
                fence_regs(oacc);
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < KT * MK / 16; ++kk) {  // a k16 step is 16 keys; V is N-major, atoms of 64 d's
                    const unsigned vb = (kk < MK / 16 ? b : b2) * 2 * TILE * (unsigned)sizeof(T);
                    Wgmma<T, D, 1>::run(oacc, pa[kk / (MK / 16)][kk % (MK / 16)], wg_desc(vdesc, vb + kk % (MK / 16) * 16 * 128), 1);
                }
                wg_commit();
            };
            // tile t's scores (complete in s): mask, softmax, weights into s; then, after a plan's
            // last tile, the next 32 tiles' plan. Planned here, that branch also ends ptxas' basic
            // block before the wait for P V that follows the softmax in the tile loop: ptxas moves
            // a wgmma wait up to the top of its block, which put the whole softmax after the
            // wait for P V instead of beside it (tests/gpu/test_gpu_sass.py checks the order).
            // KT 2: tiles t and t + 1; a tile past `last` (a step of one tile) has no keys, no edges
            auto softmax = [&](int t) {
                const int l = (t - first) & 31;  // KT 2: even (steps start first + 2i)
#pragma unroll
                for (int h = 0; h < KT; ++h) {
                    const long long c0 = __shfl_sync(0xffffffffu, pc0, l + h);
                    const int info = __shfl_sync(0xffffffffu, pinfo, l + h);
                    wg_mask<WIN>(s[h], mk, info >> 7, live0, live1, pos0, pos1, c0, info & 127, tq, item_edges, n_full);
                }
                wg_softmax(s, sl2, m0, m1, l0, l1, a0, a1);
                if (l == 32 - KT && t + KT - 1 < last) plan(t + KT);
            };
            auto pack = [&]() {
#pragma unroll
                for (int h = 0; h < KT; ++h) wg_pack<T>(s[h], pa[h]);
            };
            // SCHED 1: O = a O, as issue_pv does in SCHED 0
            auto rescale_o = [&]() {
                fence_regs(oacc);
                scale_rows(oacc, a0, a1);
            };
            // the consumer's next tile is in buffer kb, filled for a time of parity kph
            auto wait_full = [&]() { mb_wait(&full_b[kb], kph); };
            auto advance = [&]() {
                if (++kb == ST) {
                    kb = 0;
                    kph ^= 1;
                }
            };
            auto release = [&](int b) {  // this warp is done with buffer b
                __syncwarp();
                if (lane == 0) mb_arrive(&empty_b[b]);
            };
            int t = 0;
            for (; t < first && t < ntiles; ++t, advance()) {  // tiles before this consumer's rows reach
                wait_full();
                turn_wait();  // SCHED 1: an empty turn
                turn_pass();
                release(kb);
            }
            // a step's tiles' buffers, filled, into b and b2 (b2 = b: one tile); t and kb at its last
            auto take = [&](int& b, int& b2) {
                wait_full();
                b = b2 = kb;
                if (KT == 2 && t < last) {
                    advance();
                    ++t;
                    wait_full();
                    b2 = kb;
                }
            };
            auto release_step = [&](int b, int b2) {
                release(b);
                if (KT == 2 && b2 != b) release(b2);
            };
            if (first <= last) {
                plan(first);
                int ts = t, pb, pb2;  // the step's first tile; the buffers of the step whose P V comes next
                take(pb, pb2);
                turn_wait();
                issue_s(pb, pb2);
                turn_pass();
                wgmma_wait<0>();
                fence_regs(s);
                softmax(ts);
                pack();
                advance();
                ++t;
                while (t <= last) {  // S of step t and P V of the step before in flight together
                    int b, b2;
                    ts = t;
                    take(b, b2);
                    if constexpr (SCHED == 1) rescale_o();
                    turn_wait();
                    issue_s(b, b2);
                    issue_pv(pb, pb2);
                    turn_pass();
                    wgmma_wait<1>();  // S
                    fence_regs(s);
                    softmax(ts);      // overlaps P V
                    wgmma_wait<0>();  // P V
                    fence_regs(oacc);
                    release_step(pb, pb2);
                    pack();
                    pb = b;
                    pb2 = b2;
                    advance();
                    ++t;
                }
                if constexpr (SCHED == 1) rescale_o();
                issue_pv(pb, pb2);  // SCHED 1: outside the turns (as FlashAttention-3's last P V)
                wgmma_wait<0>();
                fence_regs(oacc);
                release_step(pb, pb2);
            }
            for (; t < ntiles; ++t, advance()) {  // tiles after
                wait_full();
                turn_wait();  // SCHED 1: an empty turn
                turn_pass();
                release(kb);
            }
            __syncwarp();
            if (lane == 0) mb_arrive(&qempty_b[slot]);  // done with this item's q rows and set-up
            if (head == 0) n_edges += item_edges + (tq == 0 ? (unsigned long long)(live0 + live1) * MK * n_full : 0ull);

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
            // the block's last item: take the last consumer's final pass (see above the kernel)
            if (SCHED == 1 && cw == 0 && snake_item(n + 1) >= nitems) turn_wait();
        }
    }

#pragma unroll
    for (int s = 16; s > 0; s >>= 1) n_edges += __shfl_xor_sync(0xffffffffu, n_edges, s);
    if (lane == 0 && n_edges) atomicAdd(&edges_s, n_edges);
    __syncthreads();
    if (tid == 0 && edges_s) atomicAdd(edges, edges_s);
}
