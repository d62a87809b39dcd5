/*
 * AVX-512 float32 kernels (F, DQ, BW, VL + FMA).  This file is compiled for
 * that target through the pragma below, whatever the build's baseline flags
 * are; it only runs when dispatch (engine.c) saw the CPU and OS support it.
 *
 * Register blocking: a block of 16 hidden units is 64 columns = 4 zmm per
 * batch row.  R rows (R <= 6) keep 4R accumulators in registers.
 */
#include "../fl_internal.h"
#include "../fl_math.h"

#if defined(FL_X86)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
#endif
#include <immintrin.h>

#define RMAX 6
#define EPI_ROWS 2              /* rows of one epilogue group */
#define EPI_NX (4 * EPI_ROWS)     /* their exponentials */
#define AI static inline __attribute__((always_inline))

/* 1/d to ~2^-28 relative: rcp14 and one Newton step. */
AI __m512 v_rcp(__m512 d)
{
    __m512 y = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(1.0f)), y);
}

/* acc[r][q] += A[r][k] * panel[k][16q..16q+15] for k < K. */
#define KLOOP(R) KLOOP_AT(R, A, lda, panel, K)
#define KLOOP_AT(R, A, lda, panel, K)                                            \
    for (int k = 0; k < (K); k++) {                                              \
        const float *w = (panel) + (size_t)k * FL_PW;                            \
        __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16);              \
        __m512 w2 = _mm512_load_ps(w + 32), w3 = _mm512_load_ps(w + 48);         \
        _Pragma("GCC unroll 6") for (int r = 0; r < (R); r++)                    \
        {                                                                        \
            __m512 b = _mm512_set1_ps((A)[r * (lda) + k]);                           \
            acc[r][0] = _mm512_fmadd_ps(b, w0, acc[r][0]);                       \
            acc[r][1] = _mm512_fmadd_ps(b, w1, acc[r][1]);                       \
            acc[r][2] = _mm512_fmadd_ps(b, w2, acc[r][2]);                       \
            acc[r][3] = _mm512_fmadd_ps(b, w3, acc[r][3]);                       \
        }                                                                        \
    }

/* The exponentials of n vectors (n <= EPI_NX) in place: fl_expf (fl_math.h)
 * lane by lane, for arguments already within [FL_EXP_LO, FL_EXP_HI] or NaN
 * (so without its clamp).  Each statement runs across all n vectors: one exp is a chain of
 * ~14 dependent operations, so one at a time runs at the chain's latency,
 * while n side by side keep the FMA pipes busy.  2^n is applied by vscalefps,
 * exact like fl_expf's multiplication by the constructed power of two (the
 * results here are normal numbers: exp(+-30) and exp([0, 18])). */
AI void v_exp_n(const int n, __m512 *x)
{
    __m512 t[EPI_NX], r[EPI_NX], p[EPI_NX];
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
        t[i] = _mm512_roundscale_ps(_mm512_mul_ps(x[i], _mm512_set1_ps(FL_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
        r[i] = _mm512_fnmadd_ps(t[i], _mm512_set1_ps(FL_LN2_HI), x[i]);
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
        r[i] = _mm512_fnmadd_ps(t[i], _mm512_set1_ps(FL_LN2_LO), r[i]);
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
        p[i] = _mm512_fmadd_ps(_mm512_set1_ps(FL_EXP_P0), r[i], _mm512_set1_ps(FL_EXP_P1));
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
        p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(FL_EXP_P2));
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
        p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(FL_EXP_P3));
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
        p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(FL_EXP_P4));
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
        p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(FL_EXP_P5));
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
    {
        __m512 y = _mm512_fmadd_ps(p[i], _mm512_mul_ps(r[i], r[i]),
                                   _mm512_add_ps(r[i], _mm512_set1_ps(1.0f)));
        x[i] = _mm512_scalef_ps(y, t[i]);
    }
}

/* The argument of sigmoid's exponential: -x, x clamped to +-FL_SIG_CLAMP. */
AI __m512 sig_exp_arg(__m512 x)
{
    x = _mm512_max_ps(_mm512_set1_ps(-FL_SIG_CLAMP), x);
    x = _mm512_min_ps(_mm512_set1_ps(FL_SIG_CLAMP), x);
    return _mm512_sub_ps(_mm512_setzero_ps(), x);
}

/* The argument of tanh's exponential: 2 min(|x|, FL_TANH_CLAMP). */
AI __m512 tanh_exp_arg(__m512 x)
{
    __m512 ac = _mm512_min_ps(_mm512_set1_ps(FL_TANH_CLAMP), _mm512_abs_ps(x));
    return _mm512_add_ps(ac, ac);
}

/* tanh(x) from rc = 1/(exp(tanh_exp_arg(x)) + 1): fl_tanhf's two branches,
 * both computed and blended. */
