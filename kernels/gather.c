/* hpcattn's gather kernel: attention of query rows over their listed keys (a CSR edge list),
 * float32 in and out; and its band kernel (hpcattn_band, at the end): query rows over
 * contiguous key ranges (the `window` piece), same maths, blocks of 16 rows at once. Plain C,
 * no Python.h: built by setup.py into the package as hpcattn/cpu/_gather*.so and called
 * through ctypes (hpcattn/cpu/cgather.py), which releases the GIL, so the kernel's row-chunk
 * threads (local.attend) run it in parallel.
 *
 * Layout: q (BH, G, n, D), k and v (BH, nk, D), o (BH, G, n, D), lse (BH, G, n), all
 * contiguous; indptr (n + 1) int64 and cols (nnz) int64: the edges of row r are
 * cols[indptr[r] .. indptr[r + 1]), local key indices. The caller guarantees every index is in
 * [0, nk) (hpcattn/masks.py: check_csr validates explicit edges when they are read, and
 * Mask.columns returns only columns of [k0, k1), which local._gather shifts by k0); nothing is
 * checked here (order within a row does not matter). Rows without edges give o = 0,
 * lse = -inf; the G query heads of a row share its K and V rows.
 *
 * Variants, chosen at run time (never -march=native):
 * - avx512 (D a multiple of 16, at most 256): one row at a time, whole rows (blocking keys so
 *   that K and V stay in L2 measured no faster at 1% density: a row's edges in one key block
 *   are too few), scores 16 edges at a time (16 dot products in 16 registers reduced together
 *   by a transpose-add tree), the exact row max, one vectorised exp per 16 edges, V rows
 *   accumulated with FMAs; K and V rows prefetched 32 rows ahead of use in the order they are
 *   read, across phase and row ends (a cursor over the edge list). Fastest with K and V on
 *   64-byte boundaries (4 cache lines per 256-byte row, not 5): local.attend sees to it.
 * - avx2 (D a multiple of 8, at most 256): the AVX-512 designs in 8 lanes (gather: 8 edges at
 *   a time; band: a block's 16 rows as two halves of 8). The band does per row the AVX-512
 *   band's operations in the same order, so the two give the same bits.
 * - generic, and avx2 for other D: the same maths as plain C loops over one row at a time
 *   (scores, exact row max, exp, weighted V rows), compiled for AVX2 + FMA and for baseline
 *   x86-64 (or any other architecture), so every D works everywhere.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) \
    && !defined(HPCATTN_GENERIC_ONLY)  /* -DHPCATTN_GENERIC_ONLY: what other CPUs build */
#define HPCATTN_X86 1
#include <immintrin.h>
#endif

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

enum { GENERIC = 1, AVX2 = 2, AVX512 = 3 };

/* ---------------------------------------------------------------- portable variant */

/* One query row qr (into acc, lse[row0 + r]) over its cnt keys, key e at row COL_E of K and V
 * (an expression in e): scores, exact row maximum, exp, weighted V rows; no keys: o = 0,
 * lse = -inf. Shared by the gather's and the band's portable variants (the enclosing loops'
 * `continue` moves to the next row). */
#define PORTABLE_ROW(COL_E)                                                                         \
    for (int64_t d = 0; d < D; d++)                                                                 \
        acc[d] = 0.0f;                                                                              \
    if (cnt <= 0) {                                                                                 \
        lse[row0 + r] = -INFINITY;                                                                  \
        continue;                                                                                   \
    }                                                                                               \
    float m = -INFINITY;                                                                            \
    for (int64_t e = 0; e < cnt; e++) {                                                             \
        const float *kr = K + (size_t)(COL_E) * D;                                                  \
        float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                      \
        int64_t d = 0;                                                                              \
        for (; d + 8 <= D; d += 8)                                                                  \
            for (int j = 0; j < 8; j++)                                                             \
                t[j] += qr[d + j] * kr[d + j];                                                      \
        for (; d < D; d++)                                                                          \
            t[0] += qr[d] * kr[d];                                                                  \
        float s = (((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7])))               \
                  * scale;                                                                          \
        sc[e] = s;                                                                                  \
        m = s > m ? s : m;                                                                          \
    }                                                                                               \
    float l = 0.0f;                                                                                 \
    for (int64_t e = 0; e < cnt; e++) {                                                             \
        float p = expf(sc[e] - m);                                                                  \
        const float *vr = V + (size_t)(COL_E) * D;                                                  \
        l += p;                                                                                     \
        for (int64_t d = 0; d < D; d++)                                                             \
            acc[d] += p * vr[d];                                                                    \
    }                                                                                               \
    float inv = 1.0f / l;                                                                           \
    for (int64_t d = 0; d < D; d++)                                                                 \
        acc[d] *= inv;                                                                              \
    lse[row0 + r] = m + logf(l);

#define PORTABLE_BODY                                                                           \
    for (int64_t b = 0; b < bh; b++) {                                                          \
        const float *K = k + (size_t)b * nk * D, *V = v + (size_t)b * nk * D;                   \
        for (int64_t gi = 0; gi < g; gi++) {                                                    \
            size_t row0 = ((size_t)b * g + gi) * n;                                             \
            for (int64_t r = 0; r < n; r++) {                                                   \
                const float *qr = q + (row0 + r) * D;                                           \
                float *acc = o + (row0 + r) * D;                                                \
                int64_t e0 = indptr[r], cnt = indptr[r + 1] - e0;                               \
                const int64_t *c = cols + e0;                                                  \
                PORTABLE_ROW(c[e])                                                              \
            }                                                                                   \
        }                                                                                       \
    }

static void gather_generic(const float *q, const float *k, const float *v, const int64_t *indptr,
                           const int64_t *cols, int64_t bh, int64_t g, int64_t n, int64_t nk,
                           int64_t D, float scale, float *sc, float *o, float *lse)
{
    PORTABLE_BODY
}

/* ---------------------------------------------------------------- band kernel, portable */

