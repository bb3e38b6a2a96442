// Local sparse attention backward on tensor cores for float16/bfloat16, D in {32, 64, 96, 128},
// implicit mask terms: attend_bwd's contract (attend.cu) with P and dS rounded to the input
// dtype for the MMAs, as FlashAttention does. FlashAttention-2's backward in two kernels so that
// no sum is reduced atomically and reruns give the same bits: every row of dq, dk and dv is
// owned by one block, which adds its share in a fixed order.
// - attend_bwd_kv: a block owns 16 W keys of one kv head (K, V and dK, dV per warp) and walks the
//   64-row query tiles that reach them, for all G query heads of the group: S^T = K Q^T,
//   dP^T = V dO^T, P^T = exp(scale S^T - lse), dS^T = P^T (dP^T - delta), dV += P^T dO,
//   dK += scale dS^T Q.
// - attend_bwd_q: a block owns 16 W query rows of one head and walks the MK-key tiles they
//   reach, as the forward does: S, dP, P and dS again, dQ += scale dS K; counts the edges.
// q, do and dq lie alike, k, v, dk and dv alike, in any layout that kernels/tiles.cuh's Strides
// describe (head-major, or the caller's (B, n, H, D)); lse and delta (B,Hkv,G,nq) float32.
// TO = float: dq, dk, dv are float32 accumulators the kernels add into (a variant's key blocks);
// TO = T: they are written, in the input dtype (the whole backward at once). qpos == nullptr:
// row r sits at position q0 + r.
#include "bwd.cuh"

// Sets *unsorted when the positions are not in ascending order: attend_bwd_kv then cannot find
// the rows of a position interval by search and walks every query tile instead.
__global__ void rows_unsorted(const long long* __restrict__ qpos, int nq, int* __restrict__ unsorted) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x + 1; r < nq; r += gridDim.x * blockDim.x)
        if (qpos[r] < qpos[r - 1]) *unsorted = 1;
}

// delta = rowsum(dO * O) in float32, (B, H, nq) head-major, for dO and O in any Strides layout
// (H query heads per batch entry): D / 8 lanes per row, 8 elements each.
template <typename T, int D>
__global__ void row_delta(const T* __restrict__ dout, const T* __restrict__ o, float* __restrict__ delta, int nq,
                          long long rows, long long dbs, long long dhs, long long drs, long long obs, long long ohs,
                          long long ors, int H) {
    constexpr int L = D / 8 <= 4 ? 4 : D / 8 <= 8 ? 8 : 16;  // lanes per row, a power of two
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / L;
    const int part = threadIdx.x % L;
    float sum = 0.f;
    if (i < rows && part < D / 8) {
        const int head = (int)(i / nq), r = (int)(i % nq);
        const Strides ds{dbs, dhs, drs}, os{obs, ohs, ors};
        float x[8], y[8];
        load8(dout + ds.head(head, H) + (size_t)r * drs + 8 * part, x);
        load8(o + os.head(head, H) + (size_t)r * ors + 8 * part, y);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum = fmaf(x[e], y[e], sum);
    }
#pragma unroll
    for (int s = L / 2; s > 0; s >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, s);
    if (i < rows && part == 0) delta[i] = sum;
}

// dst = src in T, src float32 head-major rows (B, H, nq, D) contiguous (attend_bwd_fused_wg's dq
// sums), dst in any Strides layout (H query heads per batch entry): 8 elements a thread.
template <typename T, int D>
__global__ void store_rows(const float* __restrict__ src, T* __restrict__ dst, int nq, long long rows,
                           long long bs, long long hs, long long rs, int H) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x, row = i / (D / 8);
    if (row >= rows) return;
    const int head = (int)(row / nq), r = (int)(row % nq), part = (int)(i % (D / 8));
    const float4 a = *reinterpret_cast<const float4*>(src + 8 * i);
    const float4 b = *reinterpret_cast<const float4*>(src + 8 * i + 4);
    const uint4 out{pack2<T>(a.x, a.y), pack2<T>(a.z, a.w), pack2<T>(b.x, b.y), pack2<T>(b.z, b.w)};
    *reinterpret_cast<uint4*>(dst + Strides{bs, hs, rs}.head(head, H) + (size_t)r * rs + 8 * part) = out;
}

