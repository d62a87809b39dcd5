/*
 * The generic LSTM epilogue: every cell variant, scalar, in double precision
 * (the float32 result is rounded once at the end of each quantity).
 * Semantics follow ONNX Runtime's LSTM (uni_directional_lstm.cc):
 *   i = f(pre_i + P_i*c_{t-1})          (clip, if set, after adding peephole/bias)
 *   f = 1 - i (input_forget) or f(pre_f + P_f*c_{t-1})
 *   g = g(pre_g)
 *   c_t = f*c_{t-1} + i*g               (then TF1's cell_clip, if set)
 *   o = f(pre_o + P_o*c_t)              (the new cell, Graves 2013)
 *   h_t = o * h(c_t)
 */
#include <math.h>
#include "fl_internal.h"

static double act(int kind, double x, double alpha, double beta)
{
    switch (kind) {
    case FL_ACT_SIGMOID: return 1.0 / (1.0 + exp(-x));
    case FL_ACT_TANH: return tanh(x);
    case FL_ACT_RELU: return x > 0 ? x : (x == x ? 0.0 : x);
    case FL_ACT_HARDSIGMOID: {
        double y = alpha * x + beta;
        return y < 0 ? 0.0 : (y > 1 ? 1.0 : y);
    }
    case FL_ACT_AFFINE: return alpha * x + beta;
    case FL_ACT_LEAKYRELU: return x >= 0 ? x : (x == x ? alpha * x : x);
    case FL_ACT_THRESHOLDEDRELU: return x > alpha ? x : 0.0; /* NaN -> 0, as ONNX Runtime */
    case FL_ACT_SCALEDTANH: return alpha * tanh(beta * x);
    case FL_ACT_ELU: return x >= 0 ? x : (x == x ? alpha * (exp(x) - 1.0) : x);
    case FL_ACT_SOFTSIGN: return x / (1.0 + fabs(x));
    case FL_ACT_SOFTPLUS: return x > 30 ? x : log1p(exp(x));
    default: return NAN;
    }
}

static inline double clampd(double x, double lim)
{
    if (lim <= 0) return x;
    return x < -lim ? -lim : (x > lim ? lim : x);
}

#define GENERIC_BODY(REAL, PEEP_T)                                                  \
    const fl_cell_opts *o = epi->opts;                                              \
    const PEEP_T *P = (const PEEP_T *)epi->peep;                                    \
    for (int r = 0; r < R; r++) {                                                   \
        const REAL *p = pre + r * FL_PW;                                            \
        REAL *cr = c + r * ldc, *hr = h + r * ldh;                                  \
        for (int l = 0; l < nvalid; l++) {                                          \
            double cp = cr[l];                                                      \
            double xi = p[l], xf = p[FL_BW + l], xg = p[2 * FL_BW + l],             \
                   xo = p[3 * FL_BW + l];                                           \
            if (P) { xi += (double)P[l] * cp; xf += (double)P[FL_BW + l] * cp; }    \
            double gi = act(o->act[0], clampd(xi, o->clip), o->alpha[0], o->beta[0]); \
            double gf = o->input_forget                                             \
                ? 1.0 - gi                                                          \
                : act(o->act[0], clampd(xf, o->clip), o->alpha[0], o->beta[0]);     \
            double gg = act(o->act[1], clampd(xg, o->clip), o->alpha[1], o->beta[1]); \
            double cn = gf * cp + gi * gg;                                          \
            if (o->cell_clip > 0) cn = clampd(cn, o->cell_clip);                    \
            REAL cnr = (REAL)cn;                                                    \
            if (P) xo += (double)P[2 * FL_BW + l] * (double)cnr;                    \
            double go = act(o->act[0], clampd(xo, o->clip), o->alpha[0], o->beta[0]); \
            cr[l] = cnr;                                                            \
            hr[l] = (REAL)(go * act(o->act[2], (double)cnr, o->alpha[2], o->beta[2])); \
        }                                                                           \
    }

void fl_epilogue_generic_f32(int R, const float *pre, float *c, ptrdiff_t ldc,
                             float *h, ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    GENERIC_BODY(float, float)
}

void fl_epilogue_generic_f64(int R, const double *pre, double *c, ptrdiff_t ldc,
                             double *h, ptrdiff_t ldh, int nvalid, const fl_epi *epi)
{
    GENERIC_BODY(double, double)
}
