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

/* Reduced-precision W_hh: weights widened to float32 one at a time. */
static void lstmq_portable_f32(int wtype, int R, int K, const float *A, ptrdiff_t lda,
                               const void *panel, const float *scale, const float *G,
                               ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh,
                               int nvalid, const fl_epi *epi)
{
    for (int r = 0; r < R; r++) {
        float acc[FL_PW];
        for (int col = 0; col < FL_PW; col++) acc[col] = 0.0f;
        if (A) {
            const float *a = A + r * lda;
            for (int k = 0; k < K; k++) {
                const float ak = a[k];
                size_t o = (size_t)k * FL_PW;
                switch (wtype) {
                case FL_W_F16:
                    for (int col = 0; col < FL_PW; col++)
                        acc[col] += ak * fl_f16_to_f32(((const uint16_t *)panel)[o + col]);
                    break;
                case FL_W_BF16:
                    for (int col = 0; col < FL_PW; col++)
                        acc[col] += ak * fl_bf16_to_f32(((const uint16_t *)panel)[o + col]);
                    break;
                default:
                    for (int col = 0; col < FL_PW; col++)
                        acc[col] += ak * (float)((const int8_t *)panel)[o + col];
                    break;
                }
            }
        }
        const float *g = G + r * ldg;
        for (int col = 0; col < FL_PW; col++)
            acc[col] = wtype == FL_W_I8 ? acc[col] * scale[col] + g[col] : acc[col] + g[col];
        float *cr = c + r * ldc, *hr = h + r * ldh;
        if (!epi->is_default)
            fl_epilogue_generic_f32(1, acc, cr, ldc, hr, ldh, nvalid, epi);
        else
            epilogue_default_f32(acc, cr, hr, nvalid);
    }
}

const fl_kernels_f32 fl_kernels_f32_portable = {1, gemm_portable_f32, lstm_portable_f32,
                                                lstmq_portable_f32, "portable"};
const fl_kernels_f64 fl_kernels_f64_portable = {1, gemm_portable_f64, lstm_portable_f64, "portable"};