/* One query row over its contiguous keys [lo, hi) (hi > lo): the same maths as the gather's
 * portable rows (scores, exact row max, exp, weighted V rows), keys read in place. */
#define BAND_PORTABLE_BODY                                                                      \
    for (int64_t b = 0; b < bh; b++) {                                                          \
        const float *K = k + (size_t)b * ldk, *V = v + (size_t)b * ldk;                         \
        for (int64_t gi = 0; gi < g; gi++) {                                                    \
            size_t row0 = ((size_t)b * g + gi) * n;                                             \
            for (int64_t r = 0; r < n; r++) {                                                   \
                const float *qr = q + (row0 + r) * D;                                           \
                float *acc = o + (row0 + r) * D;                                                \
                int64_t a = lo[r], cnt = hi[r] - a;                                             \
                PORTABLE_ROW(a + e)                                                             \
            }                                                                                   \
        }                                                                                       \
    }

#define BAND_ARGS const float *q, const float *k, const float *v, const int64_t *lo,             \
                  const int64_t *hi, int64_t bh, int64_t g, int64_t n, int64_t D, int64_t ldk,  \
                  float scale, float *sc, float *o, float *lse

static void band_generic(BAND_ARGS)
{
    BAND_PORTABLE_BODY
}

#ifdef HPCATTN_X86
__attribute__((target("avx2,fma")))
static void band_avx2_rows(BAND_ARGS)
{
    BAND_PORTABLE_BODY
}
#endif

#ifdef HPCATTN_X86
__attribute__((target("avx2,fma")))
static void gather_avx2_rows(const float *q, const float *k, const float *v, const int64_t *indptr,
                        const int64_t *cols, int64_t bh, int64_t g, int64_t n, int64_t nk,
                        int64_t D, float scale, float *sc, float *o, float *lse)
{
    PORTABLE_BODY
}

/* ---------------------------------------------------------------- AVX-512 variant */

#define UNROLL _Pragma("GCC unroll 16")
#define V512 static inline __attribute__((always_inline, target("avx512f,avx512dq,fma")))

/* Cephes expf in W-bit lanes (W = 512 or 256; ROUND the width's round-to-integer): range
 * reduction by ln 2 and a degree-6 polynomial, leaving exp(x) = p * 2^n, n an integer in
 * [-126, 127]; about 1 ulp. Inputs below -87 give about 0 (callers zero masked lanes
 * themselves). One text for both widths, so the AVX-512 and AVX2 kernels do the same
 * operations in the same order. */
#define EXP_POLY(W, ROUND, x, n, p)                                                             \
    x = _mm##W##_max_ps(x, _mm##W##_set1_ps(-87.0f));                                            \
    x = _mm##W##_min_ps(x, _mm##W##_set1_ps(88.0f));                                             \
    __m##W n = ROUND(_mm##W##_mul_ps(x, _mm##W##_set1_ps(1.44269504088896341f)),                 \
                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                             \
    __m##W r = _mm##W##_fnmadd_ps(n, _mm##W##_set1_ps(0.693359375f), x);                         \
    r = _mm##W##_fnmadd_ps(n, _mm##W##_set1_ps(-2.12194440e-4f), r);                            \
    __m##W p = _mm##W##_set1_ps(1.9875691500e-4f);                                               \
    p = _mm##W##_fmadd_ps(p, r, _mm##W##_set1_ps(1.3981999507e-3f));                             \
    p = _mm##W##_fmadd_ps(p, r, _mm##W##_set1_ps(8.3334519073e-3f));                             \
    p = _mm##W##_fmadd_ps(p, r, _mm##W##_set1_ps(4.1665795894e-2f));                             \
    p = _mm##W##_fmadd_ps(p, r, _mm##W##_set1_ps(1.6666665459e-1f));                             \
    p = _mm##W##_fmadd_ps(p, r, _mm##W##_set1_ps(5.0000001201e-1f));                             \
    p = _mm##W##_fmadd_ps(p, _mm##W##_mul_ps(r, r), _mm##W##_add_ps(r, _mm##W##_set1_ps(1.0f)));

/* exp of 16 lanes, 2^n applied by scalef. */
V512 __m512 exp16(__m512 x)
{
    EXP_POLY(512, _mm512_roundscale_ps, x, n, p)
    return _mm512_scalef_ps(p, n);
}

/* r[j] = sum of the 16 lanes of a[j], j = 0..15 (a transpose-add tree: 15 adds). */
V512 __m512 sum16(const __m512 *a)
{
    __m512 b[8], c[4];
    UNROLL
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    UNROLL
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
    __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xdd));
}

/* The K and V rows the kernel reads, in the order it reads them: row r's K rows (its edges in
 * order), then its V rows, then row r + 1's K rows, and so on. A cursor in that stream runs
 * AHEAD rows ahead of the reads and prefetches each row it passes, so the prefetch distance
 * stays the same across the end of a phase and of a query row (a prefetch that restarted at
 * each row left the first K and V rows of every row to wait on L3: 11-16% slower, measured). */
enum { AHEAD = 32 };

typedef struct {
    const int64_t *indptr, *cols;
    const float *K, *V;
    int64_t n, r, e;  /* query rows; the cursor's row and edge */
    int v;            /* 0: in row r's K rows, 1: in its V rows */
} Cursor;

/* Prefetch the row (D floats) at the cursor and step past it (nothing once past the last query
 * row). Shared by the AVX-512 and AVX2 gathers; a constant D unrolls the loop over its lines. */
static inline __attribute__((always_inline)) void prefetch_next(Cursor *p, const size_t D)
{
    if (p->r >= p->n)
        return;
    while (p->e >= p->indptr[p->r + 1]) {  /* end of a phase (or an empty row) */
        if (!p->v) {
            p->v = 1;
        } else {
            p->v = 0;
            if (++p->r >= p->n)
                return;
        }
        p->e = p->indptr[p->r];
    }
    const float *row = (p->v ? p->V : p->K) + (size_t)p->cols[p->e++] * D;
    UNROLL
    for (size_t u = 0; u < (D + 15) / 16; u++)
        _mm_prefetch((const char *)(row + 16 * u), _MM_HINT_T0);
}