// attend_bwd_fused_wg's BULK dq tiles ((B H, ntiles, D / 64, 4096) in the MMA accumulators'
// order, kernels/bwd_keys.cuh: float32, or with tscale 32-bit fixed-point sums, row i of tile t
// in units of 1 / tscale[64 (head ntiles + t) + i]) as rows: added into float32 head-major rows (B, H, nq, D)
// contiguous (TO float), or stored in TO in any Strides layout (H query heads per batch entry):
// 8 elements of a row a thread (one 8-column group j of a 64-column slice, which the tiles hold
// as 4 pairs 4 elements apart).
template <typename TO, int D>
__global__ void tile_rows_out(const float* __restrict__ src, const float* __restrict__ tscale, TO* __restrict__ dst,
                              int nq, long long rows, long long bs, long long hs, long long rs, int H) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x, row = i / (D / 8);
    if (row >= rows) return;
    const int head = (int)(row / nq), r = (int)(row % nq), part = (int)(i % (D / 8)), rr = r % 64;
    const size_t tile = (size_t)head * ((nq + 63) / 64) + r / 64;
    const float* t = src + (tile * (D / 64) + part / 8) * 4096 + 1024 * (rr / 16) + 128 * (part % 8) +
                     16 * (rr % 8) + 2 * ((rr % 16) / 8);
    const float unit = tscale ? 1.f / tscale[64 * tile + rr] : 0.f;  // a power of 2: exact
    float v[8];
#pragma unroll
    for (int tq = 0; tq < 4; ++tq) {
        const float2 p = *reinterpret_cast<const float2*>(t + 4 * tq);
        v[2 * tq] = tscale ? (float)__float_as_int(p.x) * unit : p.x;
        v[2 * tq + 1] = tscale ? (float)__float_as_int(p.y) * unit : p.y;
    }
    if constexpr (sizeof(TO) == 4) {  // float32 sums
        float4* d = reinterpret_cast<float4*>(reinterpret_cast<float*>(dst) + (size_t)row * D + 8 * part);
        const float4 a = d[0], b = d[1];
        d[0] = make_float4(a.x + v[0], a.y + v[1], a.z + v[2], a.w + v[3]);
        d[1] = make_float4(b.x + v[4], b.y + v[5], b.z + v[6], b.w + v[7]);
    } else {
        const uint4 out{pack2<TO>(v[0], v[1]), pack2<TO>(v[2], v[3]), pack2<TO>(v[4], v[5]), pack2<TO>(v[6], v[7])};
        *reinterpret_cast<uint4*>(dst + Strides{bs, hs, rs}.head(head, H) + (size_t)r * rs + 8 * part) = out;
    }
}

