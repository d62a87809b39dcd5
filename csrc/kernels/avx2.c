/*
 * AVX2 + FMA float32 kernels.  Compiled for that target through the pragma
 * below; run only when dispatch saw AVX2, FMA and OS support for ymm state.
 *
 * A block's 64 columns are 8 ymm.  One row: 8 accumulators over the whole
 * block in one pass over K (weights as memory operands).  R = 2..6 rows
 * (RMAX): a register tile of R rows x V ymm (V = 4 for R <= 3, else 2:
 * 8-12 accumulators, enough independent FMA chains to cover the FMA
 * latency, and each weight load feeds R FMAs instead of one), 8 / V passes
 * over K, each reading its own 32 or 64 bytes of every panel row, so the
 * panel is still read once.  Every column is still one chain in k order
 * from its initial value: bitwise the sums of one row at a time (and of the
 * portable kernels).  Same formulas and constants as fl_math.h.
 */
#include "../fl_internal.h"
#include "../fl_math.h"

#if defined(FL_X86)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>

#define AI static inline __attribute__((always_inline))

/* 1/d: rcp (12 bits) and one Newton step (~2^-23). */
AI __m256 v_rcp(__m256 d)
{
    __m256 y = _mm256_rcp_ps(d);
    return _mm256_fmadd_ps(y, _mm256_fnmadd_ps(d, y, _mm256_set1_ps(1.0f)), y);
}

/* exp of n vectors (n <= 4) in place, each statement across all n:
 * fl_expf (fl_math.h) lane by lane, for arguments already within
 * [FL_EXP_LO, FL_EXP_HI] or NaN (so without its clamp); independent chains
 * side by side instead of one chain's latency at a time. */
AI void v_exp_n(const int n, __m256 *x)
{
    __m256 t[4], r[4], p[4];
    _Pragma("GCC unroll 4") for (int i = 0; i < n; i++)
        t[i] = _mm256_round_ps(_mm256_mul_ps(x[i], _mm256_set1_ps(FL_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _Pragma("GCC unroll 4") for (int i = 0; i < n; i++)
    {
        r[i] = _mm256_fnmadd_ps(t[i], _mm256_set1_ps(FL_LN2_HI), x[i]);
        r[i] = _mm256_fnmadd_ps(t[i], _mm256_set1_ps(FL_LN2_LO), r[i]);
    }
    _Pragma("GCC unroll 4") for (int i = 0; i < n; i++)
        p[i] = _mm256_fmadd_ps(_mm256_set1_ps(FL_EXP_P0), r[i], _mm256_set1_ps(FL_EXP_P1));
    _Pragma("GCC unroll 4") for (int i = 0; i < n; i++)
        p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(FL_EXP_P2));
    _Pragma("GCC unroll 4") for (int i = 0; i < n; i++)
        p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(FL_EXP_P3));
    _Pragma("GCC unroll 4") for (int i = 0; i < n; i++)
        p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(FL_EXP_P4));
    _Pragma("GCC unroll 4") for (int i = 0; i < n; i++)
        p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(FL_EXP_P5));
    _Pragma("GCC unroll 4") for (int i = 0; i < n; i++)
    {
        __m256 y = _mm256_fmadd_ps(p[i], _mm256_mul_ps(r[i], r[i]),
                                   _mm256_add_ps(r[i], _mm256_set1_ps(1.0f)));
        __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(t[i]), _mm256_set1_epi32(127)), 23);
        x[i] = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    }
}

/* tanh(x) from rc = 1/(exp(tanh_exp_arg(x)) + 1): fl_tanhf's two branches,
 * both computed and blended. */
