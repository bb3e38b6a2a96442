// The Hopper (sm_90a) backward in one key-major pass (FlashAttention-3's structure): dk and dv as
// attend_bwd_kv_wg computes them (the same per-tile math, its tiles in reverse order) and each
// work item's dq share dS K, added into float32 sums, so that attend_bwd_q_wg need not run.
// Per tile, the NWG consumer warpgroups put their 64-key rows of dS^T into shared memory; once
// the others' rows are there, warpgroup (item + c) % NWG computes the tile's dq columns
// [64c, 64c + 64) as wgmma m64n64k16 over the block's 64 NWG keys (dS^T read M-major, the
// block's K rows N-major) and adds them into dq with red.global.add (or, BULK, staged in shared
// memory by each warp and added into dq tiles by the bulk-copy unit's reductions),
// in any order (ORDERED = false) or in ascending key-block order (ORDERED: the same bits on
// every rerun).
#include "bwd_keys.cuh"

// key_pass with the dq adds (see bwd_keys.cuh): ORDERED, the key blocks add into each dq tile in
// ascending order (the same bits on every rerun); BULK, by bulk asynchronous reductions. q, k, v
// and dout are read through tm's maps.
template <typename T, int D, typename TO, int NWG, int ST, int MINB, bool ORDERED, bool BULK>
__global__ void __launch_bounds__(128 * (NWG + 1), MINB)
attend_bwd_fused_wg(const T* __restrict__ q, const long long* __restrict__ qpos, const T* __restrict__ k,
                    const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
                    const float* __restrict__ delta, TO* __restrict__ dk, TO* __restrict__ dv, float* __restrict__ dq,
                    unsigned long long* __restrict__ edges, int* __restrict__ turns, const float* __restrict__ tscale,
                    const long long* __restrict__ mask_words, const int* __restrict__ unsorted, int nq, int nk,
                    int G, long long k0, float scale, long long q0, BWD_STRIDES, const __grid_constant__ TmaMaps tm) {
    key_pass<T, D, TO, NWG, ST, MINB, true, ORDERED, BULK>(&tm, qpos, lse, delta, dk, dv, dq, edges, turns,
                                                         tscale, mask_words, unsorted, nq, nk, G, k0, scale, q0,
                                                         BWD_STRIDE_ARGS);
}
