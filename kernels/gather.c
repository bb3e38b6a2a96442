/* hpcattn's gather kernel: attention of query rows over their listed keys (a CSR edge list),
 * float32 in and out. Plain C, no Python.h: built by setup.py into the hpcattn package as
 * hpcattn/_gather*.so and called through ctypes (hpcattn/cgather.py), which releases the GIL,
 * so the kernel's row-chunk threads (local.attend) run it in parallel.
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
 * - avx2 / generic: the same maths as plain C loops over one row at a time (scores, exact row
 *   max, exp, weighted V rows), compiled for AVX2 + FMA and for baseline x86-64 (or any other
 *   architecture), so every D works everywhere.
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
                for (int64_t d = 0; d < D; d++)                                                 \
                    acc[d] = 0.0f;                                                              \
                if (cnt == 0) {                                                                 \
                    lse[row0 + r] = -INFINITY;                                                  \
                    continue;                                                                   \
                }                                                                               \
                float m = -INFINITY;                                                            \
                for (int64_t e = 0; e < cnt; e++) {                                             \
                    const float *kr = K + (size_t)c[e] * D;                                     \
                    float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                      \
                    int64_t d = 0;                                                              \
                    for (; d + 8 <= D; d += 8)                                                  \
                        for (int j = 0; j < 8; j++)                                             \
                            t[j] += qr[d + j] * kr[d + j];                                      \
                    for (; d < D; d++)                                                          \
                        t[0] += qr[d] * kr[d];                                                  \
                    float s = (((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))) \
                              * scale;                                                          \
                    sc[e] = s;                                                                  \
                    m = s > m ? s : m;                                                          \
                }                                                                               \
                float l = 0.0f;                                                                 \
                for (int64_t e = 0; e < cnt; e++) {                                             \
                    float p = expf(sc[e] - m);                                                  \
                    const float *vr = V + (size_t)c[e] * D;                                     \
                    l += p;                                                                     \
                    for (int64_t d = 0; d < D; d++)                                             \
                        acc[d] += p * vr[d];                                                    \
                }                                                                               \
                float inv = 1.0f / l;                                                           \
                for (int64_t d = 0; d < D; d++)                                                 \
                    acc[d] *= inv;                                                              \
                lse[row0 + r] = m + logf(l);                                                    \
            }                                                                                   \
        }                                                                                       \
    }

static void gather_generic(const float *q, const float *k, const float *v, const int64_t *indptr,
                           const int64_t *cols, int64_t bh, int64_t g, int64_t n, int64_t nk,
                           int64_t D, float scale, float *sc, float *o, float *lse)
{
    PORTABLE_BODY
}

#ifdef HPCATTN_X86
__attribute__((target("avx2,fma")))
static void gather_avx2(const float *q, const float *k, const float *v, const int64_t *indptr,
                        const int64_t *cols, int64_t bh, int64_t g, int64_t n, int64_t nk,
                        int64_t D, float scale, float *sc, float *o, float *lse)
{
    PORTABLE_BODY
}

/* ---------------------------------------------------------------- AVX-512 variant */

#define UNROLL _Pragma("GCC unroll 16")
#define V512 static inline __attribute__((always_inline, target("avx512f,avx512dq,fma")))

/* exp of 16 lanes (Cephes expf: range reduction by ln 2, degree-6 polynomial, 2^n by scalef;
 * about 1 ulp); inputs below -87 give about 0 (the caller zeroes masked lanes itself). */
V512 __m512 exp16(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
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

/* Prefetch the row at the cursor and step past it (nothing once past the last query row). */
V512 void prefetch_next(Cursor *p, const int NV)
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
    const float *row = (p->v ? p->V : p->K) + (size_t)p->cols[p->e++] * (size_t)(NV * 16);
    UNROLL
    for (int u = 0; u < NV; u++)
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
                prefetch_next(pc, NV);
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
            prefetch_next(pc, NV);
            prefetch_next(pc, NV);
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
            prefetch_next(pc, NV);
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
            prefetch_next(&pc, NV);
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
#endif

/* ---------------------------------------------------------------- entry points */

/* The calling convention's version: hpcattn/cgather.py ignores a library built from another
 * (a stale in-place build). Bump it with any change of hpcattn_gather's arguments. */
EXPORT int hpcattn_gather_abi(void)
{
    return 2;
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

/* (o, lse) of every row (see the top of the file). variant: 0 the best this CPU runs for D,
 * else that one (lowered to what the CPU runs; avx512 needs D % 16 == 0 and D <= 256).
 * Returns the variant used, or -1 if scratch memory could not be allocated. */
EXPORT int hpcattn_gather(const float *q, const float *k, const float *v, const int64_t *indptr,
                          const int64_t *cols, int64_t bh, int64_t g, int64_t n, int64_t nk,
                          int64_t D, float scale, int variant, float *o, float *lse)
{
    int best = hpcattn_gather_best();
    if (variant <= 0 || variant > best)
        variant = best;
    if (variant == AVX512 && (D % 16 != 0 || D > 256 || D == 0))
        variant = best >= AVX2 ? AVX2 : GENERIC;
    int64_t longest = 0;  /* scratch: the longest row's scores, rounded up to 16 floats */
    for (int64_t r = 0; r < n; r++)
        if (indptr[r + 1] - indptr[r] > longest)
            longest = indptr[r + 1] - indptr[r];
    longest = (longest + 15) / 16 * 16;
    void *mem = malloc(sizeof(float) * (size_t)longest + 64);
    if (!mem)
        return -1;
    float *buf = (float *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
#ifdef HPCATTN_X86
    if (variant == AVX512)
        gather_avx512(q, k, v, indptr, cols, bh, g, n, nk, D, scale, buf, o, lse);
    else if (variant == AVX2)
        gather_avx2(q, k, v, indptr, cols, bh, g, n, nk, D, scale, buf, o, lse);
    else
#endif
        gather_generic(q, k, v, indptr, cols, bh, g, n, nk, D, scale, buf, o, lse);
    free(mem);
    return variant;
}