AI __m256 tanh_from_rcp(__m256 x, __m256 rc)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    __m256 small = _mm256_cmp_ps(_mm256_andnot_ps(signbit, x), _mm256_set1_ps(FL_TANH_SMALL), _CMP_LT_OQ);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(FL_TANH_T0);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(FL_TANH_T1));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(FL_TANH_T2));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(FL_TANH_T3));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(FL_TANH_T4));
    __m256 ts = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    __m256 tb = _mm256_fnmadd_ps(_mm256_set1_ps(2.0f), rc, one);
    tb = _mm256_or_ps(tb, _mm256_and_ps(x, signbit));
    return _mm256_blendv_ps(tb, ts, small);
}

/* The argument of tanh's exponential: 2 min(|x|, FL_TANH_CLAMP). */
AI __m256 tanh_exp_arg(__m256 x)
{
    __m256 ac = _mm256_min_ps(_mm256_set1_ps(FL_TANH_CLAMP), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x));
    return _mm256_add_ps(ac, ac);
}

/* The argument of sigmoid's exponential: -x, x clamped to +-FL_SIG_CLAMP. */
AI __m256 sig_exp_arg(__m256 x)
{
    x = _mm256_max_ps(_mm256_set1_ps(-FL_SIG_CLAMP), x);
    x = _mm256_min_ps(_mm256_set1_ps(FL_SIG_CLAMP), x);
    return _mm256_sub_ps(_mm256_setzero_ps(), x);
}

AI __m256 v_tanh(__m256 x)
{
    __m256 e = tanh_exp_arg(x);
    v_exp_n(1, &e);
    return tanh_from_rcp(x, v_rcp(_mm256_add_ps(e, _mm256_set1_ps(1.0f))));
}

