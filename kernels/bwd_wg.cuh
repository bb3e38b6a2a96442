// Device helpers shared by the Hopper backward's kernels (attend_bwd_wgmma.cu's two passes and
// attend_bwd_fused.cu's fused key-major pass): the two score products of a tile and the ring of
// shared-memory stages between the loader warpgroup and the consumer warpgroups.
#pragma once
#include "bwd.cuh"
#include "wgmma.cuh"

// Both passes' two score products, as wgmma m64n64k16 from shared memory with both operands
// K-major in 128-byte swizzle atoms of 64 columns: s = A1 B1^T, then dp = A2 B2^T, each
// committed as its own group. A1, A2: descriptors of tiles of RA rows; B1, B2: of tiles of RB
// rows, at byte offset b0 (the stage or buffer).
template <typename T, int D, int RA, int RB>
__device__ __forceinline__ void score_products(float (&s)[MK / 8][4], float (&dp)[MK / 8][4], unsigned a1,
                                               unsigned b1, unsigned a2, unsigned b2, unsigned b0) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {  // k16 = 32 bytes of a 128-byte atom row; atoms of 64 columns
        const unsigned a = (kk >> 2) * RA * 128 + (kk & 3) * 32, b = b0 + (kk >> 2) * RB * 128 + (kk & 3) * 32;
        WgmmaSS<T>::run(s, wg_desc(a1, a), wg_desc(b1, b), kk > 0);
    }
    wg_commit();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned a = (kk >> 2) * RA * 128 + (kk & 3) * 32, b = b0 + (kk >> 2) * RB * 128 + (kk & 3) * 32;
        WgmmaSS<T>::run(dp, wg_desc(a2, a), wg_desc(b2, b), kk > 0);
    }
    wg_commit();
}

// A ring of ST shared-memory stages between the loader warpgroup (its 128 threads, or the first
// `loaders`) and the 128 NWG consumer threads of the backward's Hopper kernels: full[s] completes
// a phase when the loader threads' copies into stage s landed, empty[s] when every consumer
// thread (and any `extra` reader) is done with it (each arrives itself: the key-major consumers
// read the stage's statistics with plain loads, and an arrival per reader orders each read
// before the refill, as racecheck can verify).
// Item n (of the loader's sequence, which every consumer walks too) goes to stage n % ST, fill n / ST.
template <int ST> struct Ring {
    unsigned long long full[ST], empty[ST];
    // one thread, before the block's barrier; `loaders` threads fill a stage, `extra` threads
    // beside the consumers' release it
    __device__ __forceinline__ void init(int nwg, int loaders = 128, int extra = 0) {
        for (int s = 0; s < ST; ++s) {
            mb_init(&full[s], loaders);
            mb_init(&empty[s], 128 * nwg + extra);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
};
// The loader's side: a stage is refilled once every consumer thread released its previous fill;
// an item's copies (one commit group) are signalled once the next item's are issued, so that
// two groups are in flight, or, where the next item's stage is still in use, as soon as they
// landed: a signal that waited for that stage would hold the consumers back by one item's
// issue at two stages (0.79x at causal 64K D = 128, H100, 2026-12-07).
template <int ST> struct RingLoad {
    Ring<ST>& r;
    int n = 0, pend = -1;  // items issued; the newest one, not yet signalled (-1: none)
    // the stage of item n, once free
    __device__ __forceinline__ int stage() {
        const int s = n % ST;
        if (n >= ST && !mb_test(&r.empty[s], (n / ST - 1) & 1)) {  // not free yet: item n - 1 signalled once landed
            finish();
            mb_wait_asm(&r.empty[s], (n / ST - 1) & 1);
        }
        return s;
    }
    // after item n's copies: commits them and signals item n - 1 once it landed
    __device__ __forceinline__ void issued() {
        cp_commit();
        cp_wait<1>();
        signal();
        pend = n++;
    }
    __device__ __forceinline__ void finish() {  // after the last item (or early, see stage)
        cp_wait<0>();
        signal();
        pend = -1;
    }
    __device__ __forceinline__ void signal() {
        if (pend < 0) return;
        proxy_fence();  // the landed copies, before wgmma reads them through the async proxy
        mb_arrive(&r.full[pend % ST]);
    }
};
// A consumer thread's side: the stage of its next item (s) and the parity of that fill (ph).
// Every item is waited for and released, computed or not: a thread that released fill f of a
// stage before every other thread did would complete the empty phase too early.
template <int ST> struct RingUse {
    Ring<ST>& r;
    int s = 0, ph = 0, held = -1;  // held: a stage this thread is still using after hold(), or -1
    __device__ __forceinline__ void wait() { mb_wait_asm(&r.full[s], ph); }
    __device__ __forceinline__ void release() {  // this thread is done with the stage
        mb_arrive(&r.empty[s]);
        next();
    }
    // on to the next stage, this one still in use (an MMA reading it runs on) until release_held,
    // which must come before this thread waits for any later stage's refill
    __device__ __forceinline__ void hold() {
        held = s;
        next();
    }
    __device__ __forceinline__ void release_held() {
        if (held >= 0) mb_arrive(&r.empty[held]);
        held = -1;
    }
    __device__ __forceinline__ void next() {
        if (++s == ST) {
            s = 0;
            ph ^= 1;
        }
    }
};
