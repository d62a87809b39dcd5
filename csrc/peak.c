/*
 * peak.c -- the machine's float32 FMA throughput, measured: a diagnostic for
 * the benchmarks' "fraction of peak" (fastlstm._engine.fma_peak_gflops).
 * 12 independent accumulator chains of vector FMAs in registers (more than
 * latency x throughput on current x86 cores), no memory traffic.
 */
#define _GNU_SOURCE
#include <stdatomic.h>
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

/* ------------------------------------------------------- read bandwidth */
#define RB_CHUNK ((size_t)64 << 10)

#if defined(FL_X86)
/* Sum of n bytes (n a multiple of 512) with 8 independent vector adds in
 * flight: enough loads in flight to reach L1's rate, so the caches' rates
 * below it are what limits. */
__attribute__((target("avx512f"))) static float rb_sum512_(const float *p, size_t n)
{
    __m512 s[8];
    for (int i = 0; i < 8; i++) s[i] = _mm512_setzero_ps();
    for (size_t k = 0; k < n / sizeof(float); k += 128)
        for (int i = 0; i < 8; i++) s[i] = _mm512_add_ps(s[i], _mm512_load_ps(p + k + 16 * i));
    for (int i = 1; i < 8; i++) s[0] = _mm512_add_ps(s[0], s[i]);
    return _mm512_reduce_add_ps(s[0]);
}
__attribute__((target("avx2"))) static float rb_sum256_(const float *p, size_t n)
{
    __m256 s[8];
    for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_ps();
    for (size_t k = 0; k < n / sizeof(float); k += 64)
        for (int i = 0; i < 8; i++) s[i] = _mm256_add_ps(s[i], _mm256_load_ps(p + k + 8 * i));
    for (int i = 1; i < 8; i++) s[0] = _mm256_add_ps(s[0], s[i]);
    float lane0;
    memcpy(&lane0, &s[0], sizeof lane0);
    return lane0;
}
#endif

static float rb_sum_portable_(const float *p, size_t n)
{
    /* integer ORs of 8-byte words: vectorized by the compiler at any -O */
    const uint64_t *q = (const uint64_t *)(const void *)p;
    uint64_t s[8] = {0};
    for (size_t k = 0; k < n / 8; k += 8)
        for (int i = 0; i < 8; i++) s[i] |= q[k + i];
    uint64_t r = s[0] | s[1] | s[2] | s[3] | s[4] | s[5] | s[6] | s[7];
    return (float)(r & 1u);
}

typedef struct {
    float *buf;
    size_t bytes;   /* a multiple of 512 * nthreads */
    long passes;    /* 0: only write each slice once (first touch, warm-up) */
    int isa;
    float sink[FL_MAX_THREADS * 16];
} rb_job;

static void rb_task_(void *arg, int tid, int nthreads)
{
    rb_job *j = (rb_job *)arg;
    size_t lo = j->bytes / nthreads * tid, len = j->bytes / nthreads;
    char *base = (char *)j->buf + lo;
    if (j->passes == 0) {
        memset(base, 0, len);
        return;
    }
    size_t nchunk = (len + RB_CHUNK - 1) / RB_CHUNK;
    float acc = 0;
    for (long p = 0; p < j->passes; p++)
        for (size_t c = 0; c < nchunk; c++) {
            size_t ci = (p & 1) ? nchunk - 1 - c : c;
            size_t off = ci * RB_CHUNK, n = len - off < RB_CHUNK ? len - off : RB_CHUNK;
            const float *q = (const float *)(const void *)(base + off);
#if defined(FL_X86)
            if (j->isa == FL_ISA_AVX512) acc += rb_sum512_(q, n);
            else if (j->isa == FL_ISA_AVX2) acc += rb_sum256_(q, n);
            else
#endif
                acc += rb_sum_portable_(q, n);
        }
    j->sink[tid * 16] = acc; /* one cache line per thread */
}