/* One query row over its edges c[0 .. cnt) (cnt >= 1): o row (normalised) and lse. Three
 * phases, none with a dependency from one group of 16 edges to the next, so the loads of many
 * edges are in flight at once: scores 16 at a time (16 dot products in 16 registers, reduced
 * together) and their max; exp; the weighted V rows into two sets of accumulators. Each K or V
 * row read steps the prefetch cursor pc once (NULL: no prefetching, for the 2nd.. query heads
 * of a row, whose K and V rows the first left in cache). buf: scratch of cnt rounded up to 16. */
V512 void row512(const float *qr, const float *K, const float *V, const int64_t *c, int64_t cnt,
                 const int NV, __m512 scale, float *buf, float *out, float *lse, Cursor *pc)
{
    const size_t D = (size_t)NV * 16;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 qv[16], vmax = ninf;
    UNROLL
    for (int u = 0; u < NV; u++)
        qv[u] = _mm512_loadu_ps(qr + 16 * u);
    for (int64_t j0 = 0; j0 < cnt; j0 += 16) {
        int t = cnt - j0 < 16 ? (int)(cnt - j0) : 16;
        if (pc)
            for (int e = 0; e < t; e++)
                prefetch_next(pc, D);
        const float *kr[16];
        UNROLL
        for (int j = 0; j < 16; j++)  /* a short last group repeats its first edge */
            kr[j] = K + (size_t)c[j0 + (j < t ? j : 0)] * D;
        __m512 s[16];
        UNROLL
        for (int j = 0; j < 16; j++)
            s[j] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr[j]));
        UNROLL
        for (int u = 1; u < NV; u++)
            UNROLL
            for (int j = 0; j < 16; j++)
                s[j] = _mm512_fmadd_ps(qv[u], _mm512_loadu_ps(kr[j] + 16 * u), s[j]);
        __m512 sc = _mm512_mul_ps(sum16(s), scale);
        if (t < 16)
            sc = _mm512_mask_blend_ps((__mmask16)((1u << t) - 1), ninf, sc);
        vmax = _mm512_max_ps(vmax, sc);
        _mm512_store_ps(buf + j0, sc);
    }
    const float m = _mm512_reduce_max_ps(vmax);
    const __m512 vm = _mm512_set1_ps(m);
    __m512 lsum = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < cnt; j0 += 16) {
        __m512 p = exp16(_mm512_sub_ps(_mm512_load_ps(buf + j0), vm));
        if (cnt - j0 < 16)
            p = _mm512_maskz_mov_ps((__mmask16)((1u << (cnt - j0)) - 1), p);
        lsum = _mm512_add_ps(lsum, p);
        _mm512_store_ps(buf + j0, p);
    }
    __m512 a0[16], a1[16];
    UNROLL
    for (int u = 0; u < NV; u++)
        a0[u] = a1[u] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 1 < cnt; j += 2) {  /* even edges into a0, odd ones into a1 */
        if (pc) {
            prefetch_next(pc, D);
            prefetch_next(pc, D);
        }
        const float *v0 = V + (size_t)c[j] * D, *v1 = V + (size_t)c[j + 1] * D;
        __m512 p0 = _mm512_set1_ps(buf[j]), p1 = _mm512_set1_ps(buf[j + 1]);
        UNROLL
        for (int u = 0; u < NV; u++) {
            a0[u] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * u), a0[u]);
            a1[u] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1 + 16 * u), a1[u]);
        }
    }
    if (j < cnt) {
        const float *v0 = V + (size_t)c[j] * D;
        __m512 p0 = _mm512_set1_ps(buf[j]);
        if (pc)
            prefetch_next(pc, D);
        UNROLL
        for (int u = 0; u < NV; u++)
            a0[u] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * u), a0[u]);
    }
    float l = _mm512_reduce_add_ps(lsum);  /* >= 1: the max's own term is exp(0) */
    __m512 inv = _mm512_set1_ps(1.0f / l);
    UNROLL
    for (int u = 0; u < NV; u++)
        _mm512_storeu_ps(out + 16 * u, _mm512_mul_ps(_mm512_add_ps(a0[u], a1[u]), inv));
    *lse = m + logf(l);
}

/* Every row, one after another (the G query heads of a row together: they share K/V rows). */
V512 void rows512(const float *q, const float *k, const float *v, const int64_t *indptr,
                  const int64_t *cols, int64_t bh, int64_t g, int64_t n, int64_t nk,
                  const int NV, float scale, float *buf, float *o, float *lse)
{
    const size_t D = (size_t)NV * 16;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t b = 0; b < bh; b++) {
        const float *K = k + (size_t)b * nk * D, *V = v + (size_t)b * nk * D;
        Cursor pc = {indptr, cols, K, V, n, 0, indptr[0], 0};
        for (int a = 0; a < AHEAD; a++)
            prefetch_next(&pc, D);
        for (int64_t r = 0; r < n; r++) {
            int64_t e0 = indptr[r], cnt = indptr[r + 1] - e0;
            for (int64_t gi = 0; gi < g; gi++) {
                size_t row = ((size_t)b * g + gi) * n + r;
                if (cnt == 0) {
                    for (size_t d = 0; d < D; d++)
                        o[row * D + d] = 0.0f;
                    lse[row] = -INFINITY;
                } else {
                    row512(q + row * D, K, V, cols + e0, cnt, NV, vscale, buf, o + row * D, lse + row,
                           gi == 0 ? &pc : NULL);
                }
            }
        }
    }
}

#define CASE(NV_)                                                                               \
    case NV_:                                                                                  \
        rows512(q, k, v, indptr, cols, bh, g, n, nk, NV_, scale, buf, o, lse);                 \
        break;