AI void dot(int K, const float *a, const float *panel, __m256 acc[8])
{
    __m256 a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    __m256 a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
    for (int k = 0; k < K; k++) {
        const float *w = panel + (size_t)k * FL_PW;
        __m256 b = _mm256_broadcast_ss(a + k);
        a0 = _mm256_fmadd_ps(b, _mm256_load_ps(w), a0);
        a1 = _mm256_fmadd_ps(b, _mm256_load_ps(w + 8), a1);
        a2 = _mm256_fmadd_ps(b, _mm256_load_ps(w + 16), a2);
        a3 = _mm256_fmadd_ps(b, _mm256_load_ps(w + 24), a3);
        a4 = _mm256_fmadd_ps(b, _mm256_load_ps(w + 32), a4);
        a5 = _mm256_fmadd_ps(b, _mm256_load_ps(w + 40), a5);
        a6 = _mm256_fmadd_ps(b, _mm256_load_ps(w + 48), a6);
        a7 = _mm256_fmadd_ps(b, _mm256_load_ps(w + 56), a7);
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
    acc[4] = a4; acc[5] = a5; acc[6] = a6; acc[7] = a7;
}

static __m256i tail_mask(int n)
{
    int m[8];
    for (int i = 0; i < 8; i++) m[i] = i < n ? -1 : 0;
    return _mm256_loadu_si256((const __m256i *)m);
}

#define RMAX 6

/* acc[r][v] += A[r][k] * p[k * FL_PW + 8 v], k < K: R rows x V ymm of one
 * pass (p: the panel at the pass's first column). */
AI void tile_rv(const int R, const int V, int K, const float *A, ptrdiff_t lda, const float *p,
                __m256 acc[RMAX][4])
{
    for (int k = 0; k < K; k++) {
        const float *w = p + (size_t)k * FL_PW;
        __m256 b[4];
        _Pragma("GCC unroll 4") for (int v = 0; v < V; v++) b[v] = _mm256_load_ps(w + 8 * v);
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
        {
            const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
            _Pragma("GCC unroll 4") for (int v = 0; v < V; v++) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
        }
    }
}

/* R >= 2 rows of pre-activations of a whole block into pre[r][64]: each
 * pass's columns start from init (row stride ldi, 0: one row for all; NULL:
 * zero), then sum A1's K1 rows and A2's K2 rows (A2 may be NULL). */
AI void block_rv(const int R, const int V, const float *init, ptrdiff_t ldi,
                 int K1, const float *A1, ptrdiff_t lda1, const float *p1,
                 int K2, const float *A2, ptrdiff_t lda2, const float *p2,
                 float pre[RMAX][FL_PW], int ncols)
{
    for (int c0 = 0; c0 < ncols; c0 += 8 * V) {
        __m256 acc[RMAX][4];
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
            _Pragma("GCC unroll 4") for (int v = 0; v < V; v++)
                acc[r][v] = init ? _mm256_loadu_ps(init + r * ldi + c0 + 8 * v) : _mm256_setzero_ps();
        tile_rv(R, V, K1, A1, lda1, p1 + c0, acc);
        if (A2) tile_rv(R, V, K2, A2, lda2, p2 + c0, acc);
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
            _Pragma("GCC unroll 4") for (int v = 0; v < V; v++)
                _mm256_store_ps(pre[r] + c0 + 8 * v, acc[r][v]);
    }
}

/* block_rv for R = 2..RMAX rows, V by R (see the top of the file). */
static void block_r(int R, const float *init, ptrdiff_t ldi, int K1, const float *A1, ptrdiff_t lda1,
                    const float *p1, int K2, const float *A2, ptrdiff_t lda2, const float *p2,
                    float pre[RMAX][FL_PW], int ncols)
{
    switch (R) {
    case 2: block_rv(2, 4, init, ldi, K1, A1, lda1, p1, K2, A2, lda2, p2, pre, ncols); break;
    case 3: block_rv(3, 4, init, ldi, K1, A1, lda1, p1, K2, A2, lda2, p2, pre, ncols); break;
    case 4: block_rv(4, 2, init, ldi, K1, A1, lda1, p1, K2, A2, lda2, p2, pre, ncols); break;
    case 5: block_rv(5, 2, init, ldi, K1, A1, lda1, p1, K2, A2, lda2, p2, pre, ncols); break;
    default: block_rv(6, 2, init, ldi, K1, A1, lda1, p1, K2, A2, lda2, p2, pre, ncols); break;
    }
}

/* The gate math on one row of pre-activations (i, f, g, o x 16 lanes). */
static inline __attribute__((always_inline)) void epilogue1(__m256 acc[8], float *cr, ptrdiff_t ldc,
                                                           float *hr, ptrdiff_t ldh, int nvalid,
                                                           const fl_epi *epi)
{
        if (!epi->is_default) {
            float pre[FL_PW] __attribute__((aligned(32)));
            for (int q = 0; q < 8; q++) _mm256_store_ps(pre + 8 * q, acc[q]);
            fl_epilogue_generic_f32(1, pre, cr, ldc, hr, ldh, nvalid, epi);
            return;
        }
        /* fl_math.h's sigmoid and tanh, the four gates' exponentials of a
         * half side by side (v_exp_n); sigmoid's 1 + exp(-x) and tanh's
         * exp(2|x|) + 1 share one reciprocal pass.  A whole block: both
         * halves' tanh(c_t) side by side too (two chains instead of one
         * after the other; the same operations on every lane). */
        if (nvalid >= FL_BW) {
            const __m256 one = _mm256_set1_ps(1.0f);
            __m256 cn[2], o[2];
            for (int half = 0; half < 2; half++) {
                __m256 e[4] = {sig_exp_arg(acc[0 + half]), sig_exp_arg(acc[2 + half]),
                               tanh_exp_arg(acc[4 + half]), sig_exp_arg(acc[6 + half])};
                v_exp_n(4, e);
                for (int k = 0; k < 4; k++) e[k] = v_rcp(_mm256_add_ps(one, e[k]));
                __m256 gg = tanh_from_rcp(acc[4 + half], e[2]);
                float *cp = cr + 8 * half;
                cn[half] = _mm256_fmadd_ps(e[1], _mm256_loadu_ps(cp), _mm256_mul_ps(e[0], gg));
                _mm256_storeu_ps(cp, cn[half]);
                o[half] = e[3];
            }
            __m256 t[2] = {tanh_exp_arg(cn[0]), tanh_exp_arg(cn[1])};
            v_exp_n(2, t);
            for (int half = 0; half < 2; half++)
                _mm256_storeu_ps(hr + 8 * half, _mm256_mul_ps(o[half], tanh_from_rcp(
                                                    cn[half], v_rcp(_mm256_add_ps(t[half], one)))));
            return;
        }
        for (int half = 0; half < 2; half++) {
            int n = nvalid - 8 * half;
            if (n <= 0) break;
            const __m256 one = _mm256_set1_ps(1.0f);
            __m256 e[4] = {sig_exp_arg(acc[0 + half]), sig_exp_arg(acc[2 + half]),
                           tanh_exp_arg(acc[4 + half]), sig_exp_arg(acc[6 + half])};
            v_exp_n(4, e);
            for (int k = 0; k < 4; k++) e[k] = v_rcp(_mm256_add_ps(one, e[k]));
            __m256 i = e[0], f = e[1], o = e[3];
            __m256 gg = tanh_from_rcp(acc[4 + half], e[2]);
            float *cp = cr + 8 * half, *hp = hr + 8 * half;
            if (n >= 8) {
                __m256 cn = _mm256_fmadd_ps(f, _mm256_loadu_ps(cp), _mm256_mul_ps(i, gg));
                _mm256_storeu_ps(cp, cn);
                _mm256_storeu_ps(hp, _mm256_mul_ps(o, v_tanh(cn)));
            } else {
                __m256i m = tail_mask(n);
                __m256 cn = _mm256_fmadd_ps(f, _mm256_maskload_ps(cp, m), _mm256_mul_ps(i, gg));
                _mm256_maskstore_ps(cp, m, cn);
                _mm256_maskstore_ps(hp, m, _mm256_mul_ps(o, v_tanh(cn)));
            }
        }
}

/* The gate math on R >= 2 staged rows (pre[r]: i, f, g, o x 16): epilogue1's
 * operations, each row-half's gates as there, then the tanh(c_t) of four
 * row-halves side by side. */
static void epilogue_rows(int R, float pre[RMAX][FL_PW], float *c, ptrdiff_t ldc, float *h,
                          ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    if (!epi->is_default || nvalid < FL_BW) {
        for (int r = 0; r < R; r++) {
            __m256 acc[8];
            for (int q = 0; q < 8; q++) acc[q] = _mm256_load_ps(pre[r] + 8 * q);
            epilogue1(acc, c + r * ldc, ldc, h + r * ldh, ldh, nvalid, epi);
        }
        return;
    }
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 cs[2 * RMAX], os[2 * RMAX];
    for (int m = 0; m < 2 * R; m++) {
        const float *p = pre[m >> 1] + 8 * (m & 1);
        const __m256 g = _mm256_load_ps(p + 32);
        __m256 e[4] = {sig_exp_arg(_mm256_load_ps(p)), sig_exp_arg(_mm256_load_ps(p + 16)),
                       tanh_exp_arg(g), sig_exp_arg(_mm256_load_ps(p + 48))};
        v_exp_n(4, e);
        for (int k = 0; k < 4; k++) e[k] = v_rcp(_mm256_add_ps(one, e[k]));
        __m256 gg = tanh_from_rcp(g, e[2]);
        float *cp = c + (m >> 1) * ldc + 8 * (m & 1);
        cs[m] = _mm256_fmadd_ps(e[1], _mm256_loadu_ps(cp), _mm256_mul_ps(e[0], gg));
        _mm256_storeu_ps(cp, cs[m]);
        os[m] = e[3];
    }
    for (int m0 = 0; m0 < 2 * R; m0 += 4) {
        __m256 t[4];
        if (2 * R - m0 >= 4) {
            for (int i = 0; i < 4; i++) t[i] = tanh_exp_arg(cs[m0 + i]);
            v_exp_n(4, t);
        } else {
            for (int i = 0; i < 2; i++) t[i] = tanh_exp_arg(cs[m0 + i]);
            v_exp_n(2, t);
        }
        const int n = 2 * R - m0 >= 4 ? 4 : 2;
        for (int i = 0; i < n; i++) {
            const int m = m0 + i;
            _mm256_storeu_ps(h + (m >> 1) * ldh + 8 * (m & 1),
                             _mm256_mul_ps(os[m], tanh_from_rcp(cs[m], v_rcp(_mm256_add_ps(t[i], one)))));
        }
    }
}

static void gemm_avx2(int R, int K, const float *A, ptrdiff_t lda, const float *panel,
                      const float *init, ptrdiff_t ldi, float *out, ptrdiff_t ldo, int ncols)
{
    if (R >= 2) {
        float pre[RMAX][FL_PW] __attribute__((aligned(32)));
        /* whole passes (a projection's last block may be narrower) */
        block_r(R, init, ldi, K, A, lda, panel, 0, NULL, 0, NULL, pre, ncols);
        for (int r = 0; r < R; r++) {
            float *o = out + r * ldo;
            for (int q = 0; q < 8; q++) {
                int n = ncols - 8 * q;
                if (n >= 8) _mm256_storeu_ps(o + 8 * q, _mm256_load_ps(pre[r] + 8 * q));
                else if (n > 0) _mm256_maskstore_ps(o + 8 * q, tail_mask(n), _mm256_load_ps(pre[r] + 8 * q));
            }
        }
        return;
    }
    for (int r = 0; r < R; r++) {
        __m256 acc[8];
        for (int q = 0; q < 8; q++)
            acc[q] = init ? _mm256_loadu_ps(init + r * ldi + 8 * q) : _mm256_setzero_ps();
        dot(K, A + r * lda, panel, acc);
        float *o = out + r * ldo;
        for (int q = 0; q < 8; q++) {
            int n = ncols - 8 * q;
            if (n >= 8) _mm256_storeu_ps(o + 8 * q, acc[q]);
            else if (n > 0) _mm256_maskstore_ps(o + 8 * q, tail_mask(n), acc[q]);
        }
    }
}

static void lstm_avx2(int R, int K, const float *A, ptrdiff_t lda, const float *panel,
                      const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,
                      ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    if (R >= 2 && A) {
        float pre[RMAX][FL_PW] __attribute__((aligned(32)));
        block_r(R, G, ldg, K, A, lda, panel, 0, NULL, 0, NULL, pre, FL_PW);
        epilogue_rows(R, pre, c, ldc, h, ldh, nvalid, epi);
        return;
    }
    for (int r = 0; r < R; r++) {
        __m256 acc[8];
        const float *g = G + r * ldg;
        for (int q = 0; q < 8; q++) acc[q] = _mm256_loadu_ps(g + 8 * q);
        if (A) dot(K, A + r * lda, panel, acc);
        epilogue1(acc, c + r * ldc, ldc, h + r * ldh, ldh, nvalid, epi);
    }
}

/* float16 (F16C) / bfloat16 (a shift) W_hh widened to float32. */
static void lstmq_avx2(int wtype, int R, int K, const float *A, ptrdiff_t lda,
                       const void *panel, const float *scale, const float *G, ptrdiff_t ldg,
                       float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh, int nvalid,
                       const fl_epi *epi)
{
    (void)scale;
    for (int r = 0; r < R; r++) {
        __m256 acc[8];
        for (int q = 0; q < 8; q++) acc[q] = _mm256_setzero_ps();
        if (A) {
            const float *a = A + r * lda;
            for (int k = 0; k < K; k++) {
                __m256 b = _mm256_broadcast_ss(a + k);
                const uint16_t *p = (const uint16_t *)panel + (size_t)k * FL_PW;
                if (wtype == FL_W_F16) {
                    for (int q = 0; q < 8; q++)
                        acc[q] = _mm256_fmadd_ps(b, _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(p + 8 * q))), acc[q]);
                } else { /* 32 bytes: columns 8u..8u+7 (low halves), 8u+16.. (high) */
                    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
                    for (int u = 0; u < 8; u += 4)
                        for (int v = 0; v < 2; v++) {
                            __m256i x = _mm256_load_si256((const __m256i *)(p + 8 * u + 16 * v));
                            acc[u + v] = _mm256_fmadd_ps(b, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)), acc[u + v]);
                            acc[u + v + 2] = _mm256_fmadd_ps(b, _mm256_castsi256_ps(_mm256_and_si256(x, hi)), acc[u + v + 2]);
                        }
                }
            }
        }
        const float *g = G + r * ldg;
        for (int q = 0; q < 8; q++) acc[q] = _mm256_add_ps(acc[q], _mm256_loadu_ps(g + 8 * q));
        epilogue1(acc, c + r * ldc, ldc, h + r * ldh, ldh, nvalid, epi);
    }
}