AI __m512 tanh_from_rcp(__m512 x, __m512 rc)
{
    const __m512 one = _mm512_set1_ps(1.0f);
    __mmask16 small = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(FL_TANH_SMALL), _CMP_LT_OQ);
    __m512 z = _mm512_mul_ps(x, x);
    __m512 p = _mm512_set1_ps(FL_TANH_T0);
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(FL_TANH_T1));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(FL_TANH_T2));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(FL_TANH_T3));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(FL_TANH_T4));
    __m512 ts = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
    __m512 tb = _mm512_fnmadd_ps(_mm512_set1_ps(2.0f), rc, one);
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
    tb = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(tb), sign));
    return _mm512_mask_blend_ps(small, tb, ts);
}

/* tanh of n vectors (n <= EPI_NX) side by side. */
AI void v_tanh_n(const int n, __m512 *x)
{
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 e[EPI_NX];
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
        e[i] = tanh_exp_arg(x[i]);
    v_exp_n(n, e);
    _Pragma("GCC unroll 24") for (int i = 0; i < n; i++)
        x[i] = tanh_from_rcp(x[i], v_rcp(_mm512_add_ps(e[i], one)));
}

/* The gate math on R rows of pre-activations (i, f, g, o x 16 lanes), two
 * rows at a time with their eight exponentials side by side (v_exp_n): ~25%
 * faster than one gate at a time on Zen 5, where the FMA pipes outrun one
 * chain's latency.  fl_math.h's sigmoid and tanh, operation for operation
 * as before (the same bits); sigmoid's 1 + exp(-x) and tanh's exp(2|x|) + 1
 * share one reciprocal pass. */
AI void epilogue(const int R, __m512 acc[][4], float *c, ptrdiff_t ldc, float *h,
                 ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    if (!epi->is_default) {
        float pre[RMAX * FL_PW] __attribute__((aligned(64)));
        for (int r = 0; r < R; r++)
            for (int q = 0; q < 4; q++) _mm512_store_ps(pre + r * FL_PW + 16 * q, acc[r][q]);
        fl_epilogue_generic_f32(R, pre, c, ldc, h, ldh, nvalid, epi);
        return;
    }
    const __m512 one = _mm512_set1_ps(1.0f);
    __mmask16 m = nvalid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nvalid) - 1);
    _Pragma("GCC unroll 6") for (int r0 = 0; r0 < R; r0 += EPI_ROWS)
    {
        const int nr = R - r0 >= EPI_ROWS ? EPI_ROWS : R - r0;
        __m512 e[EPI_NX];
        /* e[4j + q]: gate q of row r0 + j; the sigmoid gates as exp(-x), x
         * clamped to +-FL_SIG_CLAMP; g as exp(2 min(|g|, FL_TANH_CLAMP)) */
        _Pragma("GCC unroll 6") for (int j = 0; j < nr; j++)
        {
            _Pragma("GCC unroll 4") for (int q = 0; q < 4; q++)
                e[4 * j + q] = q == 2 ? tanh_exp_arg(acc[r0 + j][q]) : sig_exp_arg(acc[r0 + j][q]);
        }
        v_exp_n(4 * nr, e);
        _Pragma("GCC unroll 24") for (int k = 0; k < 4 * nr; k++)
            e[k] = v_rcp(_mm512_add_ps(one, e[k]));
        __m512 cn[EPI_ROWS], o[EPI_ROWS];
        _Pragma("GCC unroll 6") for (int j = 0; j < nr; j++)
        {
            __m512 g = tanh_from_rcp(acc[r0 + j][2], e[4 * j + 2]);
            float *cr = c + (r0 + j) * ldc;
            __m512 cp = _mm512_maskz_loadu_ps(m, cr);
            cn[j] = _mm512_fmadd_ps(e[4 * j + 1], cp, _mm512_mul_ps(e[4 * j + 0], g));
            _mm512_mask_storeu_ps(cr, m, cn[j]);
            o[j] = e[4 * j + 3];
        }
        v_tanh_n(nr, cn);
        _Pragma("GCC unroll 6") for (int j = 0; j < nr; j++)
            _mm512_mask_storeu_ps(h + (r0 + j) * ldh, m, _mm512_mul_ps(o[j], cn[j]));
    }
}