__attribute__((target("avx512f,avx512dq,fma")))
static void gather_avx512(const float *q, const float *k, const float *v, const int64_t *indptr,
                          const int64_t *cols, int64_t bh, int64_t g, int64_t n, int64_t nk,
                          int64_t D, float scale, float *buf, float *o, float *lse)
{
    switch (D / 16) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
        CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
    }
}

/* ---------------------------------------------------------------- band kernel, AVX-512 */

/* Rows in the block that starts at r0: up to 16, while the union of their key ranges spans at
 * most `limit` keys (consecutive window rows: all 16; scattered rows: fewer, so a block never
 * computes far more scores than its edges). */
static int64_t band_rows16(const int64_t *lo, const int64_t *hi, int64_t r0, int64_t n,
                           int64_t limit)
{
    int64_t kb = INT64_MAX, ke = INT64_MIN, r = r0;
    for (; r < n && r < r0 + 16; r++) {
        if (hi[r] <= lo[r])
            continue;
        int64_t b = lo[r] < kb ? lo[r] : kb, e = hi[r] > ke ? hi[r] : ke;
        if (e - b > limit && r > r0)
            break;
        kb = b;
        ke = e;
    }
    return r - r0;
}

/* The set-up of a band block of nr <= 16 rows, shared by the AVX-512 and AVX2 loops: returns
 * the number L of keys in the union [*kb, *kb + L) of the rows' ranges (0: no row has an edge,
 * and their o = 0, lse = -inf are written); each lane's range relative to *kb in lo32, hi32
 * (lanes past nr and empty rows: none); the rows of q transposed into qt (D x 16), scale folded
 * in. */
static inline __attribute__((always_inline)) int64_t
band_setup(const float *qb, int64_t nr, const int64_t *lo, const int64_t *hi, int64_t D,
           float scale, float *qt, int64_t *kb, int32_t *lo32, int32_t *hi32, float *out,
           float *lse)
{
    int64_t b = INT64_MAX, e = INT64_MIN;
    for (int64_t r = 0; r < nr; r++)
        if (hi[r] > lo[r]) {
            b = lo[r] < b ? lo[r] : b;
            e = hi[r] > e ? hi[r] : e;
        }
    if (b >= e) {
        for (int64_t r = 0; r < nr; r++) {
            for (int64_t d = 0; d < D; d++)
                out[r * D + d] = 0.0f;
            lse[r] = -INFINITY;
        }
        return 0;
    }
    for (int r = 0; r < 16; r++) {
        int ok = r < nr && hi[r] > lo[r];
        lo32[r] = ok ? (int32_t)(lo[r] - b) : 0;
        hi32[r] = ok ? (int32_t)(hi[r] - b) : 0;
    }
    for (int64_t d = 0; d < D; d++)
        for (int r = 0; r < 16; r++)
            qt[d * 16 + r] = r < nr ? qb[r * D + d] * scale : 0.0f;
    *kb = b;
    return e - b;
}

/* Every block of rows (band_rows16) over its own keys, read in place; the G heads of a block
 * share its K and V. DD: the head dim; BLOCK: the width's block kernel, taking WIDTH for it.
 * Shared by the AVX-512 and AVX2 loops (a BAND_ARGS function with `limit`). */
#define BAND_BLOCKS(DD, BLOCK, WIDTH)                                                          \
    float *qt = sc, *ot = sc + 16 * (DD); /* 16 x D each; then the block's scores */           \
    for (int64_t b = 0; b < bh; b++) {                                                         \
        const float *K = k + (size_t)b * ldk, *V = v + (size_t)b * ldk;                        \
        for (int64_t r0 = 0, nr; r0 < n; r0 += nr) {                                           \
            nr = band_rows16(lo, hi, r0, n, limit);                                            \
            for (int64_t gi = 0; gi < g; gi++) {                                               \
                size_t row = ((size_t)b * g + gi) * n + r0;                                    \
                BLOCK(q + row * (DD), nr, K, V, lo + r0, hi + r0, WIDTH, scale, qt,            \
                      ot + 16 * (DD), ot, o + row * (DD), lse + row);                          \
            }                                                                                  \
        }                                                                                      \
    }

/* Blocks of 16 consecutive query rows, one row per lane, over the union of their key ranges
 * (for a window: 16 + 2W keys, of which 2W + 1 per row are edges). Nothing is packed but the
 * block's 16 query rows (transposed, scale folded in): both products broadcast the other
 * operand straight from K's or V's rows, so each FMA does 16 rows at once.
 * - scores: 16 keys at a time, 16 accumulators (one per key, lanes = rows), D FMAs each;
 *   stored keys-major (L x 16) with the running row max of the unmasked lanes;
 * - exp(s - m) with the exact row max m, masked lanes zeroed, row sums lane-wise;
 * - O^T: 16 dims at a time, 16 accumulators (one per dim, lanes = rows) over the block's keys.
 * Every element of a row is computed the same way whatever block the row is in (a masked key
 * adds an exact 0), so results do not depend on the row chunking. */