/* int8 W_hh times int16 h (fl_lstmi8_f32): vpmaddwd + vpaddd, exact.  16
 * bytes of a k quad are 4 columns x 4 k; widened and multiplied with
 * (q[k] .. q[k+3]) they give each column two pair sums in adjacent lanes,
 * added at the end of the chunk (vphaddd, then vpermq to column order).
 * 32 columns per pass keep the 8 accumulators in registers. */
static void lstmi8_avx2(int R, int K, const int16_t *Q, ptrdiff_t ldq, const float *hs,
                        const int8_t *panel, const int32_t *corr, int planes, const float *scale,
                        const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,
                        ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    (void)corr; /* the byte split's offset: this kernel multiplies the int16 h */
    (void)planes;
    const int nq = (K + 3) / 4;
    for (int r = 0; r < R; r++) {
        /* chunk sums in memory: the 8 int32 accumulators keep the registers */
        float sums[FL_PW] __attribute__((aligned(32)));
        __m256 accf[8];
        for (int q = 0; q < 8; q++) _mm256_store_ps(sums + 8 * q, _mm256_setzero_ps());
        if (Q) {
            const int16_t *qr = Q + r * ldq;
            for (int p0 = 0; p0 < nq; p0 += FL_I8_KC / 4) {
                const int p1 = p0 + FL_I8_KC / 4 < nq ? p0 + FL_I8_KC / 4 : nq;
                for (int half = 0; half < 2; half++) {
                    __m256i acc[8];
                    for (int q = 0; q < 8; q++) acc[q] = _mm256_setzero_si256();
                    for (int p = p0; p < p1; p++) {
                        const int8_t *w = panel + (size_t)p * 4 * FL_PW + half * 2 * FL_PW;
                        const __m256i b = _mm256_set1_epi64x(fl_ld_i64(qr + 4 * p));
                        for (int q = 0; q < 8; q++)
                            acc[q] = _mm256_add_epi32(acc[q], _mm256_madd_epi16(
                                _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)(w + 16 * q))), b));
                    }
                    for (int m = 0; m < 4; m++) {
                        /* acc[2m]: columns 8m+0..3, acc[2m+1]: 8m+4..7, two lanes each */
                        __m256i v = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[2 * m], acc[2 * m + 1]), 0xD8);
                        float *sp = sums + half * 32 + 8 * m;
                        _mm256_store_ps(sp, _mm256_add_ps(_mm256_load_ps(sp), _mm256_cvtepi32_ps(v)));
                    }
                }
            }
        }
        const __m256 s = _mm256_set1_ps(Q ? hs[r] : 0.0f);
        const float *g = G + r * ldg;
        for (int q = 0; q < 8; q++)
            accf[q] = _mm256_fmadd_ps(_mm256_load_ps(sums + 8 * q), _mm256_mul_ps(_mm256_loadu_ps(scale + 8 * q), s),
                                      _mm256_loadu_ps(g + 8 * q));
        if (!epi) { /* an input projection: the pre-activations are the output */
            for (int q = 0; q < 8; q++) _mm256_storeu_ps(h + r * ldh + 8 * q, accf[q]);
            continue;
        }
        epilogue1(accf, c + r * ldc, ldc, h + r * ldh, ldh, nvalid, epi);
    }
}