AI void gemm_r(const int R, int K, const float *A, ptrdiff_t lda, const float *panel,
               const float *init, ptrdiff_t ldi, float *out, ptrdiff_t ldo, int ncols)
{
    __m512 acc[RMAX][4];
    if (init) {
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
        {
            const float *b = init + r * ldi;
            acc[r][0] = _mm512_loadu_ps(b);
            acc[r][1] = _mm512_loadu_ps(b + 16);
            acc[r][2] = _mm512_loadu_ps(b + 32);
            acc[r][3] = _mm512_loadu_ps(b + 48);
        }
    } else {
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
        {
            acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
        }
    }
    /* No split k chains here: a row's sum must not depend on how rows are
     * tiled (streaming in chunks must equal one-shot bitwise). */
    KLOOP(R)
    if (ncols == FL_PW) {
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
        {
            float *o = out + r * ldo;
            _mm512_storeu_ps(o, acc[r][0]);
            _mm512_storeu_ps(o + 16, acc[r][1]);
            _mm512_storeu_ps(o + 32, acc[r][2]);
            _mm512_storeu_ps(o + 48, acc[r][3]);
        }
    } else {
        for (int r = 0; r < R; r++) {
            float *o = out + r * ldo;
            for (int q = 0; q < 4; q++) {
                int n = ncols - 16 * q;
                if (n <= 0) break;
                __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
                _mm512_mask_storeu_ps(o + 16 * q, m, acc[r][q]);
            }
        }
    }
}

AI void lstm_r(const int R, int K, const float *A, ptrdiff_t lda, const float *panel,
               const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,
               ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    __m512 acc[RMAX][4];
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
    {
        const float *g = G + r * ldg;
        acc[r][0] = _mm512_loadu_ps(g);
        acc[r][1] = _mm512_loadu_ps(g + 16);
        acc[r][2] = _mm512_loadu_ps(g + 32);
        acc[r][3] = _mm512_loadu_ps(g + 48);
    }
    /* One k chain for every R: a row's sums do not depend on how many rows
     * share the tile, so results are bitwise the same for every thread
     * count and batch split.  (At R = 1 four chains already outrun L2.) */
    if (A) KLOOP(R)
    epilogue(R, acc, c, ldc, h, ldh, nvalid, epi);
}

static void gemm_avx512(int R, int K, const float *A, ptrdiff_t lda, const float *panel,
                        const float *init, ptrdiff_t ldi, float *out, ptrdiff_t ldo, int ncols)
{
    switch (R) {
    case 1: gemm_r(1, K, A, lda, panel, init, ldi, out, ldo, ncols); break;
    case 2: gemm_r(2, K, A, lda, panel, init, ldi, out, ldo, ncols); break;
    case 3: gemm_r(3, K, A, lda, panel, init, ldi, out, ldo, ncols); break;
    case 4: gemm_r(4, K, A, lda, panel, init, ldi, out, ldo, ncols); break;
    case 5: gemm_r(5, K, A, lda, panel, init, ldi, out, ldo, ncols); break;
    default: gemm_r(6, K, A, lda, panel, init, ldi, out, ldo, ncols); break;
    }
}

