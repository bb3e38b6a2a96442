// Local sparse attention forward on tensor cores for float16/bfloat16 with head dim D in
// {32, 64, 96, 128}: same contract and mask handling as attend_fwd in attend.cu.
// FlashAttention-2's scheme with PTX mma.sync m16n8k16: a block of W warps takes 16*RM*W query
// rows of one query head (RM 16-row MMA tiles per warp) and walks the MK-key tiles of the
// block's key spans.
// K and V tiles rotate through ST shared-memory buffers filled by cp.async ST - 1 tiles ahead;
// S, P and O stay in registers (P is re-packed from S's accumulators as the A operand of P*V).
// Issuing the next tile's S before this tile's softmax (FlashAttention-3's overlap) was
// measured slower here: it costs registers, hence resident blocks (jobs/mma_tune.py). Tiles wholly inside the mask take no per-pair test; the others build one
// 64-bit row mask per query row from the mask terms' intervals.
#include "mma.cuh"

// TO: the type o is written in (float for the merge contract; T halves o's memory where a
// caller keeps the output as is). qpos == nullptr: query r sits at position q0 + r (no
// position array: 8 bytes per token less for self-attention on long sequences). o may be q
// itself (TO = T): a block reads its own q rows before the loop and writes the same rows of o
// after it, and no block reads another's rows, hence no __restrict__ on q and o.
// Shape: W warps, RM 16-row MMA tiles per warp, ST K/V buffers, MINB blocks per SM asked of the
// register allocator. QREG: q fragments stay in registers (the q rows pass through the last
// K/V buffer, which the loop's first prefetch then overwrites); otherwise every tile re-reads
// them from their own shared rows.
template <typename T, int D, typename TO, int W, int RM, bool QREG, int ST, int MINB>
__global__ void __launch_bounds__(W * 32, MINB)
attend_fwd_mma(const T* q, const long long* __restrict__ qpos, const T* __restrict__ k,
               const T* __restrict__ v, TO* o, float* __restrict__ lse,
               unsigned long long* __restrict__ edges, const long long* __restrict__ mask_words,
               int nq, int nk, int G, long long k0, float scale, long long q0, STRIDE_ARGS) {
    constexpr int BM = 16 * RM * W, LD = D + 8, NT = W * 32, TILE = MK * LD;
    static_assert(ST >= 2 && (!QREG || BM <= 2 * MK), "q rows must fit in one K/V buffer");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* KV = reinterpret_cast<T*>(smem_raw);  // buffer b: K at KV + 2b*TILE, V at KV + (2b+1)*TILE
    T* Qs = QREG ? KV + 2 * (ST - 1) * TILE : KV + 2 * ST * TILE;  // BM x LD
    __shared__ MaskDev mk;
    __shared__ long long qlo_s, qhi_s, lo_s[HPCATTN_MAX_SPANS], hi_s[HPCATTN_MAX_SPANS];
    __shared__ int nsp_s;
    __shared__ unsigned long long edges_s;

    const Strides qs{qbs, qhs, qrs}, ks{kbs, khs, krs}, os{obs, ohs, ors};
    const int head = blockIdx.y, kvh = head / G;
    const int t0 = blockIdx.x * BM, t1 = min(nq, t0 + BM);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const T* kh = k + ks.head(kvh, H / G);
    const T* vh = v + ks.head(kvh, H / G);

    load_tile<T, D, LD>(q + qs.head(head, H) + (size_t)t0 * qs.rs, qs.rs, t1 - t0, BM, Qs, tid, NT);
    cp_commit();
    if (warp == 0) {  // positions and mask in one round trip, then the block's key spans
        row_block_spans(mask_words, mk, qpos, q0, t0, t1, k0, nk, lane, qlo_s, qhi_s, lo_s, hi_s, nsp_s);
        if (lane == 0) edges_s = 0ull;
    }
    __syncthreads();
    const int nsp = nsp_s;
    const long long qlo = qlo_s, qhi = qhi_s;
    int sp = 0, fsp = 0;  // compute and fetch cursors
    long long c0 = nsp ? lo_s[0] : 0, fc0 = c0;
#pragma unroll
    for (int b = 0; b < ST - 1; ++b) {  // tiles 0 .. ST - 2, one commit group each
        if (fsp < nsp) {
            const int n = (int)min((long long)MK, hi_s[fsp] - fc0);
            load_tile<T, D, LD>(kh + (size_t)(fc0 - k0) * ks.rs, ks.rs, n, MK, KV + 2 * b * TILE, tid, NT);
            load_tile<T, D, LD>(vh + (size_t)(fc0 - k0) * ks.rs, ks.rs, n, MK, KV + (2 * b + 1) * TILE, tid, NT);
            next_tile(fsp, fc0, nsp, lo_s, hi_s);
        }
        cp_commit();
    }

    int rows[RM][2];
    bool live[RM][2];
    long long pos[RM][2];
    float m[RM][2], l[RM][2], oacc[RM][D / 8][4];
#pragma unroll
    for (int mi = 0; mi < RM; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = t0 + (warp * RM + mi) * 16 + g + 8 * h;
            rows[mi][h] = r;
            live[mi][h] = r < t1;
            pos[mi][h] = r >= t1 ? 0 : qpos ? qpos[r] : q0 + r;
            m[mi][h] = -INFINITY;
            l[mi][h] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < D / 8; ++j) oacc[mi][j][0] = oacc[mi][j][1] = oacc[mi][j][2] = oacc[mi][j][3] = 0.f;
    }
    // scores stay unscaled until the exponent (one FFMA each); the row max of unscaled scores
    // times sl2 is the scaled row max because sl2 > 0 (the host checks scale > 0)
    const float sl2 = scale * MLOG2E;
    unsigned long long n_edges = 0;
    const T* Qw = Qs + (warp * RM * 16 + (lane & 15)) * LD + (lane >> 4) * 8;  // this lane's ldmatrix row

    unsigned qa[QREG ? RM : 1][QREG ? D / 16 : 1][4];
    cp_wait<ST - 1>();  // the q rows
    __syncthreads();
    if (QREG) {
#pragma unroll
        for (int mi = 0; mi < RM; ++mi)
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) ldsm4(qa[QREG ? mi : 0][QREG ? kk : 0], Qw + mi * 16 * LD + kk * 16);
        __syncthreads();  // the first prefetch overwrites the q rows
    }

    int buf = 0;
    while (sp < nsp) {
        const int nkt = (int)min((long long)MK, hi_s[sp] - c0);
        if (fsp < nsp) {  // prefetch tile i + ST - 1 into the buffer tile i - 1 used
            const int n = (int)min((long long)MK, hi_s[fsp] - fc0), fb = buf == 0 ? ST - 1 : buf - 1;
            load_tile<T, D, LD>(kh + (size_t)(fc0 - k0) * ks.rs, ks.rs, n, MK, KV + 2 * fb * TILE, tid, NT);
            load_tile<T, D, LD>(vh + (size_t)(fc0 - k0) * ks.rs, ks.rs, n, MK, KV + (2 * fb + 1) * TILE, tid, NT);
            next_tile(fsp, fc0, nsp, lo_s, hi_s);
        }
        cp_commit();
        cp_wait<ST - 1>();  // tile i
        __syncthreads();
        float s[RM][MK / 8][4];
        tile_scores<T, D, RM, QREG, LD>(s, qa, Qw, KV + 2 * buf * TILE, lane);

        const bool full = nkt == MK && mask_tile_full(mk, qlo, qhi, c0, c0 + MK);
        mask_scores<RM>(s, mk, live, pos, c0, nkt, full, tq, n_edges);
        // online softmax, log2 units; the 4 lanes of a quad share rows g and g + 8
        unsigned pa[RM][MK / 16][4];
#pragma unroll
        for (int mi = 0; mi < RM; ++mi) {
            float u[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float x = -INFINITY;
#pragma unroll
                for (int j = 0; j < MK / 8; ++j) x = fmaxf(x, fmaxf(s[mi][j][2 * h], s[mi][j][2 * h + 1]));
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
                const float mn = fmaxf(m[mi][h], x * sl2);
                u[h] = mn == -INFINITY ? 0.f : mn;
                const float alpha = exp2f(m[mi][h] - u[h]);
                m[mi][h] = mn;
                l[mi][h] *= alpha;
#pragma unroll
                for (int j = 0; j < D / 8; ++j) {
                    oacc[mi][j][2 * h] *= alpha;
                    oacc[mi][j][2 * h + 1] *= alpha;
                }
            }
#pragma unroll
            for (int j = 0; j < MK / 8; ++j) {
                const float p0 = exp2f(fmaf(s[mi][j][0], sl2, -u[0])), p1 = exp2f(fmaf(s[mi][j][1], sl2, -u[0]));
                const float p2 = exp2f(fmaf(s[mi][j][2], sl2, -u[1])), p3 = exp2f(fmaf(s[mi][j][3], sl2, -u[1]));
                l[mi][0] += p0 + p1;
                l[mi][1] += p2 + p3;
                pa[mi][j >> 1][(j & 1) * 2] = pack2<T>(p0, p1);
                pa[mi][j >> 1][(j & 1) * 2 + 1] = pack2<T>(p2, p3);
            }
        }
        pv_accumulate<T, D, RM, LD>(oacc, pa, KV + (2 * buf + 1) * TILE, lane);  // O += P V
        __syncthreads();  // every warp is done with this buffer before it is refilled
        buf = buf + 1 == ST ? 0 : buf + 1;
        next_tile(sp, c0, nsp, lo_s, hi_s);
    }
    cp_wait<0>();

#pragma unroll
    for (int mi = 0; mi < RM; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float lt = l[mi][h];
            lt += __shfl_xor_sync(0xffffffffu, lt, 1);
            lt += __shfl_xor_sync(0xffffffffu, lt, 2);
            const int r = rows[mi][h];
            if (r >= t1) continue;
            const float inv = lt > 0.f ? 1.f / lt : 0.f;
            TO* orow = o + os.head(head, H) + (size_t)r * os.rs + 2 * tq;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) store2<TO>(orow + 8 * j, oacc[mi][j][2 * h] * inv, oacc[mi][j][2 * h + 1] * inv);
            if (tq == 0) lse[(size_t)head * nq + r] = lt > 0.f ? (m[mi][h] + log2f(lt)) * MLN2 : -INFINITY;
        }
    }

#pragma unroll
    for (int s = 16; s > 0; s >>= 1) n_edges += __shfl_xor_sync(0xffffffffu, n_edges, s);
    if (lane == 0 && n_edges) atomicAdd(&edges_s, n_edges);
    __syncthreads();
    if (tid == 0 && head == 0 && edges_s) atomicAdd(edges, edges_s);
}