/* bfloat16 W_hh times bfloat16 h (fl_lstmb_f32): 32 bytes of a k pair are
 * 8 columns x 2 k; widened exactly, two FMAs per column (odd k first), whose
 * products are exact: vdpbf16ps's sums. */
static void lstmb_avx2(int R, int K, const uint16_t *B, ptrdiff_t ldb, const void *panel,
                       const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,
                       ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    const int np = (K + 1) / 2;
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    for (int r = 0; r < R; r++) {
        __m256 acc[8];
        for (int q = 0; q < 8; q++) acc[q] = _mm256_setzero_ps();
        if (B) {
            const uint16_t *b = B + r * ldb;
            for (int p = 0; p < np; p++) {
                const __m256 b0 = _mm256_set1_ps(fl_bf16_to_f32(b[2 * p]));
                const __m256 b1 = _mm256_set1_ps(fl_bf16_to_f32(b[2 * p + 1]));
                const uint16_t *w = (const uint16_t *)panel + (size_t)p * 2 * FL_PW;
                for (int q = 0; q < 8; q++) {
                    __m256i x = _mm256_load_si256((const __m256i *)(w + 16 * q));
                    acc[q] = _mm256_fmadd_ps(b1, _mm256_castsi256_ps(_mm256_and_si256(x, hi)), acc[q]);
                    acc[q] = _mm256_fmadd_ps(b0, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)), acc[q]);
                }
            }
        }
        const float *g = G + r * ldg;
        for (int q = 0; q < 8; q++) acc[q] = _mm256_add_ps(acc[q], _mm256_loadu_ps(g + 8 * q));
        if (!epi) { /* an input projection: the pre-activations are the output */
            for (int q = 0; q < 8; q++) _mm256_storeu_ps(h + r * ldh + 8 * q, acc[q]);
            continue;
        }
        epilogue1(acc, c + r * ldc, ldc, h + r * ldh, ldh, nvalid, epi);
    }
}