static void lstm_avx512(int R, int K, const float *A, ptrdiff_t lda, const float *panel,
                        const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,
                        ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    switch (R) {
    case 1: lstm_r(1, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break;
    case 2: lstm_r(2, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break;
    case 3: lstm_r(3, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break;
    case 4: lstm_r(4, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break;
    case 5: lstm_r(5, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break;
    default: lstm_r(6, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break;
    }
}

AI void lstmx_r(const int R, int Kx, const float *X, ptrdiff_t ldx, const float *wx,
                const float *bias, int K, const float *A, ptrdiff_t lda, const float *panel,
                float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    __m512 acc[RMAX][4];
    const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_loadu_ps(bias + 16);
    const __m512 b2 = _mm512_loadu_ps(bias + 32), b3 = _mm512_loadu_ps(bias + 48);
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
    {
        acc[r][0] = b0; acc[r][1] = b1; acc[r][2] = b2; acc[r][3] = b3;
    }
    /* the input projection, then h_{t-1}, continuing the same chains */
    KLOOP_AT(R, X, ldx, wx, Kx)
    if (A) KLOOP(R)
    epilogue(R, acc, c, ldc, h, ldh, nvalid, epi);
}

static void lstmx_avx512(int R, int Kx, const float *X, ptrdiff_t ldx, const float *wx,
                         const float *bias, int K, const float *A, ptrdiff_t lda, const float *panel,
                         float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    switch (R) {
    case 1: lstmx_r(1, Kx, X, ldx, wx, bias, K, A, lda, panel, c, ldc, h, ldh, nvalid, epi); break;
    case 2: lstmx_r(2, Kx, X, ldx, wx, bias, K, A, lda, panel, c, ldc, h, ldh, nvalid, epi); break;
    case 3: lstmx_r(3, Kx, X, ldx, wx, bias, K, A, lda, panel, c, ldc, h, ldh, nvalid, epi); break;
    case 4: lstmx_r(4, Kx, X, ldx, wx, bias, K, A, lda, panel, c, ldc, h, ldh, nvalid, epi); break;
    case 5: lstmx_r(5, Kx, X, ldx, wx, bias, K, A, lda, panel, c, ldc, h, ldh, nvalid, epi); break;
    default: lstmx_r(6, Kx, X, ldx, wx, bias, K, A, lda, panel, c, ldc, h, ldh, nvalid, epi); break;
    }
}

/* float16 / bfloat16 W_hh: each panel row is widened to float32 once and
 * used for all R rows. */
AI void load_wrow(const int WT, const void *panel, int k, __m512 w[4])
{
    const uint16_t *p = (const uint16_t *)panel + (size_t)k * FL_PW;
    if (WT == FL_W_F16) {
        for (int q = 0; q < 4; q++)
            w[q] = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p + 16 * q)));
    } else { /* 64 bytes: columns 32g..32g+15 (low halves), 32g+16.. (high) */
        const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
        for (int g = 0; g < 2; g++) {
            __m512i x = _mm512_load_si512((const void *)(p + 32 * g));
            w[2 * g] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
            w[2 * g + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, hi));
        }
    }
}

AI void lstmq_r(const int WT, const int R, int K, const float *A, ptrdiff_t lda,
                const void *panel, const float *G, ptrdiff_t ldg,
                float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    __m512 acc[RMAX][4];
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
    {
        acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
    }
    if (A) {
        for (int k = 0; k < K; k++) {
            __m512 w[4];
            load_wrow(WT, panel, k, w);
            _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
            {
                __m512 b = _mm512_set1_ps(A[r * lda + k]);
                acc[r][0] = _mm512_fmadd_ps(b, w[0], acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(b, w[1], acc[r][1]);
                acc[r][2] = _mm512_fmadd_ps(b, w[2], acc[r][2]);
                acc[r][3] = _mm512_fmadd_ps(b, w[3], acc[r][3]);
            }
        }
    }
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
    {
        const float *g = G + r * ldg;
        for (int q = 0; q < 4; q++) acc[r][q] = _mm512_add_ps(acc[r][q], _mm512_loadu_ps(g + 16 * q));
    }
    epilogue(R, acc, c, ldc, h, ldh, nvalid, epi);
}

#define LSTMQ_CASES(WT)                                                                   \
    switch (R) {                                                                          \
    case 1: lstmq_r(WT, 1, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    case 2: lstmq_r(WT, 2, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    case 3: lstmq_r(WT, 3, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    case 4: lstmq_r(WT, 4, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    case 5: lstmq_r(WT, 5, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    default: lstmq_r(WT, 6, K, A, lda, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    }

static void lstmq_avx512(int wtype, int R, int K, const float *A, ptrdiff_t lda,
                         const void *panel, const float *scale, const float *G, ptrdiff_t ldg,
                         float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh, int nvalid,
                         const fl_epi *epi)
{
    (void)scale;
    if (wtype == FL_W_F16) { LSTMQ_CASES(FL_W_F16) }
    else { LSTMQ_CASES(FL_W_BF16) }
}

/* One row, two adjacent blocks (fl_lstmq2_f32): 8 FMA chains. */
AI void lstmq2_r(const int WT, int K, const float *A, const void *panel, const float *G,
                 float *c, float *h, int nvalid2, const fl_epi *epi)
{
    __m512 acc[2][4];
    const void *panel1 = (const uint16_t *)panel + (size_t)K * FL_PW;
    for (int q = 0; q < 4; q++) acc[0][q] = acc[1][q] = _mm512_setzero_ps();
    if (A) {
        for (int k = 0; k < K; k++) {
            __m512 w0[4], w1[4];
            load_wrow(WT, panel, k, w0);
            load_wrow(WT, panel1, k, w1);
            __m512 b = _mm512_set1_ps(A[k]);
            acc[0][0] = _mm512_fmadd_ps(b, w0[0], acc[0][0]);
            acc[0][1] = _mm512_fmadd_ps(b, w0[1], acc[0][1]);
            acc[0][2] = _mm512_fmadd_ps(b, w0[2], acc[0][2]);
            acc[0][3] = _mm512_fmadd_ps(b, w0[3], acc[0][3]);
            acc[1][0] = _mm512_fmadd_ps(b, w1[0], acc[1][0]);
            acc[1][1] = _mm512_fmadd_ps(b, w1[1], acc[1][1]);
            acc[1][2] = _mm512_fmadd_ps(b, w1[2], acc[1][2]);
            acc[1][3] = _mm512_fmadd_ps(b, w1[3], acc[1][3]);
        }
    }
    for (int q = 0; q < 4; q++) {
        acc[0][q] = _mm512_add_ps(acc[0][q], _mm512_loadu_ps(G + 16 * q));
        acc[1][q] = _mm512_add_ps(acc[1][q], _mm512_loadu_ps(G + FL_PW + 16 * q));
    }
    epilogue(1, acc, c, 0, h, 0, FL_BW, epi);
    fl_epi e2 = *epi;
    if (epi->peep) e2.peep = (const float *)epi->peep + 3 * FL_BW;
    epilogue(1, acc + 1, c + FL_BW, 0, h + FL_BW, 0, nvalid2, &e2);
}

static void lstmq2_avx512(int wtype, int K, const float *A, const void *panel, const float *G,
                          float *c, float *h, int nvalid2, const fl_epi *epi)
{
    if (wtype == FL_W_F16) lstmq2_r(FL_W_F16, K, A, panel, G, c, h, nvalid2, epi);
    else lstmq2_r(FL_W_BF16, K, A, panel, G, c, h, nvalid2, epi);
}

/* bfloat16 W_hh times bfloat16 h (fl_lstmb_f32).  64 bytes of a k pair are
 * 16 columns x 2 k.  With AVX512_BF16 one vdpbf16ps multiplies them with the
 * pair of h codes broadcast and adds both products to each column's sum
 * (odd k first, two roundings); without it the weights widen exactly (a
 * shift, a mask) and two FMAs add the same exact products in the same
 * order.  vdpbf16ps through inline asm, as vpdpbusd (GCC's intrinsic copies
 * the accumulators around each use). */
#if defined(FL_HAVE_BF16_ASM)
AI __m512 dp_bf16(__m512 acc, __m512i w, __m512i b)
{
    __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(w), "v"(b));
    return acc;
}
#define FL_BF16DOT_OK 1
#else
#define FL_BF16DOT_OK 0
AI __m512 dp_bf16(__m512 acc, __m512i w, __m512i b) { (void)w; (void)b; return acc; }
#endif

/* acc[r][q] += the products of k pair p for rows r < R. */
AI void bf16_pair(const int DOT, const int R, const uint16_t *B, ptrdiff_t ldb, const uint16_t *wp,
                  int p, __m512 acc[][4])
{
    __m512i w[4];
    for (int q = 0; q < 4; q++) w[q] = _mm512_load_si512((const void *)(wp + 32 * q));
    if (DOT) {
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
        {
            const __m512i bb = _mm512_set1_epi32(fl_ld_i32(B + r * ldb + 2 * p));
            for (int q = 0; q < 4; q++) acc[r][q] = dp_bf16(acc[r][q], w[q], bb);
        }
    } else {
        const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
        {
            const __m512 b0 = _mm512_set1_ps(fl_bf16_to_f32(B[r * ldb + 2 * p]));
            const __m512 b1 = _mm512_set1_ps(fl_bf16_to_f32(B[r * ldb + 2 * p + 1]));
            for (int q = 0; q < 4; q++) {
                acc[r][q] = _mm512_fmadd_ps(b1, _mm512_castsi512_ps(_mm512_and_si512(w[q], hi)), acc[r][q]);
                acc[r][q] = _mm512_fmadd_ps(b0, _mm512_castsi512_ps(_mm512_slli_epi32(w[q], 16)), acc[r][q]);
            }
        }
    }
}

AI void lstmb_r(const int DOT, const int R, int K, const uint16_t *B, ptrdiff_t ldb,
                const void *panel, const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc,
                float *h, ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    __m512 acc[RMAX][4];
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
    {
        acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
    }
    if (B) {
        const int np = (K + 1) / 2;
        for (int p = 0; p < np; p++)
            bf16_pair(DOT, R, B, ldb, (const uint16_t *)panel + (size_t)p * 2 * FL_PW, p, acc);
    }
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
    {
        const float *g = G + r * ldg;
        for (int q = 0; q < 4; q++) acc[r][q] = _mm512_add_ps(acc[r][q], _mm512_loadu_ps(g + 16 * q));
    }
    if (!epi) { /* an input projection: the pre-activations are the output */
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
        {
            for (int q = 0; q < 4; q++) _mm512_storeu_ps(h + r * ldh + 16 * q, acc[r][q]);
        }
        return;
    }
    epilogue(R, acc, c, ldc, h, ldh, nvalid, epi);
}

#define LSTMB_CASES(DOT)                                                                   \
    switch (R) {                                                                           \
    case 1: lstmb_r(DOT, 1, K, B, ldb, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    case 2: lstmb_r(DOT, 2, K, B, ldb, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    case 3: lstmb_r(DOT, 3, K, B, ldb, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    case 4: lstmb_r(DOT, 4, K, B, ldb, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    case 5: lstmb_r(DOT, 5, K, B, ldb, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    default: lstmb_r(DOT, 6, K, B, ldb, panel, G, ldg, c, ldc, h, ldh, nvalid, epi); break; \
    }

static void lstmb_avx512(int R, int K, const uint16_t *B, ptrdiff_t ldb, const void *panel,
                         const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,
                         ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    if (FL_BF16DOT_OK && fl_use_bf16dot) { LSTMB_CASES(1) }
    else { LSTMB_CASES(0) }
}

/* One row, two adjacent blocks (fl_lstmb2_f32): 8 accumulation chains. */
AI void lstmb2_r(const int DOT, int K, const uint16_t *B, const void *panel, const float *G,
                 float *c, float *h, int nvalid2, const fl_epi *epi)
{
    __m512 acc[2][4];
    const int np = (K + 1) / 2;
    const uint16_t *p0 = (const uint16_t *)panel, *p1 = p0 + (size_t)np * 2 * FL_PW;
    for (int q = 0; q < 4; q++) acc[0][q] = acc[1][q] = _mm512_setzero_ps();
    if (B) {
        for (int p = 0; p < np; p++) {
            bf16_pair(DOT, 1, B, 0, p0 + (size_t)p * 2 * FL_PW, p, acc);
            bf16_pair(DOT, 1, B, 0, p1 + (size_t)p * 2 * FL_PW, p, acc + 1);
        }
    }
    for (int q = 0; q < 4; q++) {
        acc[0][q] = _mm512_add_ps(acc[0][q], _mm512_loadu_ps(G + 16 * q));
        acc[1][q] = _mm512_add_ps(acc[1][q], _mm512_loadu_ps(G + FL_PW + 16 * q));
    }
    epilogue(1, acc, c, 0, h, 0, FL_BW, epi);
    fl_epi e2 = *epi;
    if (epi->peep) e2.peep = (const float *)epi->peep + 3 * FL_BW;
    epilogue(1, acc + 1, c + FL_BW, 0, h + FL_BW, 0, nvalid2, &e2);
}

static void lstmb2_avx512(int K, const uint16_t *B, const void *panel, const float *G, float *c,
                          float *h, int nvalid2, const fl_epi *epi)
{
    if (FL_BF16DOT_OK && fl_use_bf16dot) lstmb2_r(1, K, B, panel, G, c, h, nvalid2, epi);
    else lstmb2_r(0, K, B, panel, G, c, h, nvalid2, epi);
}

/* int8 W_hh times int16 h (fl_lstmi8_f32).  Per k quad, 64 bytes of the
 * panel are 16 columns x 4 k.
 * With AVX512_VNNI: one vpdpbusd multiplies them, as signed bytes, with 4
 * unsigned bytes of h broadcast, and adds each column's 4 products to its
 * int32 sum.  h is split into its byte planes (fl_quantize_h: q = 256 hi +
 * lo - 32768), so two vpdpbusd per 64 weights, one per plane, on the int8
 * weights as loaded: no widening.  At the end of a K chunk
 *     sum = (acc_hi << 8) + acc_lo,   acc_lo starting at corr = -32768 sum w,
 * which is the exact int32 sum of w q (|acc_hi << 8| <= 255 * 128 * 256 * 256
 * < 2^31; the addition wraps, its result fits).  Measured on Zen 4 with an
 * L2-resident panel: 1.2-1.3x the widen + vpdpwssd loop this replaced.
 * 8-bit codes (fl_cell_set_act_bits; planes = 1): q = 256 q8, every lo byte
 * zero, so one vpdpbusd per 64 weights, the offset starting the hi sums
 * (corr >> 8, exact) and sum = acc_hi << 8; 4 accumulators a row, so
 * passes of up to 6 rows.
 * Without VNNI: 32 bytes (8 columns x 4 k) widen to int16 (vpmovsxbw), and
 * vpmaddwd against (q[k] .. q[k+3]) gives each column two pair sums in
 * adjacent lanes, added at the end of the chunk.  Up to 3 rows per pass
 * keep every accumulator in a register (rows are independent: same sums). */
/* vpdpbusd through inline asm: with the intrinsic, GCC 12 copies every
 * accumulator to another register (and to the stack) around each use.
 * a: unsigned bytes (h), w: signed bytes (weights). */
AI __m512i dp_u8s8(__m512i acc, __m512i a, __m512i w)
{
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w));
    return acc;
}

#define VNNI_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni")))

/* One K chunk [p0, p1) (k quads) for n rows (n <= 3 with two planes, <= 6
 * with one: 8 or 4 accumulators a row): sums[r][col] += the chunk's exact
 * int32 sum, converted. */
AI VNNI_TARGET void i8_chunk_vnni(const int n, const int planes, int p0, int p1, const int16_t *Q,
                                  ptrdiff_t ldq, const int8_t *panel, const int32_t *corr, float *sums)
{
    const ptrdiff_t plane = ldq / 2;
    __m512i ah[6][4], al[6][4];
    for (int r = 0; r < n; r++)
        for (int q = 0; q < 4; q++) {
            /* one plane: the offset starts the hi sums, shifted back exactly
             * (corr = -32768 * sum w, a multiple of 256) */
            const __m512i cq = _mm512_loadu_si512((const void *)(corr + 16 * q));
            ah[r][q] = planes == 2 ? _mm512_setzero_si512() : _mm512_srai_epi32(cq, 8);
            al[r][q] = planes == 2 ? cq : _mm512_setzero_si512();
        }
    for (int p = p0; p < p1; p++) {
        const int8_t *w = panel + (size_t)p * 4 * FL_PW;
        const __m512i w0 = _mm512_load_si512((const void *)w),
                      w1 = _mm512_load_si512((const void *)(w + 64)),
                      w2 = _mm512_load_si512((const void *)(w + 128)),
                      w3 = _mm512_load_si512((const void *)(w + 192));
        for (int r = 0; r < n; r++) {
            const uint8_t *hi = (const uint8_t *)(Q + r * ldq + plane);
            const __m512i bh = _mm512_set1_epi32(fl_ld_i32(hi + 4 * p));
            ah[r][0] = dp_u8s8(ah[r][0], bh, w0);
            ah[r][1] = dp_u8s8(ah[r][1], bh, w1);
            ah[r][2] = dp_u8s8(ah[r][2], bh, w2);
            ah[r][3] = dp_u8s8(ah[r][3], bh, w3);
            if (planes == 2) { /* 8-bit codes: every lo byte is zero */
                const __m512i bl = _mm512_set1_epi32(fl_ld_i32(hi + plane + 4 * p));
                al[r][0] = dp_u8s8(al[r][0], bl, w0);
                al[r][1] = dp_u8s8(al[r][1], bl, w1);
                al[r][2] = dp_u8s8(al[r][2], bl, w2);
                al[r][3] = dp_u8s8(al[r][3], bl, w3);
            }
        }
    }
    for (int r = 0; r < n; r++)
        for (int q = 0; q < 4; q++) {
            float *sp = sums + r * FL_PW + 16 * q;
            __m512i v = planes == 2 ? _mm512_add_epi32(_mm512_slli_epi32(ah[r][q], 8), al[r][q])
                                    : _mm512_slli_epi32(ah[r][q], 8);
            _mm512_store_ps(sp, _mm512_add_ps(_mm512_load_ps(sp), _mm512_cvtepi32_ps(v)));
        }
}

AI void i8_chunk_bw(const int n, const int planes, int p0, int p1, const int16_t *Q, ptrdiff_t ldq,
                    const int8_t *panel, const int32_t *corr, float *sums)
{
    (void)planes;
    (void)corr; /* the byte split's offset: this kernel multiplies the int16 h */
    /* lanes 2i and 2i+1 of (a, b) hold column i's two pair sums */
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    __m512i acc[3][8];
    for (int r = 0; r < n; r++)
        for (int q = 0; q < 8; q++) acc[r][q] = _mm512_setzero_si512();
    for (int p = p0; p < p1; p++) {
        const int8_t *w = panel + (size_t)p * 4 * FL_PW;
        __m512i b[3];
        for (int r = 0; r < n; r++) b[r] = _mm512_set1_epi64(fl_ld_i64(Q + r * ldq + 4 * p));
        for (int q = 0; q < 8; q++) {
            const __m512i wq = _mm512_cvtepi8_epi16(_mm256_load_si256((const __m256i *)(w + 32 * q)));
            for (int r = 0; r < n; r++)
                acc[r][q] = _mm512_add_epi32(acc[r][q], _mm512_madd_epi16(wq, b[r]));
        }
    }
    for (int r = 0; r < n; r++)
        for (int m = 0; m < 4; m++) {
            float *sp = sums + r * FL_PW + 16 * m;
            __m512i v = _mm512_add_epi32(_mm512_permutex2var_epi32(acc[r][2 * m], even, acc[r][2 * m + 1]),
                                         _mm512_permutex2var_epi32(acc[r][2 * m], odd, acc[r][2 * m + 1]));
            _mm512_store_ps(sp, _mm512_add_ps(_mm512_load_ps(sp), _mm512_cvtepi32_ps(v)));
        }
}

/* One row count, the planes as a constant (1: 8-bit codes, 2: 16-bit). */
#define I8_ARGS K, Q, ldq, hs, panel, corr, scale, G, ldg, c, ldc, h, ldh, nvalid, epi
#define I8_ROWS(NAME, R, PL) (PL == 1 ? NAME##_r(R, 1, I8_ARGS) : NAME##_r(R, 2, I8_ARGS))

/* K chunks outside, passes of at most 3 rows inside (balanced: 4 = 2 + 2;
 * MAX1 rows with one plane):
 * a chunk's 16 KB of panel is read from L2 once and from L1 by the other
 * passes. */
#define I8_KERNEL(NAME, CHUNK, ATTR, MAX1, PL)                                                       \
    AI ATTR void NAME##_r(const int R, const int PLANES, int K, const int16_t *Q, ptrdiff_t ldq,     \
                          const float *hs, const int8_t *panel, const int32_t *corr,                 \
                          const float *scale,                                                        \
                          const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,          \
                          ptrdiff_t ldh, int nvalid, const fl_epi *epi)                              \
    {                                                                                                \
        float sums[RMAX * FL_PW] __attribute__((aligned(64)));                                       \
        __m512 accf[RMAX][4];                                                                        \
        for (int i = 0; i < R * FL_PW; i += 16) _mm512_store_ps(sums + i, _mm512_setzero_ps());      \
        if (Q) {                                                                                     \
            const int nq = (K + 3) / 4;                                                              \
            /* 8 accumulators a row with two planes, 4 with one (VNNI) */                            \
            const int pmax = PLANES == 1 ? MAX1 : 3;                                                 \
            const int n0 = R <= pmax ? R : (R == 4 ? 2 : 3), n1 = R - n0;                            \
            for (int p0 = 0, ch = 0; p0 < nq; p0 += FL_I8_KC / 4, ch++) {                            \
                const int p1 = p0 + FL_I8_KC / 4 < nq ? p0 + FL_I8_KC / 4 : nq;                      \
                CHUNK(n0, PLANES, p0, p1, Q, ldq, panel, corr + ch * FL_PW, sums);                   \
                if (n1 > 0)                                                                          \
                    CHUNK(n1, PLANES, p0, p1, Q + n0 * ldq, ldq, panel, corr + ch * FL_PW,           \
                          sums + n0 * FL_PW);                                                        \
            }                                                                                        \
        }                                                                                            \
        for (int r = 0; r < R; r++) {                                                                \
            const __m512 s = _mm512_set1_ps(Q ? hs[r] : 0.0f);                                       \
            const float *g = G + r * ldg;                                                            \
            for (int q = 0; q < 4; q++)                                                              \
                accf[r][q] = _mm512_fmadd_ps(_mm512_load_ps(sums + r * FL_PW + 16 * q),              \
                                             _mm512_mul_ps(_mm512_loadu_ps(scale + 16 * q), s),      \
                                             _mm512_loadu_ps(g + 16 * q));                           \
        }                                                                                            \
        if (!epi) { /* an input projection: the pre-activations are the output */                    \
            for (int r = 0; r < R; r++)                                                              \
                for (int q = 0; q < 4; q++) _mm512_storeu_ps(h + r * ldh + 16 * q, accf[r][q]);      \
            return;                                                                                  \
        }                                                                                            \
        epilogue(R, accf, c, ldc, h, ldh, nvalid, epi);                                              \
    }                                                                                                \
    static ATTR void NAME(int R, int K, const int16_t *Q, ptrdiff_t ldq, const float *hs,            \
                          const int8_t *panel, const int32_t *corr, int planes, const float *scale,  \
                          const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,          \
                          ptrdiff_t ldh, int nvalid, const fl_epi *epi)                              \
    {                                                                                                \
        (void)planes;                                                                                \
        switch (R) {                                                                                 \
        case 1: I8_ROWS(NAME, 1, PL); break;                                                         \
        case 2: I8_ROWS(NAME, 2, PL); break;                                                         \
        case 3: I8_ROWS(NAME, 3, PL); break;                                                         \
        case 4: I8_ROWS(NAME, 4, PL); break;                                                         \
        case 5: I8_ROWS(NAME, 5, PL); break;                                                         \
        default: I8_ROWS(NAME, 6, PL); break;                                                        \
        }                                                                                            \
    }

/* PL: the planes the chunk kernel tells apart (vpmaddwd multiplies the
 * int16 codes whatever their bits: one instantiation) */
I8_KERNEL(lstmi8_vnni, i8_chunk_vnni, VNNI_TARGET, 6, planes)
I8_KERNEL(lstmi8_bw, i8_chunk_bw, , 3, 2)

static void lstmi8_avx512(int R, int K, const int16_t *Q, ptrdiff_t ldq, const float *hs,
                          const int8_t *panel, const int32_t *corr, int planes, const float *scale,
                          const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,
                          ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    (fl_use_vnni ? lstmi8_vnni : lstmi8_bw)(R, K, Q, ldq, hs, panel, corr, planes, scale, G, ldg, c,
                                            ldc, h, ldh, nvalid, epi);
}

const fl_kernels_f32 fl_kernels_f32_avx512 = {RMAX, gemm_avx512, lstm_avx512, lstmq_avx512, lstmq2_avx512,
                                                lstmi8_avx512, lstmb_avx512, lstmb2_avx512, lstmx_avx512,
                                                "avx512"};

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif /* FL_X86 */
