/*
 * fl_math.h -- scalar activations shared by every float32 path.
 *
 * The SIMD kernels use exactly these formulas and constants, lane by lane,
 * so every ISA computes the same function (results may differ in the last
 * bits through FMA contraction and the reciprocal refinement).
 *   exp:      Cody-Waite reduction x = n*ln2 + r, |r| <= ln2/2, and the
 *             degree-5 minimax polynomial of Cephes' expf (about 1 ulp).
 *   sigmoid:  1 / (1 + exp(-x)), x clamped to [-FL_SIG_CLAMP, FL_SIG_CLAMP]
 *             (error of the clamp < 1e-13).
 *   tanh:     |x| < 0.625: Cephes' odd polynomial (keeps relative accuracy
 *             near 0); otherwise 1 - 2/(exp(2|x|) + 1) with |x| clamped to 9
 *             (tanh(9) = 1 - 3e-8), sign restored.
 * Clamps are written so that NaN passes through (a comparison with NaN is
 * false and the value is kept).
 */
#ifndef FL_MATH_H
#define FL_MATH_H

#include <stdint.h>
#include <string.h>

#define FL_EXP_HI 88.0f
#define FL_EXP_LO (-87.0f)
#define FL_LOG2E 1.44269504088896341f
#define FL_LN2_HI 0.693359375f
#define FL_LN2_LO (-2.12194440e-4f)
#define FL_EXP_P0 1.9875691500E-4f
#define FL_EXP_P1 1.3981999507E-3f
#define FL_EXP_P2 8.3334519073E-3f
#define FL_EXP_P3 4.1665795894E-2f
#define FL_EXP_P4 1.6666665459E-1f
#define FL_EXP_P5 5.0000001201E-1f
#define FL_SIG_CLAMP 30.0f
#define FL_TANH_CLAMP 9.0f
#define FL_TANH_SMALL 0.625f
#define FL_TANH_T0 (-5.70498872745E-3f)
#define FL_TANH_T1 2.06390887954E-2f
#define FL_TANH_T2 (-5.37397155531E-2f)
#define FL_TANH_T3 1.33314422036E-1f
#define FL_TANH_T4 (-3.33332819422E-1f)

static inline float fl_expf(float x)
{
    if (x > FL_EXP_HI) x = FL_EXP_HI;
    if (x < FL_EXP_LO) x = FL_EXP_LO;
    float n = __builtin_rintf(x * FL_LOG2E);
    float r = x - n * FL_LN2_HI;
    r = r - n * FL_LN2_LO;
    float p = FL_EXP_P0;
    p = p * r + FL_EXP_P1;
    p = p * r + FL_EXP_P2;
    p = p * r + FL_EXP_P3;
    p = p * r + FL_EXP_P4;
    p = p * r + FL_EXP_P5;
    float y = p * (r * r) + r + 1.0f;
    int32_t ni = (x == x) ? (int32_t)n : 0;
    uint32_t bits = (uint32_t)(ni + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static inline float fl_sigmoidf(float x)
{
    if (x > FL_SIG_CLAMP) x = FL_SIG_CLAMP;
    if (x < -FL_SIG_CLAMP) x = -FL_SIG_CLAMP;
    return 1.0f / (1.0f + fl_expf(-x));
}

static inline float fl_tanhf(float x)
{
    float a = x < 0 ? -x : x;
    if (a < FL_TANH_SMALL) {
        float z = x * x;
        float p = FL_TANH_T0;
        p = p * z + FL_TANH_T1;
        p = p * z + FL_TANH_T2;
        p = p * z + FL_TANH_T3;
        p = p * z + FL_TANH_T4;
        return p * z * x + x;
    }
    if (a > FL_TANH_CLAMP) a = FL_TANH_CLAMP;
    float t = 1.0f - 2.0f / (fl_expf(2.0f * a) + 1.0f);
    return x < 0 ? -t : t; /* NaN: a is NaN, t is NaN */
}

#endif