V512 void band_block512(const float *qb, int64_t nr, const float *K, const float *V,
                        const int64_t *lo, const int64_t *hi, const int NV, float scale,
                        float *qt, float *pt, float *ot, float *out, float *lse)
{
    const int64_t D = (int64_t)NV * 16;
    int64_t kb;
    int32_t lo32[16], hi32[16];
    const int64_t L = band_setup(qb, nr, lo, hi, D, scale, qt, &kb, lo32, hi32, out, lse);
    if (L == 0)
        return;
    const __m512i vlo = _mm512_loadu_si512(lo32), vhi = _mm512_loadu_si512(hi32);
    const float *Kb = K + (size_t)kb * D, *Vb = V + (size_t)kb * D;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < L; j0 += 16) {
        const float *kr = Kb + (size_t)j0 * D;
        if (L - j0 < 16) {  /* a short last group: its keys copied, the rest zero */
            float *tmp = ot;
            for (int64_t i = 0; i < 16 * D; i++)
                tmp[i] = i < (L - j0) * D ? kr[i] : 0.0f;
            kr = tmp;
        }
        __m512 s[16];
        UNROLL
        for (int j = 0; j < 16; j++)
            s[j] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d++) {
            __m512 qv = _mm512_load_ps(qt + d * 16);
            UNROLL
            for (int j = 0; j < 16; j++)
                s[j] = _mm512_fmadd_ps(_mm512_set1_ps(kr[j * D + d]), qv, s[j]);
        }
        UNROLL
        for (int j = 0; j < 16; j++) {
            __m512i jv = _mm512_set1_epi32((int32_t)(j0 + j));
            __mmask16 ok = _mm512_cmpge_epi32_mask(jv, vlo) & _mm512_cmplt_epi32_mask(jv, vhi);
            vmax = _mm512_mask_max_ps(vmax, ok, vmax, s[j]);
            _mm512_store_ps(pt + (j0 + j) * 16, s[j]);
        }
    }
    __m512 lsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j++) {
        __m512i jv = _mm512_set1_epi32((int32_t)j);
        __mmask16 ok = _mm512_cmpge_epi32_mask(jv, vlo) & _mm512_cmplt_epi32_mask(jv, vhi);
        __m512 p = _mm512_maskz_mov_ps(ok, exp16(_mm512_sub_ps(_mm512_load_ps(pt + j * 16), vmax)));
        lsum = _mm512_add_ps(lsum, p);
        _mm512_store_ps(pt + j * 16, p);
    }
    /* 1 / l, 0 for rows without keys (their o is 0) */
    __mmask16 has = _mm512_cmp_ps_mask(lsum, _mm512_setzero_ps(), _CMP_GT_OQ);
    __m512 inv = _mm512_maskz_div_ps(has, _mm512_set1_ps(1.0f), lsum);
    for (int t = 0; t < NV; t++) {
        __m512 a[16];
        UNROLL
        for (int i = 0; i < 16; i++)
            a[i] = _mm512_setzero_ps();
        const float *vr = Vb + 16 * t;
        for (int64_t j = 0; j < L; j++, vr += D) {
            __m512 p = _mm512_load_ps(pt + j * 16);
            UNROLL
            for (int i = 0; i < 16; i++)
                a[i] = _mm512_fmadd_ps(_mm512_set1_ps(vr[i]), p, a[i]);
        }
        UNROLL
        for (int i = 0; i < 16; i++)
            _mm512_store_ps(ot + i * 16, _mm512_mul_ps(a[i], inv));
        for (int64_t r = 0; r < nr; r++)
            for (int i = 0; i < 16; i++)
                out[r * D + 16 * t + i] = ot[i * 16 + r];
    }
    float m[16], l[16];
    _mm512_storeu_ps(m, vmax);
    _mm512_storeu_ps(l, lsum);
    for (int64_t r = 0; r < nr; r++)
        lse[r] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
}

V512 void band512(BAND_ARGS, int64_t limit, const int NV)
{
    const int64_t D16 = (int64_t)NV * 16;
    (void)D;
    BAND_BLOCKS(D16, band_block512, NV)
}

#define BCASE(NV_)                                                                              \
    case NV_:                                                                                  \
        band512(q, k, v, lo, hi, bh, g, n, D, ldk, scale, sc, o, lse, limit, NV_);                    \
        break;

__attribute__((target("avx512f,avx512dq,fma")))
static void band_avx512(BAND_ARGS, int64_t limit)
{
    switch (D / 16) {
        BCASE(1) BCASE(2) BCASE(3) BCASE(4) BCASE(5) BCASE(6) BCASE(7) BCASE(8)
        BCASE(9) BCASE(10) BCASE(11) BCASE(12) BCASE(13) BCASE(14) BCASE(15) BCASE(16)
    }
}

/* ---------------------------------------------------------------- AVX2 variant */

/* The AVX-512 designs in 8 lanes, for CPUs with AVX2 + FMA only (AMD before Zen 4, older
 * Intel): D a multiple of 8, up to 256; other D take the portable loops compiled for AVX2. */
#define V256 static inline __attribute__((always_inline, target("avx2,fma")))

/* exp16 in 8 lanes: 2^n built in the exponent field instead of scalef (n is an integer in
 * [-126, 127], so both round p * 2^n once): the band kernel gives the same bits with either. */
