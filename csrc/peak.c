/*
 * peak.c -- the machine's float32 FMA throughput, measured: a diagnostic for
 * the benchmarks' "fraction of peak" (fastlstm._engine.fma_peak_gflops).
 * 12 independent accumulator chains of vector FMAs in registers (more than
 * latency x throughput on current x86 cores), no memory traffic.
 */
#define _GNU_SOURCE
#include <time.h>
#include "fl_internal.h"
#if defined(FL_X86)
#include <immintrin.h>
#endif

static double fl_now_(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

#define PEAK_LOOP(V, SET1, FMA, ADD)                                             \
    V a0 = SET1(1e-3f), a1 = SET1(2e-3f), a2 = SET1(3e-3f), a3 = SET1(4e-3f);   \
    V a4 = SET1(5e-3f), a5 = SET1(6e-3f), a6 = SET1(7e-3f), a7 = SET1(8e-3f);   \
    V a8 = SET1(9e-3f), a9 = SET1(1e-2f), a10 = SET1(1.1e-2f), a11 = SET1(1.2e-2f); \
    const V b = SET1(0.999f), c = SET1(1e-6f);                                   \
    for (long i = 0; i < iters; i++) {                                           \
        a0 = FMA(a0, b, c); a1 = FMA(a1, b, c); a2 = FMA(a2, b, c);              \
        a3 = FMA(a3, b, c); a4 = FMA(a4, b, c); a5 = FMA(a5, b, c);              \
        a6 = FMA(a6, b, c); a7 = FMA(a7, b, c); a8 = FMA(a8, b, c);              \
        a9 = FMA(a9, b, c); a10 = FMA(a10, b, c); a11 = FMA(a11, b, c);          \
        __asm__ volatile("" ::: "memory");                                       \
    }                                                                            \
    V s = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7)));     \
    s = ADD(s, ADD(ADD(a8, a9), ADD(a10, a11)));                                 \
    float lane0;                                                                 \
    memcpy(&lane0, &s, sizeof lane0);                                            \
    return lane0;

#if defined(FL_X86)
__attribute__((target("avx512f"))) static float peak512_(long iters)
{
    PEAK_LOOP(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps)
}
__attribute__((target("avx2,fma"))) static float peak256_(long iters)
{
    PEAK_LOOP(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps)
}
#endif

/* Best of `reps` runs of ~seconds/reps each on the calling thread, GFLOP/s
 * (2 per lane per FMA), for the active ISA path; the portable path counts
 * scalar fmaf chains as the compiler emits them (no claim of a peak). */
double fl_fma_peak_gflops(double seconds)
{
    if (!(seconds > 0)) seconds = 0.2;
    const int reps = 5;
    int isa = fl_isa_active();
    int lanes = isa == FL_ISA_AVX512 ? 16 : isa == FL_ISA_AVX2 ? 8 : 1;
    double best = 0;
    volatile float sink = 0;
    long iters = 1 << 16;
    for (int r = 0; r < reps; r++) {
        double t, t0;
        for (;;) {
            t0 = fl_now_();
#if defined(FL_X86)
            if (isa == FL_ISA_AVX512) sink += peak512_(iters);
            else if (isa == FL_ISA_AVX2) sink += peak256_(iters);
            else
#endif
            {
                float a[12];
                for (int k = 0; k < 12; k++) a[k] = 1e-3f * (float)(k + 1);
                for (long i = 0; i < iters; i++) {
                    for (int k = 0; k < 12; k++) a[k] = a[k] * 0.999f + 1e-6f;
                    __asm__ volatile("" ::: "memory");
                }
                sink += a[0] + a[11];
            }
            t = fl_now_() - t0;
            if (t >= seconds / reps || iters > (1L << 40)) break;
            iters *= 2;
        }
        double g = 2.0 * 12.0 * lanes * (double)iters / t * 1e-9;
        if (g > best) best = g;
    }
    (void)sink;
    return best;
}