// The fixed-point tiles' scales (row_scales, below), first over each kv head bh's keys: max_k
// |V_k| (L2 norm) and max |K| (any element) into out[2 bh], out[2 bh + 1] (zeroed by the caller)
// as the bits of non-negative floats, which order as unsigned ints (atomicMax). k and v in one
// Strides layout (Hkv heads per batch entry); D / 8 lanes a key, 8 elements each.
template <typename T, int D>
__global__ void key_maxima(const T* __restrict__ k, const T* __restrict__ v, unsigned* __restrict__ out, int nk,
                           long long bs, long long hs, long long rs, int Hkv) {
    constexpr int L = D / 8, R = 32 / L;  // lanes a key, keys a warp
    const int bh = blockIdx.y, lane = threadIdx.x % 32, part = lane % L, warps = blockDim.x / 32;
    const size_t head = Strides{bs, hs, rs}.head(bh, Hkv);
    float vn = 0.f, km = 0.f;
    for (long long r0 = ((long long)blockIdx.x * warps + threadIdx.x / 32) * R; r0 < nk;
         r0 += (long long)gridDim.x * warps * R) {  // warp-uniform trips: the shuffles see every lane
        const long long r = r0 + lane / L;
        float ss = 0.f;
        if (r < nk) {
            float x[8], y[8];
            load8(k + head + (size_t)r * rs + 8 * part, x);
            load8(v + head + (size_t)r * rs + 8 * part, y);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                km = fmaxf(km, fabsf(x[e]));
                ss = fmaf(y[e], y[e], ss);
            }
        }
#pragma unroll
        for (int s = L / 2; s > 0; s >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, s);
        vn = fmaxf(vn, sqrtf(ss));
    }
    vn = warp_max(vn);
    km = warp_max(km);
    if (lane == 0) {
        atomicMax(out + 2 * bh, __float_as_uint(vn));
        atomicMax(out + 2 * bh + 1, __float_as_uint(km));
    }
}

// Then 2^e per query row of each head, padded to whole 64-row tiles (the dq tiles' rows; 1 for
// padding rows): e the largest with 2^e b_i <= 2^30, b_i = scale (|dO_i| max |V| + |delta_i|)
// max |K| (key_maxima's, of the head's kv head), found exactly from b's exponent, within
// [-100, 100]; per row, so that a row's units follow its own bound, not its tile's largest.
// D / 8 lanes a row. dout in any Strides layout (H = Hkv G query heads per batch entry), delta
// (heads, nq); rows: heads times the padded rows.
template <typename T, int D>
__global__ void row_scales(const T* __restrict__ dout, const float* __restrict__ delta,
                           const unsigned* __restrict__ kv, float* __restrict__ out, int nq, int G, float scale,
                           long long rows, long long bs, long long hs, long long rs, int H) {
    constexpr int L = D / 8;  // lanes a row
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / L, np = (nq + 63) / 64 * 64;
    const int head = (int)(row / np), r = (int)(row % np), part = threadIdx.x % L;
    const bool live = row < rows && r < nq;
    float ss = 0.f;
    if (live) {
        float x[8];
        load8(dout + Strides{bs, hs, rs}.head(head, H) + (size_t)r * rs + 8 * part, x);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(x[e], x[e], ss);
    }
#pragma unroll
    for (int s = L / 2; s > 0; s >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, s);
    if (part || row >= rows) return;
    if (!live) {
        out[row] = 1.f;
        return;
    }
    const int kvh = (head / H) * (H / G) + (head % H) / G;
    const float m = sqrtf(ss) * __uint_as_float(kv[2 * kvh]) + fabsf(delta[(size_t)head * nq + r]);
    int x;
    const float f = frexpf(fmaxf(scale * m * __uint_as_float(kv[2 * kvh + 1]), 0x1p-100f), &x);
    out[row] = ldexpf(1.f, max(-100, min(100, (f == 0.5f ? 31 : 30) - x)));  // b = f 2^x, f in [1/2, 1)
}

