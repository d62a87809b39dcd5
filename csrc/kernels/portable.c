/* Portable C kernels: the reference path every SIMD path must agree with,
 * and the only path for float64. Compiled with baseline flags. */
#include <math.h>
#include "../fl_internal.h"
#include "../fl_math.h"

#define REAL float
#define SFX f32
#define SIGMOID(x) fl_sigmoidf(x)
#define TANH(x) fl_tanhf(x)
#define EPI_GENERIC fl_epilogue_generic_f32
#include "portable_impl.h"
#undef REAL
#undef SFX
#undef SIGMOID
#undef TANH
#undef EPI_GENERIC

#define REAL double
#define SFX f64
#define SIGMOID(x) (1.0 / (1.0 + exp(-(x))))
#define TANH(x) tanh(x)
#define EPI_GENERIC fl_epilogue_generic_f64
#include "portable_impl.h"

/* float16 / bfloat16 W_hh: weights widened to float32 one at a time. */
static void lstmq_portable_f32(int wtype, int R, int K, const float *A, ptrdiff_t lda,
                               const void *panel, const float *scale, const float *G,
                               ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh,
                               int nvalid, const fl_epi *epi)
{
    (void)scale;
    for (int r = 0; r < R; r++) {
        float acc[FL_PW];
        for (int col = 0; col < FL_PW; col++) acc[col] = 0.0f;
        if (A) {
            const float *a = A + r * lda;
            for (int k = 0; k < K; k++) {
                const float ak = a[k];
                const uint16_t *w = (const uint16_t *)panel + (size_t)k * FL_PW;
                if (wtype == FL_W_F16)
                    for (int col = 0; col < FL_PW; col++) acc[col] += ak * fl_f16_to_f32(w[col]);
                else
                    for (int col = 0; col < FL_PW; col++)
                        acc[col] += ak * fl_bf16_to_f32(w[FL_BF16_POS(col)]);
            }
        }
        const float *g = G + r * ldg;
        for (int col = 0; col < FL_PW; col++) acc[col] = acc[col] + g[col];
        float *cr = c + r * ldc, *hr = h + r * ldh;
        if (!epi->is_default)
            fl_epilogue_generic_f32(1, acc, cr, ldc, hr, ldh, nvalid, epi);
        else
            epilogue_default_f32(acc, cr, hr, nvalid);
    }
}

/* int8 W_hh times int16 h in plain int32 C: the formula of fl_lstmi8_f32
 * (fl_internal.h) that the SIMD paths reproduce bitwise. */
static void lstmi8_portable_f32(int R, int K, const int16_t *Q, ptrdiff_t ldq, const float *hs,
                                const int8_t *panel, const int32_t *corr, int planes, const float *scale,
                                const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,
                                ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    (void)corr; /* the byte split's offset: this kernel multiplies the int16 h */
    (void)planes;
    const int nq = (K + 3) / 4; /* k quads; pad k are zero on both sides */
    for (int r = 0; r < R; r++) {
        float accf[FL_PW], pre[FL_PW];
        for (int col = 0; col < FL_PW; col++) accf[col] = 0.0f;
        if (Q) {
            const int16_t *q = Q + r * ldq;
            for (int p0 = 0; p0 < nq; p0 += FL_I8_KC / 4) {
                int p1 = p0 + FL_I8_KC / 4 < nq ? p0 + FL_I8_KC / 4 : nq;
                int32_t acc[FL_PW];
                for (int col = 0; col < FL_PW; col++) acc[col] = 0;
                for (int p = p0; p < p1; p++) {
                    const int8_t *w = panel + (size_t)p * 4 * FL_PW;
                    const int32_t q0 = q[4 * p], q1 = q[4 * p + 1], q2 = q[4 * p + 2], q3 = q[4 * p + 3];
                    for (int col = 0; col < FL_PW; col++)
                        acc[col] += (int32_t)w[4 * col] * q0 + (int32_t)w[4 * col + 1] * q1 +
                                    (int32_t)w[4 * col + 2] * q2 + (int32_t)w[4 * col + 3] * q3;
                }
                for (int col = 0; col < FL_PW; col++) accf[col] += (float)acc[col];
            }
        }
        const float s = Q ? hs[r] : 0.0f;
        const float *g = G + r * ldg;
        for (int col = 0; col < FL_PW; col++) pre[col] = fmaf(accf[col], scale[col] * s, g[col]);
        float *cr = c + r * ldc, *hr = h + r * ldh;
        if (!epi) { /* an input projection: the pre-activations are the output */
            memcpy(hr, pre, sizeof pre);
            continue;
        }
        if (!epi->is_default)
            fl_epilogue_generic_f32(1, pre, cr, ldc, hr, ldh, nvalid, epi);
        else
            epilogue_default_f32(pre, cr, hr, nvalid);
    }
}

/* bfloat16 W_hh times bfloat16 h (fl_lstmb_f32): the products are exact in
 * float32, so each `acc += w * b` is the one rounding vdpbf16ps makes. */
static void lstmb_portable_f32(int R, int K, const uint16_t *B, ptrdiff_t ldb, const void *panel,
                               const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,
                               ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    const int np = (K + 1) / 2; /* k pairs; a pad k is zero on both sides */
    for (int r = 0; r < R; r++) {
        float acc[FL_PW];
        for (int col = 0; col < FL_PW; col++) acc[col] = 0.0f;
        if (B) {
            const uint16_t *b = B + r * ldb;
            for (int p = 0; p < np; p++) {
                const float b0 = fl_bf16_to_f32(b[2 * p]), b1 = fl_bf16_to_f32(b[2 * p + 1]);
                const uint16_t *w = (const uint16_t *)panel + (size_t)p * 2 * FL_PW;
                for (int col = 0; col < FL_PW; col++) {
                    acc[col] += fl_bf16_to_f32(w[2 * col + 1]) * b1;
                    acc[col] += fl_bf16_to_f32(w[2 * col]) * b0;
                }
            }
        }
        const float *g = G + r * ldg;
        for (int col = 0; col < FL_PW; col++) acc[col] = acc[col] + g[col];
        float *cr = c + r * ldc, *hr = h + r * ldh;
        if (!epi) { /* an input projection: the pre-activations are the output */
            memcpy(hr, acc, sizeof acc);
            continue;
        }
        if (!epi->is_default)
            fl_epilogue_generic_f32(1, acc, cr, ldc, hr, ldh, nvalid, epi);
        else
            epilogue_default_f32(acc, cr, hr, nvalid);
    }
}

const fl_kernels_f32 fl_kernels_f32_portable = {1, gemm_portable_f32, lstm_portable_f32,
                                                lstmq_portable_f32, NULL, lstmi8_portable_f32,
                                                lstmb_portable_f32, NULL, NULL, "portable"};
const fl_kernels_f64 fl_kernels_f64_portable = {1, gemm_portable_f64, lstm_portable_f64, "portable"};
