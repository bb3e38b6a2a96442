// Listed edges: attention of each query row over explicit key columns (the `csr` term, and the
// `random:R[:SEED]` term, whose columns random_columns draws on the device bit for bit as
// hpcattn/masks.py's random_keys does). Same (o, lse) contract as attend_fwd; one warp per
// (row, head), lanes over the row's columns. Columns outside this key block, above the row
// under `causal`, or already edges of an implicit term (merged separately) are skipped, so the
// union is never counted twice.
#include "mask.cuh"

#define RWARPS 4

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Row i's r keys of [0, n) (r <= n): Floyd's sampling driven by splitmix64, unsorted.
__global__ void random_columns(unsigned long long seed, const long long* __restrict__ qpos, int nq,
                               long long r, long long n, long long* __restrict__ out) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= nq) return;
    long long* keys = out + (size_t)row * r;
    const unsigned long long base = mix64(mix64(seed) ^ (unsigned long long)qpos[row]);
    for (long long d = 0; d < r; ++d) {
        const long long m = n - r + d;
        const long long t = (long long)(mix64(base ^ (unsigned long long)d) % (unsigned long long)(m + 1));
        bool taken = false;
        for (long long e = 0; e < d && !taken; ++e) taken = keys[e] == t;
        keys[d] = taken ? m : t;
    }
}

__device__ __forceinline__ bool terms_allow(const MaskDev& m, long long i, long long j) {
    for (int t = 0; t < m.n; ++t)
        if (term_allows(m, t, i, j)) return true;
    return false;
}

// Row r's columns are cols[indptr[r] .. indptr[r+1]) or, when width > 0, cols[r*width ..
// (r+1)*width). mask_words holds the implicit terms to exclude and the causal flag.
template <typename T, int DMAX>
__global__ void __launch_bounds__(RWARPS * 32)
attend_rows(const T* __restrict__ q, const long long* __restrict__ qpos, const T* __restrict__ k,
            const T* __restrict__ v, const long long* __restrict__ indptr,
            const long long* __restrict__ cols, long long width, float* __restrict__ o,
            float* __restrict__ lse, unsigned long long* __restrict__ edges,
            const long long* __restrict__ mask_words, int nq, int nk, int D, int G, long long k0,
            float scale) {
    constexpr int PER = DMAX / 32;
    __shared__ float qs[RWARPS][DMAX];
    __shared__ MaskDev mk;
    const int head = blockIdx.y, kvh = head / G;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * RWARPS + warp;
    if (threadIdx.x == 0) load_mask(mask_words, mk);
    __syncthreads();
    if (row >= nq) return;  // whole warps leave; no block barrier follows
    const T* qr = q + ((size_t)head * nq + row) * D;
    for (int d = lane; d < D; d += 32) qs[warp][d] = to_f<T>(qr[d]) * scale * 1.4426950408889634f;
    __syncwarp();
    const long long pos = qpos[row];
    const long long a = width > 0 ? row * width : indptr[row];
    const long long b = width > 0 ? a + width : indptr[row + 1];
    const T* kh = k + (size_t)kvh * nk * D;
    const T* vh = v + (size_t)kvh * nk * D;
    float m = -INFINITY, l = 0.f, acc[PER];
#pragma unroll
    for (int u = 0; u < PER; ++u) acc[u] = 0.f;
    unsigned long long n_edges = 0;
    for (long long c = a; c < b; c += 32) {
        const long long j = c + lane < b ? cols[c + lane] : -1;
        const bool ok = j >= k0 && j < k0 + nk && !(mk.causal && j > pos) && !terms_allow(mk, pos, j);
        n_edges += __popc(__ballot_sync(0xffffffffu, ok)) * (lane == 0);
        float s = -INFINITY;
        if (ok) {
            const T* kr = kh + (size_t)(j - k0) * D;
            s = 0.f;
            for (int d = 0; d < D; ++d) s = fmaf(qs[warp][d], to_f<T>(kr[d]), s);
        }
        const float m_new = fmaxf(m, warp_max(s));
        if (m_new == -INFINITY) continue;
        const float p = ok ? exp2f(s - m_new) : 0.f;
        const float alpha = exp2f(m - m_new);
        l = l * alpha + warp_sum(p);
        m = m_new;
#pragma unroll
        for (int u = 0; u < PER; ++u) acc[u] *= alpha;
        for (int e = 0; e < 32; ++e) {
            const float pe = __shfl_sync(0xffffffffu, p, e);
            const long long je = __shfl_sync(0xffffffffu, j, e);
            if (pe == 0.f) continue;
            const T* vr = vh + (size_t)(je - k0) * D;
#pragma unroll
            for (int u = 0; u < PER; ++u)
                if (lane + 32 * u < D) acc[u] = fmaf(pe, to_f<T>(vr[lane + 32 * u]), acc[u]);
        }
    }
    const bool any = l > 0.f;
    const float inv = any ? 1.f / l : 0.f;
    float* orow = o + ((size_t)head * nq + row) * D;
#pragma unroll
    for (int u = 0; u < PER; ++u)
        if (lane + 32 * u < D) orow[lane + 32 * u] = acc[u] * inv;
    if (lane == 0) lse[(size_t)head * nq + row] = any ? (m + log2f(l)) * 0.6931471805599453f : -INFINITY;
    if (head == 0 && lane == 0 && n_edges) atomicAdd(edges, n_edges);
}
