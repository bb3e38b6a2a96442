// The Hopper (sm_90a) backward's key-major pass, shared by attend_bwd_wgmma.cu's
// attend_bwd_kv_wg (dk and dv) and attend_bwd_fused_wg (dk, dv and dq in one pass): key_pass and
// the fused form's helpers (its walk, dq adds and ordered turns).
#pragma once
#include "bwd_wg.cuh"

// The work item before (query head gq of the group, query tile t of range r) in next_item's
// order, for each of the group's heads in turn: the walk of the ranges [tlo[r], thi[r]) downwards.
__device__ __forceinline__ void prev_item(int& gq, int& r, int& t, int nr, const int* tlo, const int* thi) {
    if (t-- == tlo[r]) {
        if (r-- == 0) { r = nr - 1; ++gq; }
        t = thi[r] - 1;
    }
}

// bar.sync on named barrier id by n threads (id 0 is __syncthreads'); bar.arrive: arrives, no wait
__device__ __forceinline__ void named_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}

// p[0] += a, p[1] += b in global memory: one vector reduction (sm_90), no value returned
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" :: "l"(p), "f"(a), "f"(b) : "memory");
}

// s x rounded to the nearest integer (ties to even), |s x| < 2^31
__device__ __forceinline__ int fixed_round(float s, float x) { return __float2int_rn(s * x); }