V256 __m256 exp8(__m256 x)
{
    EXP_POLY(256, _mm256_round_ps, x, n, p)
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* r[j] = sum of the 8 lanes of a[j], j = 0..7 (a transpose-add tree: 7 adds). */
V256 __m256 sum8(const __m256 *a)
{
    __m256 b[4], c[2];
    UNROLL
    for (int i = 0; i < 4; i++)
        b[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    UNROLL
    for (int i = 0; i < 2; i++) {
        __m256d x = _mm256_castps_pd(b[2 * i]), y = _mm256_castps_pd(b[2 * i + 1]);
        c[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                             _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31));
}

V256 float hsum8(__m256 a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

V256 float hmax8(__m256 a)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* Lanes 0 .. t-1 set (t in 0..8). */
V256 __m256 first_lanes(int t)
{
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(t),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

/* acc[u] += p * V row's dims d0 + 8u, u < W (W constant: W accumulators in registers). */
#define PV_ACC(W)                                                                               \
    do {                                                                                        \
        __m256 a[W];                                                                            \
        UNROLL                                                                                  \
        for (int u = 0; u < W; u++)                                                             \
            a[u] = _mm256_setzero_ps();                                                         \
        for (int64_t j = 0; j < cnt; j++) {                                                     \
            if (pc && d0 == 0)                                                                  \
                prefetch_next(pc, D);                                                           \
            const float *vr = V + (size_t)c[j] * D + d0;                                        \
            __m256 p = _mm256_broadcast_ss(buf + j);                                            \
            UNROLL                                                                              \
            for (int u = 0; u < W; u++)                                                         \
                a[u] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * u), a[u]);                   \
        }                                                                                       \
        UNROLL                                                                                  \
        for (int u = 0; u < W; u++)                                                             \
            _mm256_storeu_ps(out + d0 + 8 * u, _mm256_mul_ps(a[u], inv));                       \
    } while (0)

/* row512 in 8 lanes: scores 8 edges at a time (8 dot products reduced together), the exact
 * row max, one exp per 8 edges, then V rows weighted into 8 accumulators per 64 dims. */
V256 void row256(const float *qr, const float *K, const float *V, const int64_t *c, int64_t cnt,
                 const size_t D, float scale, float *buf, float *out, float *lse, Cursor *pc)
{
    const __m256 ninf = _mm256_set1_ps(-INFINITY), vscale = _mm256_set1_ps(scale);
    __m256 vmax = ninf;
    for (int64_t j0 = 0; j0 < cnt; j0 += 8) {
        int t = cnt - j0 < 8 ? (int)(cnt - j0) : 8;
        if (pc)
            for (int e = 0; e < t; e++)
                prefetch_next(pc, D);
        const float *kr[8];
        UNROLL
        for (int j = 0; j < 8; j++)  /* a short last group repeats its first edge */
            kr[j] = K + (size_t)c[j0 + (j < t ? j : 0)] * D;
        __m256 s[8];
        __m256 q0 = _mm256_loadu_ps(qr);
        UNROLL
        for (int j = 0; j < 8; j++)
            s[j] = _mm256_mul_ps(q0, _mm256_loadu_ps(kr[j]));
        for (size_t d = 8; d < D; d += 8) {
            __m256 qd = _mm256_loadu_ps(qr + d);
            UNROLL
            for (int j = 0; j < 8; j++)
                s[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kr[j] + d), s[j]);
        }
        __m256 sc = _mm256_mul_ps(sum8(s), vscale);
        if (t < 8)
            sc = _mm256_blendv_ps(ninf, sc, first_lanes(t));
        vmax = _mm256_max_ps(vmax, sc);
        _mm256_store_ps(buf + j0, sc);
    }
    const float m = hmax8(vmax);
    const __m256 vm = _mm256_set1_ps(m);
    __m256 lsum = _mm256_setzero_ps();
    for (int64_t j0 = 0; j0 < cnt; j0 += 8) {
        __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(buf + j0), vm));
        if (cnt - j0 < 8)
            p = _mm256_and_ps(p, first_lanes((int)(cnt - j0)));
        lsum = _mm256_add_ps(lsum, p);
        _mm256_store_ps(buf + j0, p);
    }
    float l = hsum8(lsum);  /* >= 1: the max's own term is exp(0) */
    const __m256 inv = _mm256_set1_ps(1.0f / l);
    for (size_t d0 = 0; d0 < D; d0 += 64) {
        switch ((D - d0) / 8) {
        case 1: PV_ACC(1); break;
        case 2: PV_ACC(2); break;
        case 3: PV_ACC(3); break;
        case 4: PV_ACC(4); break;
        case 5: PV_ACC(5); break;
        case 6: PV_ACC(6); break;
        case 7: PV_ACC(7); break;
        default: PV_ACC(8); break;
        }
    }
    *lse = m + logf(l);
}

/* Every row, one after another (rows512 in 8 lanes; a constant D unrolls the inner loops). */
V256 void rows256(const float *q, const float *k, const float *v, const int64_t *indptr,
                  const int64_t *cols, int64_t bh, int64_t g, int64_t n, int64_t nk,
                  const int64_t D, float scale, float *buf, float *o, float *lse)
{
    for (int64_t b = 0; b < bh; b++) {
        const float *K = k + (size_t)b * nk * D, *V = v + (size_t)b * nk * D;
        Cursor pc = {indptr, cols, K, V, n, 0, indptr[0], 0};
        for (int a = 0; a < AHEAD; a++)
            prefetch_next(&pc, (size_t)D);
        for (int64_t r = 0; r < n; r++) {
            int64_t e0 = indptr[r], cnt = indptr[r + 1] - e0;
            for (int64_t gi = 0; gi < g; gi++) {
                size_t row = ((size_t)b * g + gi) * n + r;
                if (cnt == 0) {
                    for (int64_t d = 0; d < D; d++)
                        o[row * D + d] = 0.0f;
                    lse[row] = -INFINITY;
                } else {
                    row256(q + row * D, K, V, cols + e0, cnt, (size_t)D, scale, buf, o + row * D,
                           lse + row, gi == 0 ? &pc : NULL);
                }
            }
        }
    }
}

__attribute__((target("avx2,fma")))
static void gather_avx2(const float *q, const float *k, const float *v, const int64_t *indptr,
                        const int64_t *cols, int64_t bh, int64_t g, int64_t n, int64_t nk,
                        int64_t D, float scale, float *buf, float *o, float *lse)
{
    if (D == 64)
        rows256(q, k, v, indptr, cols, bh, g, n, nk, 64, scale, buf, o, lse);
    else if (D == 128)
        rows256(q, k, v, indptr, cols, bh, g, n, nk, 128, scale, buf, o, lse);
    else
        rows256(q, k, v, indptr, cols, bh, g, n, nk, D, scale, buf, o, lse);
}

/* band_block512 in 8 lanes: the block's 16 rows as two halves of 8 lanes (lane = row), the
 * same operations per row in the same order, so every row gets the same bits as there:
 * - scores: 6 keys at a time, 12 accumulators (a key's two halves), D FMAs each;
 * - exp(s - m) with the exact row max, masked lanes zeroed, row sums lane-wise;
 * - O^T: 6 dims at a time (then 4 or 2), 12 accumulators over the block's keys. */
#define KG 6

/* Lanes (rows) of half h whose key range [lo, hi) holds block key j. */
V256 __m256 band_ok(const __m256i *vlo, const __m256i *vhi, int h, int64_t j)
{
    __m256i jv = _mm256_set1_epi32((int32_t)j);
    return _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpgt_epi32(vlo[h], jv),
                                                   _mm256_cmpgt_epi32(vhi[h], jv)));
}