/* One time step with its input projection fused (fl_lstmx_f32): bias, the
 * Kx input rows, then the K rows of h_{t-1}, continuing the same chains --
 * gemm's G then lstm's reload of it, bit for bit, without G's round trip. */
static void lstmx_avx2(int R, int Kx, const float *X, ptrdiff_t ldx, const float *wx,
                       const float *bias, int K, const float *A, ptrdiff_t lda, const float *panel,
                       float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    if (R >= 2) {
        float pre[RMAX][FL_PW] __attribute__((aligned(32)));
        block_r(R, bias, 0, Kx, X, ldx, wx, K, A, lda, panel, pre, FL_PW);
        epilogue_rows(R, pre, c, ldc, h, ldh, nvalid, epi);
        return;
    }
    for (int r = 0; r < R; r++) {
        __m256 acc[8];
        for (int q = 0; q < 8; q++) acc[q] = _mm256_loadu_ps(bias + 8 * q);
        dot(Kx, X + r * ldx, wx, acc);
        if (A) dot(K, A + r * lda, panel, acc);
        epilogue1(acc, c + r * ldc, ldc, h + r * ldh, ldh, nvalid, epi);
    }
}

const fl_kernels_f32 fl_kernels_f32_avx2 = {RMAX, gemm_avx2, lstm_avx2, lstmq_avx2, NULL, lstmi8_avx2,
                                          lstmb_avx2, NULL, lstmx_avx2, "avx2"};

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif /* FL_X86 */