// BULK's dq path: `bytes` (a multiple of 16) of float32 (or, FIX, 32-bit integers, added modulo
// 2^32) at shared src added into global dst (both 16-byte aligned) by the bulk-copy unit, as one
// operation of this thread's next bulk async-group; each element's add is a .relaxed.gpu
// reduction in the async proxy, the float32 ones rounded to nearest and flushing subnormals to
// zero like red.global.add.f32 (PTX ISA, cp.reduce.async.bulk)
template <bool FIX> __device__ __forceinline__ void bulk_red_add(float* dst, const void* src, int bytes) {
    if (FIX)
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.u32 [%0], [%1], %2;\n"
                     :: "l"(dst), "r"((unsigned)__cvta_generic_to_shared(src)), "r"(bytes) : "memory");
    else
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                     :: "l"(dst), "r"((unsigned)__cvta_generic_to_shared(src)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// until this thread's bulk groups have read their shared sources (READ) or completed, i.e. added
// into global memory with the result visible to this thread (no group pending: no wait)
template <bool READ> __device__ __forceinline__ void bulk_wait() {
    if (READ) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
    else asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

// *p, loaded with acquire semantics at gpu scope
__device__ __forceinline__ int load_acquire(const int* p) {
    int x;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(x) : "l"(p) : "memory");
    return x;
}

// Hands an ordered dq turn to the next key block (v: this block's index + 1) once this thread
// and those that synchronised with it before (bar.sync, __syncwarp) have added: CUTLASS's
// GenericBarrier arrive, a cumulative fence.acq_rel.gpu and a relaxed store; no fence.sc
__device__ __forceinline__ void release_turn(int* turn, int v) {
    asm volatile("fence.acq_rel.gpu;\nst.relaxed.gpu.global.b32 [%0], %1;\n" :: "l"(turn), "r"(v) : "memory");
}

// The ordered dq turn of (query head hq, query tile ct, 64-column slice c): one per slice of each
// of a head's ntiles tiles (NSL slices), heads after one another
template <int NSL> __device__ __forceinline__ int* turn_at(int* turns, int hq, int ntiles, int ct, int c) {
    return turns + ((size_t)hq * ntiles + ct) * NSL + c;
}

// Waits until *turn equals want, then loads it once more with acquire semantics (gpu scope);
// the polls are relaxed loads, which leave the SM's L1 alone (each ld.acquire invalidates it).
// Like mb_wait_asm, a wait that never ends (a bug) ends the kernel with an error after 10 minutes.
__device__ __forceinline__ void turn_wait(const int* turn, int want) {
    asm volatile("{\n.reg .pred p;\n.reg .u32 n;\n.reg .b32 x;\n.reg .u64 t0, t;\nmov.u64 t0, 0;\n"
                 "R:\nmov.u32 n, 0;\nW:\nld.relaxed.gpu.global.b32 x, [%0];\nsetp.eq.s32 p, x, %1;\n@p bra D;\n"
                 "add.u32 n, n, 1;\nsetp.lt.u32 p, n, 65536;\n@p bra W;\n"  // 65,536 polls, then the clock (ns)
                 "mov.u64 t, %%globaltimer;\nsetp.eq.u64 p, t0, 0;\n@p mov.u64 t0, t;\nsub.u64 t, t, t0;\n"
                 "setp.gt.u64 p, t, 600000000000;\n@p trap;\nbra R;\nD:\n}\n"
                 :: "l"(turn), "r"(want) : "memory");
    load_acquire(turn);  // the value seen (the turn changes only when this block releases it)
}

// Whether key block c (keys k0 + [c BN, min(nk, c BN + BN))) walks a query tile in
// key_block_tiles (positions sorted or none): a row of the tile (rows at positions Pb[r], or
// p0 + r without positions, r < rows) lies in a query span of the block's keys.
template <int BN>
__device__ __forceinline__ bool block_walks(const MaskDev& mk, const long long* Pb, long long p0, int rows, int c,
                                            long long k0, int nk) {
    long long lo[HPCATTN_MAX_SPANS], hi[HPCATTN_MAX_SPANS];
    const int n = mask_spans(mk, k0 + (long long)c * BN, k0 + min(nk, c * BN + BN) - 1, 0, 1LL << 62, lo, hi, true);
    for (int s = 0; s < n; ++s) {
        if (!Pb) {
            if (lo[s] < p0 + rows && hi[s] > p0) return true;
            continue;
        }
        int a = 0, b = rows;  // the tile's first row at a position >= lo[s]
        while (a < b) {
            const int m = (a + b) >> 1;
            if (Pb[m] < lo[s]) a = m + 1;
            else b = m;
        }
        if (a < rows && Pb[a] < hi[s]) return true;
    }
    return false;
}

// The nearest key block below jb (of the same kv head) that walks the query tile (tr, Pb, rows:
// as tile_rows and block_walks see it), -1 if none; every block when the positions are not
// sorted (key_block_tiles' fallback). Only blocks that meet the key spans of the tile's position
// range are tried, 32 at a time (a lane each), downwards: those spans hold every key a query
// span of a block's keys can reach back to (the terms are symmetric, causal clips both alike).
template <int BN>
__device__ int prev_block(const MaskDev& mk, const TileRows& tr, const long long* Pb, bool unsorted, int rows,
                          int jb, long long k0, int nk, int lane) {
    if (unsorted) return jb - 1;
    long long lo[HPCATTN_MAX_SPANS], hi[HPCATTN_MAX_SPANS];
    const int n = mask_spans(mk, tr.plo, tr.phi, k0, k0 + nk, lo, hi);
    for (int s = n - 1; s >= 0; --s) {
        const int bl = (int)((lo[s] - k0) / BN);
        for (int top = min(jb - 1, (int)((hi[s] - 1 - k0) / BN)); top >= bl; top -= 32) {
            const int c = top - lane;
            const unsigned m = __ballot_sync(0xffffffffu, c >= bl && block_walks<BN>(mk, Pb, tr.plo, rows, c, k0, nk));
            if (m) return top - (__ffs(m) - 1);
        }
    }
    return -1;
}

// The key-major pass, the body of attend_bwd_kv_wg (DQ false) and attend_bwd_fused_wg (DQ): a
// block owns 64 NWG keys of one kv head, a consumer warpgroup per 64 keys, and walks the 64-row
// query tiles that reach them for all G query heads of the group. The block's K and V rows come
// once and each work item's (Q, dO) tiles into the ring by TMA (tm: the maps of q, k, v and dout;
// 1.012x at causal 64K D = 128 over 128 loader threads of cp.async, H100, 2026-12-07), started by
// one thread; the loader warp's lanes copy the rows' statistics. Per
// tile, S^T = K Q^T and dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q; dk and dv stay in
// float32 registers until the end. Without DQ: blocks (key block, kv head) on a 2-D grid, query
// tiles walked upwards (next_item), consumers each at their own pace. Shape: NWG consumer
// warpgroups, ST stages, MINB blocks per SM asked of the register allocator. Shared memory
// (1024-byte aligned: the host adds 1024 bytes): ST stages of (Q, dO) tiles, the block's K and
// V rows, ST stages of (lse, delta, positions).
// DQ also adds each work item's dq share, scale dS K, into dq (float32, head-major rows (B, H,
// nq, D) whatever q's layout) and counts the edges of query head 0 into `edges`, as
// attend_bwd_q_wg does. A block per (key block kb, kv head) on a 1-D grid, key blocks fastest,
// so that the blocks running at once reread one kv head's Q, dO and dq tiles from L2 (kv heads
// fastest was 0.95x at causal 64K, D = 128, H100, 2026-12-06), but kv heads fastest for ORDERED,
// whose waits chain a head's consecutive blocks (key blocks fastest: 0.96x); each block
// walks its query tiles downwards (prev_item). Per tile, consumer cw's dS^T rows go to one of two
// shared buffers (BN key rows of 64 queries in 128-byte swizzle atoms, zeros for keys past the
// block's end), the consumer arrives on its named barrier of the item (ds_bar) and issues dV +=
// P^T dO and dK += dS^T Q; then it waits on the other consumers' barriers of the item and issues
// dQ (a consumer that finishes its softmax first keeps the tensor cores busy meanwhile; one
// barrier of all consumers per item was 1-8% slower, H200, 2026-12-06), then the dq adds. DK_LATE
// (every consumer has a dq slice of every item: D = 128) issues dK after dQ instead, so that it
// runs while the consumer waits for dQ alone and stages its share. A
// consumer arrives for item n only once it finished reading item n - 1 (its dQ waited for), so
// the wait orders every write of item n before any read of it, and every read of item n - 1
// before the writes of item n + 1 into the same buffer.
// ORDERED: for each (query head, tile, 64-column slice) the key blocks that walk the tile add in
// ascending key-block order, on turns[(head ntiles + tile) D / 64 + slice] (int32, zeroed by the
// host; it holds the last adding block's index + 1): a block waits until it holds the index of
// its nearest lower block that walks the tile (prev_block: key_block_tiles' own test, so that the
// waits and the walks agree), adds, then stores its own (prev_block, and a first look at the
// turn, run while the item's score MMAs do). The downward walk keeps the waits short: the tiles a
// block shares with the block below are its lowest, walked last, and that block's highest, walked
// first (ascending, each block would wait for nearly all of the one below, a chain over the whole
// sequence). No deadlock: a block waits only for lower key blocks of its kv head, i.e. lower
// blockIdx.x, and every wait of the lowest unfinished block is on finished blocks; this assumes
// that blocks start in ascending blockIdx.x, so that every lower block is running or done, never
// waiting for a free SM that only a waiting block could give back.
// BULK (FlashAttention-3's dQ accumulation): dq is not rows but dq tiles, float32 (B H, ntiles,
// D / 64, 4096): per (query head, tile, 64-column slice) 4 KB per consumer warp wq, element (row
// 16 wq + g + 8h, column 8j + 2tq + x) at 1024 wq + 128 j + 4 (4 g + tq) + 2 h + x, i.e. the
// accumulators' own order, so that each warp stages its share with conflict-free stores and adds
// it by bulk reductions (cp.reduce.async.bulk, through the bulk-copy unit: two of 2 KB, or one of
// 4 KB where the share is staged whole, LAG; 1.014x / 1.02x at causal 64K / 16K, D = 128, H200,
// 2026-12-07) instead of 16 red.global.add.v2 a thread that each touch 8 lines; the host turns
// the tiles into rows.
// Without ORDERED the tiles hold 32-bit fixed-point sums (FIX): row i's share is scaled by
// tscale[64 (head ntiles + tile) + i] = 2^e and rounded to an integer, where the host chose e so
// that 2^e times a bound on any partial sum of the row's dq stays within 2^30 (|dS_ik| <= P_ik
// (|dO_i| max_k |V_k| + |delta_i|) and sum_k P_ik <= 1; backward.RowScales); integer adds are exact,
// so the sums are the same bits in any order, with no turns. 2^30: the factor 2 below int32's
// range is margin for the rounding of P and dS. The bound is loose by about sqrt(N) on random
// data (it assumes no cancellation over the keys), so the units must be that fine: with 2^21
// (an FFMA rounding, 9997d5b to 078e39c) the rows' dq lost accuracy as N grew, 20x float16's
// rounding at causal N = 8192.
// Nothing waits for the adds until the next item's dS^T is stored (the bulk reads, as half of the
// staging sits in this consumer's rows of the other dS^T buffer: free from the wait of item n
// until item n + 1's dS^T; a consumer without keys writes its zeros again). ORDERED with BULK:
// the loader finds prev_block (off the consumers' path), the consumer takes a first look at the
// turn while dQ runs, waits for it before the adds if need be, and hands it on at the next item's
// dS^T store (or the block's end), once the adds completed: they were issued the next item's
// S^T, dP^T and softmax earlier, so the wait is short where the adds keep pace.
// Named barriers: 0 (__syncthreads), 2 + cw (the 128 threads of consumer cw, ORDERED's release),
// ds_bar(n, cw) = NWG + 2 + NWG (n % 2) + cw (the 128 NWG consumer threads: cw arrives, the
// others wait; two sets, so that an arrival for item n + 2 cannot meet a wait for item n).
// LAG (FIX where every consumer has a dq slice of every item, D = 128): a consumer computes,
// stages and adds item n's dq in item n + 1, after item n + 1's dS^T stores, so that it waits
// only for the others' dS^T of item n (stored about an item earlier), not for their softmax of
// the item in hand; the wait moves before its own dS^T stores of item n + 1, where it also says
// that the others' dQ of item n - 2 read the buffer being overwritten: three dS^T buffers, and
// the staging, 4 KB a warp, entirely at Gs (1.025x / 1.03x at causal 64K / 16K, D = 128, H100,
// 2026-12-07, on two ring stages: the room the third buffer takes).
// Shared memory, DQ: the NBUF dS^T buffers (NBUF BN 64 elements) after the K and V rows; BULK: 8
// KB (LAG: 16 KB) of staging per consumer after the positions.
template <typename T, int D, typename TO, int NWG, int ST, int MINB, bool DQ, bool ORDERED, bool BULK>
__device__ __forceinline__ void key_pass(const TmaMaps* tm, const long long* __restrict__ qpos,
                                         const float* __restrict__ lse, const float* __restrict__ delta,
                                         TO* __restrict__ dk, TO* __restrict__ dv, float* __restrict__ dq,
                                         unsigned long long* __restrict__ edges, int* __restrict__ turns,
                                         const float* __restrict__ tscale,
                                         const long long* __restrict__ mask_words, const int* __restrict__ unsorted,
                                         int nq, int nk, int G, long long k0, float scale, long long q0, BWD_STRIDES) {
    constexpr int BN = 64 * NWG, TILE = BM * D, NSL = D / 64;  // TILE in elements; NSL slices of dq
    constexpr bool FIX = BULK && !ORDERED;  // dq tiles of 32-bit fixed-point sums (see BULK)
    constexpr bool LAG = FIX && NSL == NWG;  // see LAG above
    constexpr int NBUF = LAG ? 3 : 2;
    constexpr int PREG = 24, CREG = consumer_regs(NWG, MINB, PREG);
    static_assert(ST >= 2, "the loader fills one stage while the consumers compute another");
    static_assert(NSL <= NWG, "a consumer computes at most one 64-column slice of a tile's dq");
    static_assert(DQ || !(ORDERED || BULK), "ORDERED and BULK are forms of the dq adds");
    extern __shared__ __align__(128) unsigned char smem_wg[];
    T* QO = reinterpret_cast<T*>(smem_wg + ((1024 - ((unsigned)__cvta_generic_to_shared(smem_wg) & 1023)) & 1023));
    T* Ks = QO + 2 * ST * TILE;  // stage s: Q at QO + 2s TILE, dO at QO + (2s + 1) TILE
    T* Vs = Ks + BN * D;
    char* Ss = reinterpret_cast<char*>(Vs + BN * D);  // DQ: dS^T buffer b at Ss + b BN 128
    float* Ls = reinterpret_cast<float*>(Ss + (DQ ? NBUF * BN * 128 : 0));  // stage s at Ls + s BM; delta likewise
    float* Dls = Ls + ST * BM;
    long long* Ps = reinterpret_cast<long long*>(Dls + ST * BM);
    char* Gs = reinterpret_cast<char*>(Ps + ST * BM);  // BULK: warp wq of consumer cw stages at Gs + (4 cw + wq) 2048
    __shared__ MaskDev mk;
    __shared__ int nr_s, tlo_s[HPCATTN_MAX_SPANS], thi_s[HPCATTN_MAX_SPANS];
    __shared__ __align__(8) Ring<ST> ring;
    __shared__ __align__(8) unsigned long long kvb;  // the block's K and V rows landed
    __shared__ int* pend[ORDERED && BULK ? NWG : 1];  // ORDERED && BULK: see hand_on
    __shared__ int wants[ORDERED && BULK ? ST : 1];  // ORDERED && BULK: stage s's item waits for turn wants[s]

    const Strides ks{kbs, khs, krs};
    // DQ: a 1-D grid, ORDERED's kv heads fastest, the other forms' key blocks fastest (see above);
    // else blocks (key block, kv head)
    const int nkb = (nk + BN - 1) / BN, heads = DQ ? gridDim.x / nkb : 0;
    const int hk = !DQ ? blockIdx.y : ORDERED ? blockIdx.x % heads : blockIdx.x / nkb;
    const int kb = !DQ ? blockIdx.x : ORDERED ? blockIdx.x / heads : blockIdx.x % nkb;
    const int kc0 = kb * BN, kc1 = min(nk, kc0 + BN);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0), wq = warp & 3;  // wg warp-uniform
    const size_t krow0 = ks.head(hk, H / G) + (size_t)kc0 * krs;  // the block's first key row
    const int Hk = H / G;  // kv heads per batch entry
    if (tid == 0) {  // K and V by TMA, awaited by every consumer (no early return: the copies land in this block's memory)
        mb_init(&kvb, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        mb_expect_tx(&kvb, 2 * BN * D * sizeof(T));
        tma_tile<T, D, BN>(Ks, &tm->k, kc0, hk % Hk, hk / Hk, &kvb);
        tma_tile<T, D, BN>(Vs, &tm->v, kc0, hk % Hk, hk / Hk, &kvb);
        mb_arrive(&kvb);
    }
    if (warp == 0) {
        key_block_tiles(mask_words, mk, qpos, unsorted, q0, nq, k0 + kc0, k0 + kc1 - 1, lane, tlo_s, thi_s, nr_s);
    } else if (tid == 128) {
        ring.init(NWG, 33);  // the loader warp's 32 statistics arrivals (cp_arrive) and its lane 0's
    }
    __syncthreads();
    const int nr = nr_s;
    // work items (query head gq of the group, query tile t) in prev_item's order (DQ) or
    // next_item's; none when no query reaches these keys (dk, dv are then written as zeros)
    const int g_first = nr ? 0 : G, r_first = DQ && nr ? nr - 1 : 0;
    const int t_first = !nr ? 0 : DQ ? thi_s[nr - 1] - 1 : tlo_s[0];
    auto step = [&](int& gq, int& r, int& t) {
        if (DQ) prev_item(gq, r, t, nr, tlo_s, thi_s);
        else next_item(gq, r, t, nr, tlo_s, thi_s);
    };

    const bool rows_unsorted = qpos && *unsorted;
    if (wg == 0) {  // the loader: warp 0; its lane 0 starts the tiles' TMA copies, every lane copies statistics
        regs_dec<PREG>();
        if (warp != 0) return;
        int n = 0;
        for (int fg = g_first, fr = r_first, ft = t_first; fg < G; step(fg, fr, ft), ++n) {
            const int s = n % ST;
            if (n >= ST) mb_wait_asm(&ring.empty[s], (n / ST - 1) & 1);
            const int hq = hk * G + fg, r0 = ft * BM, rows = min(BM, nq - r0);
            if (lane == 0) {
                mb_expect_tx(&ring.full[s], 2 * TILE * sizeof(T));
                tma_tile<T, D, BM>(QO + 2 * s * TILE, &tm->q, r0, hq % H, hq / H, &ring.full[s]);
                tma_tile<T, D, BM>(QO + (2 * s + 1) * TILE, &tm->o, r0, hq % H, hq / H, &ring.full[s]);
            }
            load_stats<32>(lse, delta, qpos, hq, nq, r0, rows, Ls + s * BM, Dls + s * BM, Ps + s * BM, lane);
            cp_arrive(&ring.full[s]);
            if (ORDERED && BULK) {  // the turn this item's adds wait for, off the consumers' path
                const long long* Pg = qpos ? qpos + r0 : nullptr;  // the tile's positions, in global memory
                const int prev = prev_block<BN>(mk, tile_rows(qpos != nullptr, Pg, q0 + r0, rows, lane), Pg,
                                                rows_unsorted, rows, kb, k0, nk, lane);
                if (lane == 0) wants[s] = prev + 1;  // seen by the consumers through the stage's full barrier
            }
            if (lane == 0) mb_arrive(&ring.full[s]);
        }
        cp_commit();
        cp_wait<0>();  // this thread's statistics copies, before it exits
        return;
    }

    regs_inc<CREG>();
    mb_wait_asm(&kvb, 0);
    const int cw = wg - 1;  // consumer index: keys [kc0 + 64 cw, kc0 + 64 cw + 64)
    // descriptors: this consumer's K and V rows (A, K-major), stage 0's Q and dO tiles as K-major
    // B operands of S^T and dP^T, and as N-major ones (atoms of 64 d's) of dK and dV; for dQ,
    // buffer 0's dS^T as the M-major A (64 queries per atom row) and the block's K rows as the
    // N-major B (slice c: the atoms of d's [64c, 64c + 64), c BN 128 bytes on)
    const unsigned kdesc = wg_desc_lo(reinterpret_cast<const char*>(Ks) + cw * 64 * 128, 16);
    const unsigned vdesc = wg_desc_lo(reinterpret_cast<const char*>(Vs) + cw * 64 * 128, 16);
    const unsigned qk = wg_desc_lo(QO, 16), ok = wg_desc_lo(QO + TILE, 16);
    const unsigned qn = wg_desc_lo(QO, BM * 128), on = wg_desc_lo(QO + TILE, BM * 128);
    const unsigned sdesc = wg_desc_lo(Ss, BN * 128), kn = wg_desc_lo(Ks, BN * 128);
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[j][e] = dva[j][e] = 0.f;
    const int kw0 = kc0 + 64 * cw + 16 * wq;  // this warp's first key row
    const bool live[1][2] = {{kw0 + g < kc1, kw0 + g + 8 < kc1}};
    const long long jpos[1][2] = {{k0 + kw0 + g, k0 + kw0 + g + 8}};
    const bool wg_live = kc0 + 64 * cw < kc1;  // uniform over the warpgroup, as wgmma needs
    if (DQ && !wg_live) {  // no key: zero dS^T rows in every buffer, for dQ's products over all BN keys
#pragma unroll
        for (int i = 0; i < 4 * NBUF; ++i)  // NBUF x 8 KiB, 16 bytes a thread at a time
            *reinterpret_cast<uint4*>(Ss + (i >> 2) * BN * 128 + cw * 64 * 128 + (i & 3) * 2048 + (tid & 127) * 16) =
                make_uint4(0u, 0u, 0u, 0u);
        proxy_fence();  // before wgmma reads them, after the first item's barrier
    }
    const int ntiles = (nq + BM - 1) / BM;
    const float sl2 = scale * MLOG2E;
    unsigned long long n_edges = 0;
    RingUse<ST> use{ring};

    int n = 0;  // the item's index
    auto slice_of = [&](int m) { return (cw + NWG - m % NWG) % NWG; };  // DQ: consumer's slice of item m's dq
    // DQ: the byte offset of item m's dS^T buffer (m >= 0; item n - 1's as n + NBUF - 1, also at n = 0)
    auto ds_buf = [](unsigned m) { return m % NBUF * BN * 128; };
    // ORDERED && BULK: item m's turn handed on, if this consumer added into it, once every thread's
    // adds of it completed (cp.async.bulk.wait_group 0 before the barrier); the turn's pointer is
    // kept in shared memory (pend[cw]) to spare registers
    auto hand_on = [&](int m) {
        if (m >= 0 && slice_of(m) < NSL) {
            named_sync(2 + cw, 128);
            if ((tid & 127) == 0) release_turn(pend[cw], kb + 1);
        }
    };
    // DQ: the named barrier on which consumer o arrives once its dS^T rows of item m are stored
    // and the others wait before their dQ reads them (ids after ORDERED's, a set per item parity)
    auto ds_bar = [](int m, int o) { return NWG + 2 + NWG * (m & 1) + o; };
    static_assert(3 * NWG + 1 < 16, "named barriers 0 to 15");
    auto wait_others = [&](int m) {
#pragma unroll
        for (int o = 0; o < NWG; ++o)
            if (o != cw) named_sync(ds_bar(m, o), 128 * NWG);
    };
    // HOLD: an item's dV and dK MMAs run on beside the next item's S^T and dP^T, their stage held
    // (use.hold) until they are done; only without DQ and at D = 64 (at D = 128 the registers they
    // keep made ptxas serialise every wgmma)
    constexpr bool HOLD = !DQ && D <= 64;
    auto done_held = [&]() {
        fence_regs(dva);
        fence_regs(dka);
        use.release_held();
    };
    // DK_LATE: dK += dS^T Q issued after dQ, so that it runs while the consumer stages its dq
    // share (1.05x / 1.15x at causal 16K / 64K, D = 128, H100, 2026-12-06); only where every
    // consumer has a dq slice of every item (at D = 64 the consumer without one would wait for
    // the others' dS^T before its dK: 0.97x)
    constexpr bool DK_LATE = DQ && NSL == NWG;
    auto issue_dk = [&](const unsigned (&da)[MK / 16][4], unsigned sb) {  // dK += dS^T Q, not committed
        fence_regs(dka);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)  // a k16 step is 16 query rows
            Wgmma<T, D, 1>::run(dka, da[kk], wg_desc(qn, sb + kk * 16 * 128), 1);
    };
    // dQ = dS K of slice qc, dS^T in the buffer at byte qbo, committed
    auto issue_dq = [&](float (&dqa)[MK / 8][4], int qc, unsigned qbo) {
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)  // a k16 step is 16 keys
            WgmmaSS<T, 1, 1>::run(dqa, wg_desc(sdesc, qbo + kk * 16 * 128),
                                  wg_desc(kn, qc * BN * 128 + kk * 16 * 128), kk > 0);
        wg_commit();
    };
    // FIX: the fixed-point scales of this thread's two rows of tile qt of group head qg
    auto load_fix = [&](float (&fix)[2], int qg, int qt) {
        const float* ts = tscale + ((size_t)(hk * G + qg) * ntiles + qt) * BM + 16 * wq + g;
        fix[0] = scale * ts[0];
        fix[1] = scale * ts[8];
    };
    // BULK: warp wq's share of a dq slice, 16 rows x 64 float32 in the accumulators' order (dq
    // tiles, above): lane L's dqa[j] at 512 (j & 3) + 16 L of st[j >> 2] (conflict-free 128-bit
    // stores), as fixed point (FIX: rounded to the nearest multiple of 2^-e) or scaled float32,
    // fenced for the bulk-copy unit, which reads them through the async proxy
    auto stage_share = [&](const float (&dqa)[MK / 8][4], const float (&fix)[2], char* const (&st)[2]) {
#pragma unroll
        for (int j = 0; j < MK / 8; ++j)
            if (FIX)
                *reinterpret_cast<int4*>(st[j >> 2] + 512 * (j & 3) + 16 * lane) =
                    make_int4(fixed_round(fix[0], dqa[j][0]), fixed_round(fix[0], dqa[j][1]),
                              fixed_round(fix[1], dqa[j][2]), fixed_round(fix[1], dqa[j][3]));
            else
                *reinterpret_cast<float4*>(st[j >> 2] + 512 * (j & 3) + 16 * lane) =
                    make_float4(scale * dqa[j][0], scale * dqa[j][1], scale * dqa[j][2], scale * dqa[j][3]);
        proxy_fence();
        __syncwarp();
    };
    // ... then added into slice qc of tile qt, query head hq: by lane 0 in one bulk reduction where
    // the halves are contiguous (whole: LAG's staging), else by lanes 0 and 1, 2 KB each
    auto add_share = [&](char* const (&st)[2], int hq, int qt, int qc, bool whole) {
        if (lane < (whole ? 1 : 2))
            bulk_red_add<FIX>(dq + (((size_t)hq * ntiles + qt) * NSL + qc) * 4096 + 1024 * wq + 512 * lane,
                              lane ? st[1] : st[0], whole ? 4096 : 2048);
        bulk_commit();
    };
    // LAG: the share staged in the warp's own 4 KB at Gs, once the last staging was read
    auto stage_fix = [&](const float (&dqa)[MK / 8][4], const float (&fix)[2], int qc, int qg, int qt) {
        char* const st[2] = {Gs + (4 * cw + wq) * 4096, Gs + (4 * cw + wq) * 4096 + 2048};
        bulk_wait<true>();
        __syncwarp();
        stage_share(dqa, fix, st);
        add_share(st, hk * G + qg, qt, qc, true);
    };
    int pg = 0, pt = 0;  // LAG: the last item's group head and tile
    for (int cg = g_first, cr = r_first, ct = t_first; cg < G; step(cg, cr, ct), ++n) {
        const int rows = min(BM, nq - ct * BM), buf = use.s;
        const long long* Pb = Ps + buf * BM;
        const unsigned sbo = ds_buf(n);  // this item's dS^T buffer
        const int c = slice_of(n);  // DQ: this consumer's slice of the item's dq, if < NSL
        // ORDERED, while the score MMAs run: the key block that adds into this consumer's dq slice
        // of the item just before this one, and a first look at the turn (an acquire), so that
        // the adds wait only if that block had not added yet
        int want = -1;  // the turn's value the adds wait for; -1: seen already
        auto find_prev = [&](const TileRows& tr) {
            if (ORDERED && !BULK && c < NSL) {
                const int prev = prev_block<BN>(mk, tr, qpos ? Pb : nullptr, rows_unsorted, rows, kb, k0, nk, lane);
                want = load_acquire(turn_at<NSL>(turns, hk * G + cg, ntiles, ct, c)) == prev + 1 ? -1 : prev + 1;
            }
        };
        use.wait();
        const unsigned sb = buf * 2 * TILE * (unsigned)sizeof(T);  // the stage's byte offset
        unsigned da[MK / 16][4];  // dS^T, the A operand of dK += dS^T Q
        if (wg_live) {
            float s[1][MK / 8][4], dp[1][MK / 8][4];
            wg_fence();
            score_products<T, D, BN, BM>(s[0], dp[0], kdesc, qk, vdesc, ok, sb);
            if (HOLD) {  // the last item's dV and dK, if any (the oldest of three groups)
                wgmma_wait<2>();
                done_held();
            }
            const TileRows tr = tile_rows(qpos != nullptr, Pb, q0 + (long long)ct * BM, rows, lane);  // MMAs run
            find_prev(tr);  // while the MMAs run
            wgmma_wait<1>();  // S^T
            fence_regs(s[0]);
            unsigned long long te = 0;
            kv_tile_mask<DQ>(s, mk, tr, Pb, rows, k0 + kw0, k0 + min(kw0 + 16, kc1), live, jpos, tq, &te);
            if (DQ && hk == 0 && cg == 0) n_edges += te;  // query head 0's
            float L[MK / 8][2], dl[MK / 8][2];
            column_stats(Ls + buf * BM, Dls + buf * BM, rows, tq, L, dl);
            weights<true>(s[0], sl2, nullptr, L);  // P, as far as ptxas lets it, while dP^T runs
            wgmma_wait<0>();  // dP^T
            fence_regs(dp[0]);
            unsigned pa[MK / 16][4];
            score_grads<T, true>(s[0], dp[0], nullptr, dl, pa, da);
            if (DQ) {  // this thread's dS^T: key rows 64 cw + 16 wq + g + 8h (row r % 8 = g), query
                       // pairs 8j + 2tq in 16-byte chunk j, at chunk j ^ g of the row
                if (BULK && !LAG) {  // the last item's staging read (half of it sits here); ORDERED: its adds completed
                    bulk_wait<!ORDERED>();
                    __syncwarp();
                    if (ORDERED) hand_on(n - 1);
                }
                if (LAG && n > 0) wait_others(n - 1);  // their rows of n - 1; their dQ of n - 3 (this buffer) done
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    char* row = Ss + sbo + (64 * cw + 16 * wq + g + 8 * h) * 128 + 4 * tq;
#pragma unroll
                    for (int j = 0; j < MK / 8; ++j)
                        *reinterpret_cast<unsigned*>(row + ((j ^ g) << 4)) =
                            live[0][h] ? da[j >> 1][(j & 1) * 2 + h] : 0u;
                }
                proxy_fence();  // the stores, before wgmma reads them through the async proxy
                named_arrive(ds_bar(n, cw), 128 * NWG);
            }
            fence_regs(dva);
            fence_regs(dka);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)  // a k16 step is 16 query rows
                Wgmma<T, D, 1>::run(dva, pa[kk], wg_desc(on, sb + kk * 16 * 128), 1);  // dV += P^T dO
            if (!DK_LATE) issue_dk(da, sb);
            wg_commit();
            if (HOLD) {
                use.hold();
            } else if (!DQ) {
                wgmma_wait<0>();  // before the stage is released and pa, da are overwritten
                fence_regs(dva);
                fence_regs(dka);
            }
        } else if (DQ) {
            if (ORDERED) find_prev(tile_rows(qpos != nullptr, Pb, q0 + (long long)ct * BM, rows, lane));
            if (LAG && n > 0) wait_others(n - 1);
            if (BULK && !LAG) {  // the last item's staging in this warp's 2 KB of dS^T rows (read by now): zeros again
                bulk_wait<!ORDERED>();
                __syncwarp();
                if (ORDERED) hand_on(n - 1);
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    *reinterpret_cast<uint4*>(Ss + sbo + cw * 64 * 128 + wq * 2048 + i * 512 + lane * 16) =
                        make_uint4(0u, 0u, 0u, 0u);
                proxy_fence();
            }
            named_arrive(ds_bar(n, cw), 128 * NWG);
        }
        if (!DQ) {
            if (!HOLD || !wg_live) use.release();
            continue;
        }
        if (!LAG) wait_others(n);  // the other consumers' dS^T of item n in buffer n % 2
        // LAG: the dq of item n - 1, waited for before this item's dS^T (at the first item a product
        // of whatever buffer 2 holds, not added)
        const bool dq_now = !LAG || n > 0;
        const int qc = LAG ? slice_of(n - 1) : c, qg = LAG ? pg : cg, qt = LAG ? pt : ct;
        float dqa[MK / 8][4];
        if (qc < NSL) issue_dq(dqa, qc, LAG ? ds_buf(n + NBUF - 1) : sbo);
        int seen = 0, wnt = 0;  // ORDERED && BULK: a first look at the item's turn while dQ runs; the turn awaited
        float fix[2] = {0.f, 0.f};  // FIX: the fixed-point scales of this thread's two rows, loaded while dQ runs
        if (ORDERED && BULK && c < NSL) {
            seen = load_acquire(turn_at<NSL>(turns, hk * G + cg, ntiles, ct, c));
            wnt = wants[buf];
        }
        if (FIX && qc < NSL) load_fix(fix, qg, qt);
        if (DK_LATE && wg_live) {  // dK, left running beside the dq staging; dV and dQ done
            issue_dk(da, sb);
            wg_commit();
            wgmma_wait<1>();
        } else {
            wgmma_wait<0>();  // dV, dK and dQ
            fence_regs(dka);
        }
        fence_regs(dva);
        if (qc < NSL) fence_regs(dqa);
        if (LAG) {
            if (dq_now) stage_fix(dqa, fix, qc, qg, qt);
        } else if (c < NSL && BULK) {
            // in this consumer's rows of the other dS^T buffer (free until the next item's dS^T),
            // then in the warp's 2 KB at Gs
            char* const st[2] = {Ss + ds_buf(n + 1) + cw * 64 * 128 + wq * 2048, Gs + (4 * cw + wq) * 2048};
            stage_share(dqa, fix, st);
            const int hq = hk * G + cg;
            if (ORDERED) {
                int* turn = turn_at<NSL>(turns, hq, ntiles, ct, c);
                if ((tid & 127) == 0) pend[cw] = turn;
                if (seen != wnt) turn_wait(turn, wnt);
                // the acquire (generic proxy), then a generic-to-async proxy fence, so that these
                // bulk reductions (async proxy) follow the lower block's
                asm volatile("fence.proxy.async.global;\n" ::: "memory");
            }
            add_share(st, hq, ct, c, false);
        } else if (!BULK && c < NSL) {
            const int hq = hk * G + cg;
            int* turn = turn_at<NSL>(turns, hq, ntiles, ct, c);
            if (ORDERED && want >= 0) turn_wait(turn, want);
            float* base = dq + ((size_t)hq * nq + ct * BM) * D + 64 * c + 2 * tq;  // head-major rows
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = 16 * wq + g + 8 * h;  // the accumulators' query row
                if (r >= rows) continue;
#pragma unroll
                for (int j = 0; j < MK / 8; ++j)
                    red_add2(base + (size_t)r * D + 8 * j, scale * dqa[j][2 * h], scale * dqa[j][2 * h + 1]);
            }
            // ORDERED: the warpgroup's adds, then the next block's turn ("the fence also releases
            // data that was weakly-written by other threads prior to the last syncthreads")
            if (ORDERED) {
                named_sync(2 + cw, 128);
                if ((tid & 127) == 0) release_turn(turn, kb + 1);
            }
        }
        if (DK_LATE) {  // dK, before its stage is released
            wgmma_wait<0>();
            fence_regs(dka);
        }
        pg = cg;
        pt = ct;
        use.release();
    }
    if (LAG && n > 0) {  // the last item's dq
        const int qc = slice_of(n - 1);
        wait_others(n - 1);
        float dqa[MK / 8][4], fix[2];
        issue_dq(dqa, qc, ds_buf(n + NBUF - 1));
        load_fix(fix, pg, pt);
        wgmma_wait<0>();
        fence_regs(dqa);
        stage_fix(dqa, fix, qc, pg, pt);
    }
    if (HOLD) {  // the last item's dV and dK
        wgmma_wait<0>();
        done_held();
    }
    if (BULK) {  // the last adds completed (and their turns handed on) before the block's memory goes
        bulk_wait<false>();
        if (ORDERED) hand_on(n - 1);
    }
    if (kw0 < kc1 && (nr || sizeof(TO) != 4)) {  // float32 sums: unchanged where no query reaches these keys
        const size_t base = krow0 + (size_t)(kw0 - kc0) * krs;
        put_rows<D, TO>(dk + base, krs, dka, live[0], scale, g, tq);
        put_rows<D, TO>(dv + base, krs, dva, live[0], 1.f, g, tq);
    }
    if (DQ && hk == 0) {
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) n_edges += __shfl_xor_sync(0xffffffffu, n_edges, s);
        if (lane == 0 && n_edges) atomicAdd(edges, n_edges);
    }
}
