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

const fl_kernels_f32 fl_kernels_f32_portable = {1, gemm_portable_f32, lstm_portable_f32, "portable"};
const fl_kernels_f64 fl_kernels_f64_portable = {1, gemm_portable_f64, lstm_portable_f64, "portable"};