// Shape: W warps of 16 keys each; KREG: K and V fragments stay in registers (else re-read from
// shared memory every tile). Shared memory: two stages of (Q, dO) tiles, the block's K and V
// rows, two stages of (lse, delta, positions).
template <typename T, int D, typename TO, int W, bool KREG, int MINB>
__global__ void __launch_bounds__(W * 32, MINB)
attend_bwd_kv(const T* __restrict__ q, const long long* __restrict__ qpos, const T* __restrict__ k,
              const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
              const float* __restrict__ delta, TO* __restrict__ dk, TO* __restrict__ dv,
              const long long* __restrict__ mask_words, const int* __restrict__ unsorted, int nq, int nk, int G,
              long long k0, float scale, long long q0, BWD_STRIDES) {
    constexpr int BN = 16 * W, LD = D + 8, NT = W * 32, TILE = BM * LD;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* QO = reinterpret_cast<T*>(smem_raw);  // stage s: Q at QO + 2s TILE, dO at QO + (2s + 1) TILE
    T* Ks = QO + 4 * TILE;
    T* Vs = Ks + BN * LD;
    float* Ls = reinterpret_cast<float*>(Vs + BN * LD);  // stage s at Ls + s BM; delta likewise
    float* Dls = Ls + 2 * BM;
    long long* Ps = reinterpret_cast<long long*>(Dls + 2 * BM);
    __shared__ MaskDev mk;
    __shared__ int nr_s, tlo_s[HPCATTN_MAX_SPANS], thi_s[HPCATTN_MAX_SPANS];

    const Strides qs{qbs, qhs, qrs}, ks{kbs, khs, krs};
    const int hk = blockIdx.y, kc0 = blockIdx.x * BN, kc1 = min(nk, kc0 + BN);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const size_t krow0 = ks.head(hk, H / G) + (size_t)kc0 * krs;  // the block's first key row
    load_tile<T, D, LD>(k + krow0, krs, kc1 - kc0, BN, Ks, tid, NT);
    load_tile<T, D, LD>(v + krow0, krs, kc1 - kc0, BN, Vs, tid, NT);
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
            load_tile<T, D, LD>(q + qrow0, qrs, rows, BM, QO + 2 * s * TILE, tid, NT);
            load_tile<T, D, LD>(dout + qrow0, qrs, rows, BM, QO + (2 * s + 1) * TILE, tid, NT);
            load_stats<NT>(lse, delta, qpos, hq, nq, r0, rows, Ls + s * BM, Dls + s * BM, Ps + s * BM, tid);
            next_item(fg, fr, ft, nr, tlo_s, thi_s);
        }
        cp_commit();
    };
    fetch(0);
    cp_wait<1>();  // K and V
    __syncthreads();

    const T* Kw = Ks + (warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8;  // this lane's ldmatrix rows
    const T* Vw = Vs + (warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8;
    unsigned kf[1][KREG ? D / 16 : 1][4], vf[1][KREG ? D / 16 : 1][4];
    if (KREG) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            ldsm4(kf[0][KREG ? kk : 0], Kw + kk * 16);
            ldsm4(vf[0][KREG ? kk : 0], Vw + kk * 16);
        }
    }
    float dka[1][D / 8][4], dva[1][D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[0][j][e] = dva[0][j][e] = 0.f;
    const int kw0 = kc0 + warp * 16;  // this warp's first key row
    const bool live[1][2] = {{kw0 + g < kc1, kw0 + g + 8 < kc1}};
    const long long jpos[1][2] = {{k0 + kw0 + g, k0 + kw0 + g + 8}};
    const bool warp_live = kw0 < kc1;
    const float sl2 = scale * MLOG2E;

    for (int buf = 0, cg = g_first, cr = 0, ct = t_first; cg < G; buf ^= 1) {
        fetch(buf ^ 1);
        cp_wait<1>();
        __syncthreads();
        const T* Qb = QO + 2 * buf * TILE;
        const T* Ob = Qb + TILE;
        const float* Lb = Ls + buf * BM;
        const long long* Pb = Ps + buf * BM;
        const int rows = min(BM, nq - ct * BM);
        if (warp_live) {
            const TileRows tr = tile_rows(qpos != nullptr, Pb, q0 + (long long)ct * BM, rows, lane);
            float s[1][MK / 8][4], dp[1][MK / 8][4];
            tile_scores<T, D, 1, KREG, LD>(s, kf, Kw, Qb, lane);
            tile_scores<T, D, 1, KREG, LD>(dp, vf, Vw, Ob, lane);
            kv_tile_mask(s, mk, tr, Pb, rows, k0 + kw0, k0 + min(kw0 + 16, kc1), live, jpos, tq);
            float L[MK / 8][2], dl[MK / 8][2];
            column_stats(Lb, Dls + buf * BM, rows, tq, L, dl);
            unsigned pa[1][MK / 16][4], da[1][MK / 16][4];
            probabilities<T, true>(s[0], dp[0], sl2, nullptr, nullptr, L, dl, pa[0], da[0]);
            pv_accumulate<T, D, 1, LD>(dva, pa, Ob, lane);  // dV += P^T dO
            pv_accumulate<T, D, 1, LD>(dka, da, Qb, lane);  // dK += dS^T Q
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
        next_item(cg, cr, ct, nr, tlo_s, thi_s);
    }
    cp_wait<0>();
    if (warp_live) {
        const size_t base = krow0 + (size_t)warp * 16 * krs;
        put_rows<D, TO>(dk + base, krs, dka[0], live[0], scale, g, tq);
        put_rows<D, TO>(dv + base, krs, dva[0], live[0], 1.f, g, tq);
    }
}

// Shape: W warps of 16 query rows each; QREG: the q and dO fragments stay in registers (else
// re-read from shared memory every tile); ST K/V tile buffers as in the forward.
template <typename T, int D, typename TO, int W, bool QREG, int ST, int MINB>
__global__ void __launch_bounds__(W * 32, MINB)
attend_bwd_q(const T* __restrict__ q, const long long* __restrict__ qpos, const T* __restrict__ k,
             const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
             const float* __restrict__ delta, TO* __restrict__ dq, unsigned long long* __restrict__ edges,
             const long long* __restrict__ mask_words, int nq, int nk, int G, long long k0, float scale,
             long long q0, BWD_STRIDES) {
    constexpr int BR = 16 * W, LD = D + 8, NT = W * 32, TILE = MK * LD;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* KV = reinterpret_cast<T*>(smem_raw);  // buffer b: K at KV + 2b TILE, V at KV + (2b + 1) TILE
    T* Qs = KV + 2 * ST * TILE;              // BR x LD, then dO
    T* Os = Qs + BR * LD;
    __shared__ MaskDev mk;
    __shared__ long long qlo_s, qhi_s, lo_s[HPCATTN_MAX_SPANS], hi_s[HPCATTN_MAX_SPANS];
    __shared__ int nsp_s;
    __shared__ unsigned long long edges_s;

    const Strides qs{qbs, qhs, qrs}, ks{kbs, khs, krs};
    const int head = blockIdx.y, kvh = head / G;
    const int t0 = blockIdx.x * BR, t1 = min(nq, t0 + BR);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const T* kh = k + ks.head(kvh, H / G);
    const T* vh = v + ks.head(kvh, H / G);
    const size_t qrow0 = qs.head(head, H) + (size_t)t0 * qrs;
    load_tile<T, D, LD>(q + qrow0, qrs, t1 - t0, BR, Qs, tid, NT);
    load_tile<T, D, LD>(dout + qrow0, qrs, t1 - t0, BR, Os, tid, NT);
    cp_commit();
    if (warp == 0) {
        row_block_spans(mask_words, mk, qpos, q0, t0, t1, k0, nk, lane, qlo_s, qhi_s, lo_s, hi_s, nsp_s);
        if (lane == 0) edges_s = 0ull;
    }
    __syncthreads();
    const int nsp = nsp_s;
    const long long qlo = qlo_s, qhi = qhi_s;
    int sp = 0, fsp = 0;
    long long c0 = nsp ? lo_s[0] : 0, fc0 = c0;
#pragma unroll
    for (int b = 0; b < ST - 1; ++b) {
        if (fsp < nsp) {
            const int n = (int)min((long long)MK, hi_s[fsp] - fc0);
            load_tile<T, D, LD>(kh + (size_t)(fc0 - k0) * krs, krs, n, MK, KV + 2 * b * TILE, tid, NT);
            load_tile<T, D, LD>(vh + (size_t)(fc0 - k0) * krs, krs, n, MK, KV + (2 * b + 1) * TILE, tid, NT);
            next_tile(fsp, fc0, nsp, lo_s, hi_s);
        }
        cp_commit();
    }

    bool live[1][2];
    long long pos[1][2];
    float Lr[2], dr[2], dqa[1][D / 8][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = t0 + warp * 16 + g + 8 * h;
        live[0][h] = r < t1;
        pos[0][h] = r >= t1 ? 0 : qpos ? qpos[r] : q0 + r;
        const float x = r < t1 ? lse[(size_t)head * nq + r] : -INFINITY;
        Lr[h] = x == -INFINITY ? INFINITY : x * MLOG2E;
        dr[h] = r < t1 ? delta[(size_t)head * nq + r] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) dqa[0][j][0] = dqa[0][j][1] = dqa[0][j][2] = dqa[0][j][3] = 0.f;
    const float sl2 = scale * MLOG2E;
    unsigned long long n_edges = 0;
    const T* Qw = Qs + (warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8;
    const T* Ow = Os + (warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8;
    unsigned qa[1][QREG ? D / 16 : 1][4], oa[1][QREG ? D / 16 : 1][4];
    cp_wait<ST - 1>();  // the q and dO rows
    __syncthreads();
    if (QREG) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            ldsm4(qa[0][QREG ? kk : 0], Qw + kk * 16);
            ldsm4(oa[0][QREG ? kk : 0], Ow + kk * 16);
        }
    }
    const float dummy[MK / 8][2] = {};

    int buf = 0;
    while (sp < nsp) {
        const int nkt = (int)min((long long)MK, hi_s[sp] - c0);
        if (fsp < nsp) {
            const int n = (int)min((long long)MK, hi_s[fsp] - fc0), fb = buf == 0 ? ST - 1 : buf - 1;
            load_tile<T, D, LD>(kh + (size_t)(fc0 - k0) * krs, krs, n, MK, KV + 2 * fb * TILE, tid, NT);
            load_tile<T, D, LD>(vh + (size_t)(fc0 - k0) * krs, krs, n, MK, KV + (2 * fb + 1) * TILE, tid, NT);
            next_tile(fsp, fc0, nsp, lo_s, hi_s);
        }
        cp_commit();
        cp_wait<ST - 1>();
        __syncthreads();
        const T* Kb = KV + 2 * buf * TILE;
        const T* Vb = Kb + TILE;
        float s[1][MK / 8][4], dp[1][MK / 8][4];
        tile_scores<T, D, 1, QREG, LD>(s, qa, Qw, Kb, lane);
        tile_scores<T, D, 1, QREG, LD>(dp, oa, Ow, Vb, lane);
        const bool full = nkt == MK && mask_tile_full(mk, qlo, qhi, c0, c0 + MK);
        mask_scores<1>(s, mk, live, pos, c0, nkt, full, tq, n_edges);
        unsigned pa[1][MK / 16][4], da[1][MK / 16][4];
        probabilities<T, false>(s[0], dp[0], sl2, Lr, dr, dummy, dummy, pa[0], da[0]);
        pv_accumulate<T, D, 1, LD>(dqa, da, Kb, lane);  // dQ += dS K
        __syncthreads();
        buf = buf + 1 == ST ? 0 : buf + 1;
        next_tile(sp, c0, nsp, lo_s, hi_s);
    }
    cp_wait<0>();
    put_rows<D, TO>(dq + qrow0 + (size_t)warp * 16 * qrs, qrs, dqa[0], live[0], scale, g, tq);

#pragma unroll
    for (int s = 16; s > 0; s >>= 1) n_edges += __shfl_xor_sync(0xffffffffu, n_edges, s);
    if (lane == 0 && n_edges) atomicAdd(&edges_s, n_edges);
    __syncthreads();
    if (tid == 0 && head == 0 && edges_s) atomicAdd(edges, edges_s);
}