double fl_read_bw_gbps(size_t bytes, int nthreads, double seconds, int *used)
{
    if (used) *used = 0;
    if (bytes == 0) return -1;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > fl_num_cpus()) nthreads = fl_num_cpus(); /* as the engine: no more workers than CPUs */
    if (nthreads > FL_MAX_THREADS) nthreads = FL_MAX_THREADS;
    if (!(seconds > 0)) seconds = 0.2;
    const size_t unit = (size_t)512 * (size_t)nthreads;
    if (bytes > ((size_t)1 << 40)) return -1;
    bytes = (bytes + unit - 1) / unit * unit;
    rb_job *j = (rb_job *)fl_aligned_alloc(sizeof(rb_job));
    if (!j) return -1;
    memset(j, 0, sizeof *j);
    j->buf = (float *)fl_aligned_alloc(bytes);
    if (!j->buf) {
        fl_aligned_free(j);
        return -1;
    }
    j->bytes = bytes;
    j->isa = fl_isa_active();
    const int reps = 5;
    double best = 0;
    int ran = 0;
    j->passes = 0;
    fl_pool_run(rb_task_, j, nthreads); /* each thread writes its own slice */
    long passes = 1;
    for (int r = 0; r < reps; r++) {
        double t;
        for (;;) {
            j->passes = passes;
            double t0 = fl_now_();
            ran = fl_pool_run(rb_task_, j, nthreads);
            t = fl_now_() - t0;
            if (t >= seconds / reps || passes > (1L << 40) / (long)(bytes / 64 + 1)) break;
            passes *= 2;
        }
        double g = (double)bytes * (double)passes / t * 1e-9;
        if (g > best) best = g;
    }
    fl_aligned_free(j->buf);
    fl_aligned_free(j);
    if (used) *used = ran;
    return best;
}

/* ---- the pool's two threads: the time a cache line takes to go there and back */

typedef struct {
    _Alignas(64) atomic_long ping; /* written by thread 0 only */
    _Alignas(64) atomic_long pong; /* written by thread 1 only */
    _Alignas(64) long n;           /* round trips per run (warm-up: n / 8 more first) */
    double ns;                     /* thread 0: mean ns per round trip of the timed ones */
} pp_job;

static void pp_task_(void *arg, int tid, int nthreads)
{
    pp_job *j = (pp_job *)arg;
    if (nthreads < 2 || tid > 1) return;
    const long warm = j->n / 8 + 1, total = warm + j->n;
    if (tid == 1) {
        for (long i = 1; i <= total; i++) {
            while (atomic_load_explicit(&j->ping, memory_order_acquire) != i) FL_PAUSE();
            atomic_store_explicit(&j->pong, i, memory_order_release);
        }
        return;
    }
    double t0 = 0;
    for (long i = 1; i <= total; i++) {
        if (i == warm + 1) t0 = fl_now_();
        atomic_store_explicit(&j->ping, i, memory_order_release);
        while (atomic_load_explicit(&j->pong, memory_order_acquire) != i) FL_PAUSE();
    }
    j->ns = (fl_now_() - t0) * 1e9 / (double)j->n;
}

double fl_core_roundtrip_ns(double seconds)
{
    if (!(seconds > 0)) seconds = 0.05;
    if (fl_num_cpus() < 2) return -1;
    pp_job *j = (pp_job *)fl_aligned_alloc(sizeof(pp_job));
    if (!j) return -3;
    memset(j, 0, sizeof *j);
    enum { REPS = 5 };
    double r[REPS];
    j->n = 1000;
    for (int k = 0; k < REPS; k++) {
        for (;;) {
            atomic_store(&j->ping, 0);
            atomic_store(&j->pong, 0);
            double t0 = fl_now_();
            if (fl_pool_run(pp_task_, j, 2) < 2) { /* the pool is held or congested: no partner */
                fl_aligned_free(j);
                return -2;
            }
            double t = fl_now_() - t0;
            if (t >= seconds / REPS || j->n >= (1L << 30)) break;
            j->n *= 2;
        }
        r[k] = j->ns;
    }
    fl_aligned_free(j);
    for (int a = 1; a < REPS; a++) /* median of the runs */
        for (int b = a; b > 0 && r[b] < r[b - 1]; b--) { double t = r[b]; r[b] = r[b - 1]; r[b - 1] = t; }
    return r[REPS / 2];
}