/* Rows' o^T for dims d0 .. d0 + W: W dims x 2 halves of accumulators over the block's keys. */
#define BAND_PV(W)                                                                              \
    do {                                                                                        \
        __m256 a[W][2];                                                                         \
        UNROLL                                                                                  \
        for (int i = 0; i < W; i++)                                                             \
            a[i][0] = a[i][1] = _mm256_setzero_ps();                                            \
        const float *vr = Vb + d0;                                                              \
        for (int64_t j = 0; j < L; j++, vr += D) {                                              \
            __m256 p0 = _mm256_load_ps(pt + j * 16), p1 = _mm256_load_ps(pt + j * 16 + 8);      \
            UNROLL                                                                              \
            for (int i = 0; i < W; i++) {                                                       \
                __m256 x = _mm256_broadcast_ss(vr + i);                                         \
                a[i][0] = _mm256_fmadd_ps(x, p0, a[i][0]);                                      \
                a[i][1] = _mm256_fmadd_ps(x, p1, a[i][1]);                                      \
            }                                                                                   \
        }                                                                                       \
        UNROLL                                                                                  \
        for (int i = 0; i < W; i++) {                                                           \
            _mm256_store_ps(ot + i * 16, _mm256_mul_ps(a[i][0], inv[0]));                       \
            _mm256_store_ps(ot + i * 16 + 8, _mm256_mul_ps(a[i][1], inv[1]));                   \
        }                                                                                       \
        for (int64_t r = 0; r < nr; r++)                                                        \
            for (int i = 0; i < W; i++)                                                         \
                out[r * D + d0 + i] = ot[i * 16 + r];                                           \
    } while (0)

V256 void band_block256(const float *qb, int64_t nr, const float *K, const float *V,
                        const int64_t *lo, const int64_t *hi, const int64_t D, float scale,
                        float *qt, float *pt, float *ot, float *out, float *lse)
{
    int64_t kb;
    int32_t lo32[16], hi32[16];
    const int64_t L = band_setup(qb, nr, lo, hi, D, scale, qt, &kb, lo32, hi32, out, lse);
    if (L == 0)
        return;
    const __m256i vlo[2] = {_mm256_loadu_si256((const __m256i *)lo32),
                            _mm256_loadu_si256((const __m256i *)(lo32 + 8))};
    const __m256i vhi[2] = {_mm256_loadu_si256((const __m256i *)hi32),
                            _mm256_loadu_si256((const __m256i *)(hi32 + 8))};
    const float *Kb = K + (size_t)kb * D, *Vb = V + (size_t)kb * D;
    __m256 vmax[2] = {_mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY)};
    for (int64_t j0 = 0; j0 < L; j0 += KG) {
        int t = L - j0 < KG ? (int)(L - j0) : KG;  /* keys past L: scores unused */
        const float *kr[KG];
        UNROLL
        for (int j = 0; j < KG; j++)  /* a short last group repeats its first key */
            kr[j] = Kb + (size_t)(j0 + (j < t ? j : 0)) * D;
        __m256 s[KG][2];
        UNROLL
        for (int j = 0; j < KG; j++)
            s[j][0] = s[j][1] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d++) {
            __m256 q0 = _mm256_load_ps(qt + d * 16), q1 = _mm256_load_ps(qt + d * 16 + 8);
            UNROLL
            for (int j = 0; j < KG; j++) {
                __m256 x = _mm256_broadcast_ss(kr[j] + d);
                s[j][0] = _mm256_fmadd_ps(x, q0, s[j][0]);
                s[j][1] = _mm256_fmadd_ps(x, q1, s[j][1]);
            }
        }
        UNROLL  /* all KG stored (scratch has room): s stays in registers */
        for (int j = 0; j < KG; j++) {
            _mm256_store_ps(pt + (j0 + j) * 16, s[j][0]);
            _mm256_store_ps(pt + (j0 + j) * 16 + 8, s[j][1]);
        }
    }
    /* keys [in0, in1) lie in every lane's range: no mask there (the same bits either way) */
    int32_t in0 = 0, in1 = INT32_MAX;
    for (int r = 0; r < 16; r++) {
        in0 = lo32[r] > in0 ? lo32[r] : in0;
        in1 = hi32[r] < in1 ? hi32[r] : in1;
    }
    for (int64_t j = 0; j < L; j++)
        for (int h = 0; h < 2; h++) {
            __m256 x = _mm256_max_ps(vmax[h], _mm256_load_ps(pt + j * 16 + 8 * h));
            vmax[h] = j >= in0 && j < in1 ? x : _mm256_blendv_ps(vmax[h], x, band_ok(vlo, vhi, h, j));
        }
    __m256 lsum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t j = 0; j < L; j++)
        for (int h = 0; h < 2; h++) {
            __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(pt + j * 16 + 8 * h), vmax[h]));
            if (j < in0 || j >= in1)
                p = _mm256_and_ps(p, band_ok(vlo, vhi, h, j));
            lsum[h] = _mm256_add_ps(lsum[h], p);
            _mm256_store_ps(pt + j * 16 + 8 * h, p);
        }
    /* 1 / l, 0 for rows without keys (their o is 0) */
    __m256 inv[2];
    for (int h = 0; h < 2; h++)
        inv[h] = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), lsum[h]),
                               _mm256_cmp_ps(lsum[h], _mm256_setzero_ps(), _CMP_GT_OQ));
    int64_t d0 = 0;
    for (; d0 + KG <= D; d0 += KG)
        BAND_PV(KG);
    if (D - d0 == 4)
        BAND_PV(4);
    else if (D - d0 == 2)
        BAND_PV(2);
    float m[16], l[16];
    _mm256_storeu_ps(m, vmax[0]);
    _mm256_storeu_ps(m + 8, vmax[1]);
    _mm256_storeu_ps(l, lsum[0]);
    _mm256_storeu_ps(l + 8, lsum[1]);
    for (int64_t r = 0; r < nr; r++)
        lse[r] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
}

__attribute__((target("avx2,fma")))
static void band_avx2(BAND_ARGS, int64_t limit)
{
    BAND_BLOCKS(D, band_block256, D)
}
#endif

/* ---------------------------------------------------------------- entry points */

/* The calling convention's version: hpcattn/cpu/cgather.py ignores a library built from another
 * (a stale in-place build). Bump it with any change of hpcattn_gather's arguments. */
EXPORT int hpcattn_gather_abi(void)
{
    return 5;
}

/* The best variant this CPU runs (3 avx512, 2 avx2, 1 generic). */
EXPORT int hpcattn_gather_best(void)
{
#ifdef HPCATTN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
        return AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return AVX2;
#endif
    return GENERIC;
}

/* The variant asked for (0: the best) lowered to what this CPU runs and D allows (avx512 needs
 * D % 16 == 0 and D <= 256). */
EXPORT int hpcattn_variant_for(int variant, int64_t D)
{
    int best = hpcattn_gather_best();
    if (variant <= 0 || variant > best)
        variant = best;
    if (variant == AVX512 && (D % 16 != 0 || D > 256 || D == 0))
        variant = best >= AVX2 ? AVX2 : GENERIC;
    return variant;
}

/* Whether the AVX2 variant's 8-lane loops take this D (else its portable loops run). */
static int lanes8(int64_t D)
{
    return D % 8 == 0 && D > 0 && D <= 256;
}

/* Whether hpcattn_band runs its blocked loops for the variant asked (0: the best) at head dim
 * D: AVX-512, or AVX2 with D a multiple of 8 up to 256 (hpcattn/cpu/cgather.py asks it too). */
EXPORT int hpcattn_band_blocked(int variant, int64_t D)
{
    variant = hpcattn_variant_for(variant, D);
    return variant == AVX512 || (variant == AVX2 && lanes8(D));
}

/* The longest of the n index ranges [lo[r], hi[r]) (0 when none has an index). */
static int64_t widest(const int64_t *lo, const int64_t *hi, int64_t n)
{
    int64_t w = 0;
    for (int64_t r = 0; r < n; r++)
        if (hi[r] - lo[r] > w)
            w = hi[r] - lo[r];
    return w;
}

/* n floats on a cache-line boundary; *mem is what to free. NULL if malloc failed. */
static float *scratch(size_t n, void **mem)
{
    *mem = malloc(sizeof(float) * n + 64);
    return *mem ? (float *)(((uintptr_t)*mem + 63) & ~(uintptr_t)63) : NULL;
}

/* (o, lse) of every row (see the top of the file). variant: 0 the best this CPU runs for D,
 * else that one (lowered to what the CPU runs; avx512 needs D % 16 == 0 and D <= 256).
 * Returns the variant used, or -1 if scratch memory could not be allocated. */
EXPORT int hpcattn_gather(const float *q, const float *k, const float *v, const int64_t *indptr,
                          const int64_t *cols, int64_t bh, int64_t g, int64_t n, int64_t nk,
                          int64_t D, float scale, int variant, float *o, float *lse)
{
    variant = hpcattn_variant_for(variant, D);
    /* scratch: the longest row's scores, rounded up to 16 floats */
    const int64_t longest = (widest(indptr, indptr + 1, n) + 15) / 16 * 16;
    void *mem;
    float *buf = scratch((size_t)longest, &mem);
    if (!buf)
        return -1;
#ifdef HPCATTN_X86
    if (variant == AVX512)
        gather_avx512(q, k, v, indptr, cols, bh, g, n, nk, D, scale, buf, o, lse);
    else if (variant == AVX2 && lanes8(D))
        gather_avx2(q, k, v, indptr, cols, bh, g, n, nk, D, scale, buf, o, lse);
    else if (variant == AVX2)
        gather_avx2_rows(q, k, v, indptr, cols, bh, g, n, nk, D, scale, buf, o, lse);
    else
#endif
        gather_generic(q, k, v, indptr, cols, bh, g, n, nk, D, scale, buf, o, lse);
    free(mem);
    return variant;
}

/* Band attention: row r of q over the contiguous keys [lo[r], hi[r]) of its (b) slab of k and v
 * (rows of D floats, slabs ldk floats apart; hi <= lo: no key, o = 0, lse = -inf). q (bh, g, n,
 * D), o (bh, g, n, D), lse (bh, g, n) contiguous. The indices are the caller's to keep in range
 * (hpcattn/cpu/cgather.py: band_rows). variant as for hpcattn_gather. Returns the variant used, or
 * -1 if scratch memory could not be allocated. */
EXPORT int hpcattn_band(const float *q, const float *k, const float *v, const int64_t *lo,
                        const int64_t *hi, int64_t bh, int64_t g, int64_t n, int64_t D, int64_t ldk,
                        float scale, int variant, float *o, float *lse)
{
    variant = hpcattn_variant_for(variant, D);
    const int64_t w = widest(lo, hi, n);  /* the widest row; a block of rows spans at most 64 keys more */
    int64_t limit = w + 64, span = (limit + 16 + 15) / 16 * 16;  /* + a last group's padding */
    int blocked = hpcattn_band_blocked(variant, D);
    size_t floats = blocked ? (size_t)(32 * D + 16 * span) : (size_t)w;
    void *mem;
    float *sc = scratch(floats, &mem);
    if (!sc)
        return -1;
#ifdef HPCATTN_X86
    if (variant == AVX512)
        band_avx512(q, k, v, lo, hi, bh, g, n, D, ldk, scale, sc, o, lse, limit);
    else if (blocked)
        band_avx2(q, k, v, lo, hi, bh, g, n, D, ldk, scale, sc, o, lse, limit);
    else if (variant == AVX2)
        band_avx2_rows(q, k, v, lo, hi, bh, g, n, D, ldk, scale, sc, o, lse);
    else
#endif
        band_generic(q, k, v, lo, hi, bh, g, n, D, ldk, scale, sc, o, lse);
    free(mem);
    return variant;
}
