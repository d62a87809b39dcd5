#define _GNU_SOURCE
/*
 * engine.c -- weight packing, the forward driver (engine_impl.h, once per
 * dtype), CPU dispatch and the floating-point environment.
 */
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "fl_internal.h"
#if defined(FL_X86)
#include <immintrin.h>
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* ------------------------------------------------------------------ memory */
/* Buffers of FL_HUGE_MIN bytes and more (large models' packed weights, the
 * workspaces that go with them) start on a 2 MB boundary and ask Linux for
 * transparent huge pages (MADV_HUGEPAGE: honoured when THP is "always" or
 * "madvise", the usual default; a no-op otherwise).  A batch-1 step streams
 * all of W_hh: with 4 KB pages a 16 MB W_hh is 4096 pages, more than the
 * second-level TLB holds, and the hardware prefetchers restart at every
 * page.  Measured on Zen 4 (a throwaway read loop over 64 KB chunks, best of
 * 7, three alternations): 16 MB 68-70 -> 72-77 GB/s, 32 MB 29-31 -> 35-37
 * GB/s, 8 MB and less unchanged.  The padding costs address space, not
 * memory (untouched pages are never backed). */
#define FL_HUGE_MIN ((size_t)4 << 20)
#define FL_HUGE_ALIGN ((size_t)2 << 20)

void *fl_aligned_alloc(size_t bytes)
{
    void *p = NULL;
    if (bytes == 0) bytes = FL_ALIGN;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= FL_HUGE_MIN) {
        if (posix_memalign(&p, FL_HUGE_ALIGN, bytes) != 0) return NULL;
        (void)madvise(p, bytes, MADV_HUGEPAGE); /* advice only: errors are harmless */
        return p;
    }
#endif
    if (posix_memalign(&p, FL_ALIGN, bytes) != 0) return NULL;
    return p;
}

void fl_aligned_free(void *p) { free(p); }

/* ------------------------------------------------------- cache tuning */
/* The K chunk bounds how long a panel slice must stay in L1 while the row
 * tiles stream over it; each chunk boundary costs a store and a reload of
 * the accumulators.  The panel prefetch fetches the next block's W_hh into
 * L2 while a compute-bound step works on this one.  Measured with
 * benchmarks/run_all.py configurations:
 * - Sapphire Rapids-class Xeon (48 KB L1d, 2 MB L2): K chunk 128 (32 KB
 *   slices), prefetch ~1.5% faster at batch 32-64.
 * - AMD Zen 4 (32 KB L1d, 1 MB L2 feeding ~28 B/cycle, enough for the 6 x 64
 *   micro-kernel's 4 loads per 24 FMAs): the larger the chunk the better,
 *   512 ran 8-13% faster than 80 at batch 8-32 (no chunking for K <= 512);
 *   the prefetch cost 3-4% at batch 32-64 (the hardware prefetcher already
 *   streams the panels).
 * - AMD Zen 5 (48 KB L1d, 1 MB L2, two 512-bit FMA pipes): the same choices
 *   hold; the prefetch cost 2-6% at batch 32-64 (C harness, alternating).
 * The G chunk (the input projection of a chunk of time steps, read back by
 * those steps) is sized to stay in L2 beside the panels the steps stream:
 * 1 MB of the Xeon's 2 MB; on Zen 4's 1 MB L2 512 KB ran 2-4% faster than
 * 1 MB at batch 8-64 (fewer steps per chunk).
 * So: AMD (Zen: cpuid family >= 0x17) 512 without prefetch and a G chunk of
 * half the L2 (cpuid 0x80000006: 512 KB on Zen 4's 1 MB, 256 KB on Zen 2/3's
 * 512 KB), otherwise 128 with prefetch and 1 MB.  The G chunk sizes the
 * workspace, so it is fixed at the first use and cannot be set. */
int fl_kc = 0;
int fl_pf_panel = 1;
size_t fl_gchunk = (size_t)1 << 20;
static int g_tuned = 0;

void fl_tune_init(void)
{
    if (g_tuned) return;
    int kc = 128, pf = 1;
    size_t gchunk = (size_t)1 << 20;
#if defined(FL_X86)
    unsigned a, b, c, d;
    if (__get_cpuid(0, &a, &b, &c, &d) && b == 0x68747541u /* "Auth"enticAMD */
        && __get_cpuid(1, &a, &b, &c, &d)) {
        unsigned fam = (a >> 8) & 0xf;
        if (fam == 0xf) fam += (a >> 20) & 0xff;
        if (fam >= 0x17) {
            kc = 512;
            pf = 0;
            gchunk = (size_t)512 << 10;
            if (__get_cpuid(0x80000006u, &a, &b, &c, &d) && (c >> 16) >= 256)
                gchunk = (size_t)(c >> 16) << 9; /* L2 KB (ECX[31:16]) / 2, in bytes */
        }
    }
#endif
    fl_kc = kc;
    fl_pf_panel = pf;
    fl_gchunk = gchunk;
    g_tuned = 1;
}

int fl_tune_set(int knob, int value)
{
    fl_tune_init();
    switch (knob) {
    case FL_TUNE_KC:
        if (value > 0) fl_kc = value < 16 ? 16 : value / 16 * 16;
        return fl_kc;
    case FL_TUNE_PREFETCH:
        if (value >= 0) fl_pf_panel = value != 0;
        return fl_pf_panel;
    case FL_TUNE_GCHUNK: /* read-only: it sizes workspaces already allocated */
        return (int)fl_gchunk;
    default:
        return -1;
    }
}

/* ------------------------------------------------------------- dispatch */
static int g_isa_detected = -1;
static int g_isa_active = -1;
static int g_vnni_detected = 0;
int fl_use_vnni = 0;
static int g_bf16dot_detected = 0;
int fl_use_bf16dot = 0;

#if defined(FL_X86)
static unsigned long long fl_xgetbv0(void)
{
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

int fl_isa_detected(void)
{
    if (g_isa_detected >= 0) return g_isa_detected;
    int isa = FL_ISA_PORTABLE;
#if defined(FL_X86)
    unsigned a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
        if (osxsave && avx) {
            unsigned long long xcr0 = fl_xgetbv0();
            int ymm_ok = (xcr0 & 0x6) == 0x6;
            int zmm_ok = (xcr0 & 0xe6) == 0xe6;
            if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
                int avx2 = (b >> 5) & 1;
                int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
                if (ymm_ok && avx2 && fma) isa = FL_ISA_AVX2;
                if (isa == FL_ISA_AVX2 && zmm_ok && f && dq && bw && vl) isa = FL_ISA_AVX512;
                g_vnni_detected = isa == FL_ISA_AVX512 && ((c >> 11) & 1); /* AVX512_VNNI */
                fl_use_vnni = g_vnni_detected;
            }
#if defined(FL_HAVE_BF16_ASM)
            if (isa == FL_ISA_AVX512 && __get_cpuid_count(7, 1, &a, &b, &c, &d))
                g_bf16dot_detected = (a >> 5) & 1; /* AVX512_BF16 */
            fl_use_bf16dot = g_bf16dot_detected;
#endif
        }
    }
#endif
    g_isa_detected = isa;
    fl_tune_init();
    return isa;
}

int fl_isa_active(void)
{
    if (g_isa_active < 0) g_isa_active = fl_isa_detected();
    return g_isa_active;
}

int fl_isa_set(int isa)
{
    int best = fl_isa_detected();
    if (isa < FL_ISA_PORTABLE) isa = FL_ISA_PORTABLE;
    if (isa > best) isa = best;
    g_isa_active = isa;
    return isa;
}

int fl_int8_vnni_set(int on)
{
    fl_isa_detected();
    if (on >= 0) fl_use_vnni = on && g_vnni_detected;
    return fl_use_vnni;
}

int fl_bf16_dot_set(int on)
{
    fl_isa_detected();
    if (on >= 0) fl_use_bf16dot = on && g_bf16dot_detected;
    return fl_use_bf16dot;
}

const char *fl_isa_name(int isa)
{
    switch (isa) {
    case FL_ISA_AVX512: return "avx512";
    case FL_ISA_AVX2: return "avx2";
    case FL_ISA_PORTABLE: return "portable";
    default: return "unknown";
    }
}

const fl_kernels_f32 *fl_kernels_f32_active(void)
{
#if defined(FL_X86)
    switch (fl_isa_active()) {
    case FL_ISA_AVX512: return &fl_kernels_f32_avx512;
    case FL_ISA_AVX2: return &fl_kernels_f32_avx2;
    default: break;
    }
#endif
    return &fl_kernels_f32_portable;
}

/* --------------------------------------------------------- fp environment */
unsigned fl_fpenv_enter(void)
{
#if defined(FL_X86)
    unsigned saved = _mm_getcsr();
    /* FTZ | DAZ, and round to nearest even whatever the caller's mode (the
     * int16 quantization of h for int8 weights relies on it). */
    _mm_setcsr((saved & ~0x6000u) | 0x8040u);
    return saved;
#else
    return 0;
#endif
}

void fl_fpenv_leave(unsigned saved)
{
#if defined(FL_X86)
    _mm_setcsr(saved);
#else
    (void)saved;
#endif
}

/* ------------------------------------------------- int16 quantization of h */
/* The byte planes of fl_quantize_h: hi = high byte + 128 (as unsigned: the
 * high byte xor 0x80), lo = low byte. */
static void quantize_h_planes_(const int16_t *q, int npad)
{
    uint8_t *hi = (uint8_t *)(q + npad), *lo = hi + npad;
    for (int k = 0; k < npad; k++) {
        uint16_t u = (uint16_t)q[k];
        hi[k] = (uint8_t)((u >> 8) ^ 0x80u);
        lo[k] = (uint8_t)(u & 0xffu);
    }
}

void fl_quantize_h(const float *h, int n, int npad, int bits, int16_t *q, float *hs)
{
    const float qmax = bits == 8 ? (float)FL_HQ8_MAX : (float)FL_HQ_MAX;
    const int shift = bits == 8 ? 8 : 0; /* 8 bits: q = 256 * q8 */
    float m = 0.0f;
    int bad = 0, k = 0;
#if defined(FL_X86)
    const __m128 absmask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    const __m128 big = _mm_set1_ps(3.40282347e38f);
    __m128 vm = _mm_setzero_ps(), vbad = _mm_setzero_ps();
    for (; k + 4 <= n; k += 4) {
        __m128 a = _mm_and_ps(_mm_loadu_ps(h + k), absmask);
        vbad = _mm_or_ps(vbad, _mm_cmpnle_ps(a, big)); /* Inf or NaN */
        vm = _mm_max_ps(vm, a);
    }
    bad = _mm_movemask_ps(vbad) != 0;
    float lanes[4];
    _mm_storeu_ps(lanes, vm);
    for (int i = 0; i < 4; i++)
        if (lanes[i] > m) m = lanes[i];
#endif
    for (; k < n; k++) {
        float a = fabsf(h[k]);
        if (!(a <= 3.40282347e38f)) bad = 1;
        else if (a > m) m = a;
    }
    if (bad || !(m >= FL_HQ_MIN)) {
        memset(q, 0, (size_t)npad * sizeof *q);
        *hs = bad ? NAN : 0.0f;
        quantize_h_planes_(q, npad);
        return;
    }
    const float inv = qmax / m;
    /* 8 bits: m / 127 times 2^-8 (exact: m >= FL_HQ_MIN keeps it normal) */
    *hs = bits == 8 ? m / qmax * 0x1p-8f : m / qmax;
    k = 0;
#if defined(FL_X86)
    const __m128 vinv = _mm_set1_ps(inv);
    const __m128 hi = _mm_set1_ps(qmax), lo = _mm_set1_ps(-qmax);
    for (; k + 8 <= n; k += 8) {
        __m128 y0 = _mm_min_ps(_mm_max_ps(_mm_mul_ps(_mm_loadu_ps(h + k), vinv), lo), hi);
        __m128 y1 = _mm_min_ps(_mm_max_ps(_mm_mul_ps(_mm_loadu_ps(h + k + 4), vinv), lo), hi);
        /* cvtps2dq rounds to nearest even (MXCSR, set by fl_fpenv_enter) */
        __m128i i0 = _mm_sll_epi32(_mm_cvtps_epi32(y0), _mm_cvtsi32_si128(shift));
        __m128i i1 = _mm_sll_epi32(_mm_cvtps_epi32(y1), _mm_cvtsi32_si128(shift));
        _mm_storeu_si128((__m128i *)(q + k), _mm_packs_epi32(i0, i1));
    }
#endif
    for (; k < n; k++) {
        float y = h[k] * inv;
        y = y > qmax ? qmax : (y < -qmax ? -qmax : y);
        /* the current rounding: nearest even (fl_fpenv_enter) */
        q[k] = (int16_t)((int32_t)nearbyintf(y) * (1 << shift));
    }
    for (k = n; k < npad; k++) q[k] = 0;
    quantize_h_planes_(q, npad);
}

/* ---------------------------------------------------------------- packing */
void fl_cell_opts_default(fl_cell_opts *o)
{
    memset(o, 0, sizeof *o);
    o->act[0] = FL_ACT_SIGMOID;
    o->act[1] = FL_ACT_TANH;
    o->act[2] = FL_ACT_TANH;
}

#define PACK_BODY(REAL)                                                                 \
    {                                                                                   \
        const REAL *wih = (const REAL *)w_ih, *whh = (const REAL *)w_hh;                \
        const REAL *b = (const REAL *)bias, *wr = (const REAL *)w_hr;                   \
        const REAL *pp = (const REAL *)peep;                                            \
        REAL *pih = (REAL *)cell->wih, *phh = (REAL *)cell->whh, *pb = (REAL *)cell->bias; \
        for (int j = 0; j < cell->nb; j++)                                              \
            for (int g = 0; g < 4; g++)                                                 \
                for (int l = 0; l < FL_BW; l++) {                                       \
                    int u = j * FL_BW + l, col = g * FL_BW + l;                         \
                    if (u >= H) continue;                                               \
                    size_t row = (size_t)g * H + u;                                     \
                    for (int k = 0; k < in; k++)                                        \
                        pih[((size_t)j * in + k) * FL_PW + col] = wih[row * in + k];    \
                    for (int k = 0; k < Hout; k++)                                      \
                        phh[((size_t)j * Hout + k) * FL_PW + col] = whh[row * Hout + k]; \
                    if (b) pb[(size_t)j * FL_PW + col] = b[row];                        \
                }                                                                       \
        if (wr) {                                                                       \
            REAL *pr = (REAL *)cell->whr;                                               \
            for (int p = 0; p < P; p++)                                                 \
                for (int k = 0; k < H; k++)                                             \
                    pr[((size_t)(p / FL_PW) * H + k) * FL_PW + p % FL_PW] = wr[(size_t)p * H + k]; \
        }                                                                               \
        if (pp) {                                                                       \
            REAL *pq = (REAL *)cell->peep;                                              \
            for (int q = 0; q < 3; q++)                                                 \
                for (int u = 0; u < H; u++)                                             \
                    pq[((size_t)(u / FL_BW) * 3 + q) * FL_BW + u % FL_BW] = pp[(size_t)q * H + u]; \
        }                                                                               \
    }

fl_cell *fl_cell_create(int dtype, int in, int H, int P, const void *w_ih, const void *w_hh,
                        const void *bias, const void *w_hr, const void *peep,
                        const fl_cell_opts *opts)
{
    if ((dtype != FL_F32 && dtype != FL_F64) || in < 0 || H < 1 || P < 0 || P > H)
        return NULL;
    if (!w_hh || (in > 0 && !w_ih) || (P > 0 && !w_hr)) return NULL;
    if (in > (1 << 28) || H > (1 << 24)) return NULL;
    size_t es = dtype == FL_F32 ? sizeof(float) : sizeof(double);
    fl_cell *cell = (fl_cell *)calloc(1, sizeof *cell);
    if (!cell) return NULL;
    cell->dtype = dtype;
    cell->act_bits = 16;
    cell->in = in; cell->H = H; cell->P = P; cell->Hout = P ? P : H;
    cell->nb = (H + FL_BW - 1) / FL_BW;
    cell->np = P ? (P + FL_PW - 1) / FL_PW : 0;
    int Hout = cell->Hout;
    size_t s_ih = (size_t)cell->nb * in * FL_PW * es;
    size_t s_hh = (size_t)cell->nb * Hout * FL_PW * es;
    size_t s_b = (size_t)cell->nb * FL_PW * es;
    size_t s_r = (size_t)cell->np * H * FL_PW * es;
    size_t s_p = peep ? (size_t)cell->nb * 3 * FL_BW * es : 0;
    cell->wih = fl_aligned_alloc(s_ih);
    cell->whh = fl_aligned_alloc(s_hh);
    cell->bias = fl_aligned_alloc(s_b);
    cell->whr = P ? fl_aligned_alloc(s_r) : NULL;
    cell->peep = peep ? fl_aligned_alloc(s_p) : NULL;
    if (!cell->wih || !cell->whh || !cell->bias || (P && !cell->whr) || (peep && !cell->peep)) {
        fl_cell_free(cell);
        return NULL;
    }
    memset(cell->wih, 0, s_ih);
    memset(cell->whh, 0, s_hh);
    memset(cell->bias, 0, s_b);
    if (P) memset(cell->whr, 0, s_r);
    if (peep) memset(cell->peep, 0, s_p);
    cell->bytes = s_ih + s_hh + s_b + s_r + s_p;
    if (dtype == FL_F32) PACK_BODY(float) else PACK_BODY(double)
    if (opts) cell->opts = *opts; else fl_cell_opts_default(&cell->opts);
    cell->is_default = !peep && cell->opts.act[0] == FL_ACT_SIGMOID &&
                       cell->opts.act[1] == FL_ACT_TANH && cell->opts.act[2] == FL_ACT_TANH &&
                       !(cell->opts.clip > 0) && !(cell->opts.cell_clip > 0) &&
                       !cell->opts.input_forget;
    return cell;
}

void fl_cell_free(fl_cell *cell)
{
    if (!cell) return;
    fl_aligned_free(cell->wih);
    fl_aligned_free(cell->whh);
    fl_aligned_free(cell->bias);
    fl_aligned_free(cell->whr);
    fl_aligned_free(cell->peep);
    fl_aligned_free(cell->whhq);
    fl_aligned_free(cell->whh_scale);
    fl_aligned_free(cell->whh_corr);
    fl_aligned_free(cell->wihq);
    fl_aligned_free(cell->wih_scale);
    fl_aligned_free(cell->wih_corr);
    free(cell);
}

/* The canonical row (gate g, unit u: g*H + u) behind packed column col of
 * hidden block j, or -1 for a padding column (u >= H). */
static long packed_row_(int H, int j, int col)
{
    int u = j * FL_BW + col % FL_BW;
    return u < H ? (long)(col / FL_BW) * H + u : -1;
}

/* int8 panels of a (4H, K) row-major matrix with per-row scales, k-quad
 * interleaved (fl_internal.h), with their per-chunk offsets for vpdpbusd.
 * Returns the bytes of the three, or 0 (out of memory; nothing allocated). */
static size_t pack_i8_(const fl_cell *cell, int K, const int8_t *w, const float *scale,
                       void **panels, float **pscale, int32_t **pcorr)
{
    const int H = cell->H, Kp = fl_whhq_rows(FL_W_I8, K), nch = fl_i8_chunks(K);
    const size_t bytes = (size_t)cell->nb * Kp * FL_PW;
    const size_t corr_n = (size_t)cell->nb * nch * FL_PW;
    int8_t *q = (int8_t *)fl_aligned_alloc(bytes > 0 ? bytes : 1);
    float *sc = (float *)fl_aligned_alloc((size_t)cell->nb * FL_PW * sizeof(float));
    int32_t *corr = (int32_t *)fl_aligned_alloc((corr_n > 0 ? corr_n : 1) * sizeof(int32_t));
    if (!q || !sc || !corr) {
        fl_aligned_free(q);
        fl_aligned_free(sc);
        fl_aligned_free(corr);
        return 0;
    }
    memset(q, 0, bytes);
    memset(sc, 0, (size_t)cell->nb * FL_PW * sizeof(float));
    memset(corr, 0, corr_n * sizeof(int32_t));
    for (int j = 0; j < cell->nb; j++)
        for (int col = 0; col < FL_PW; col++) {
            long row = packed_row_(H, j, col);
            if (row < 0) continue;
            for (int k = 0; k < K; k++) {
                int8_t v = w[(size_t)row * K + k];
                q[(size_t)j * Kp * FL_PW + (size_t)(k / 4) * 4 * FL_PW + 4 * col + k % 4] = v;
                /* |sum| <= 128 * FL_I8_KC, times 32768: within int32 */
                corr[((size_t)j * nch + k / FL_I8_KC) * FL_PW + col] -= 32768 * (int32_t)v;
            }
            sc[(size_t)j * FL_PW + col] = scale[row];
        }
    *panels = q;
    *pscale = sc;
    *pcorr = corr;
    return bytes + (size_t)cell->nb * FL_PW * sizeof(float) + corr_n * sizeof(int32_t);
}

/* bfloat16 (4H, K) row-major -> nb k-pair panels (FL_W_BF16D, fl_internal.h)
 * at *dst; returns their bytes, 0 if out of memory. */
static size_t pack_bf16d_(const fl_cell *cell, int K, const uint16_t *w, void **dst)
{
    const int Kp = fl_whhq_rows(FL_W_BF16D, K);
    size_t bytes = (size_t)cell->nb * Kp * FL_PW * 2;
    uint16_t *p = (uint16_t *)fl_aligned_alloc(bytes);
    if (!p) return 0;
    memset(p, 0, bytes);
    for (int j = 0; j < cell->nb; j++)
        for (int col = 0; col < FL_PW; col++) {
            long row = packed_row_(cell->H, j, col);
            if (row < 0) continue;
            for (int k = 0; k < K; k++)
                p[(size_t)j * Kp * FL_PW + (size_t)(k / 2) * 2 * FL_PW + 2 * col + k % 2] =
                    w[(size_t)row * K + k];
        }
    *dst = p;
    return bytes;
}

int fl_cell_set_whh_reduced(fl_cell *cell, int wtype, const void *w, const float *scale)
{
    if (!cell || cell->dtype != FL_F32 || wtype < FL_W_F16 || wtype > FL_W_BF16D) return -1;
    if (!cell->whh) return -1; /* reduced once already */
    if (!w || (wtype == FL_W_I8 && !scale)) return -1;
    const int H = cell->H, Hout = cell->Hout;
    size_t bytes;
    if (wtype == FL_W_I8) {
        bytes = pack_i8_(cell, Hout, (const int8_t *)w, scale, &cell->whhq, &cell->whh_scale,
                         &cell->whh_corr);
        if (!bytes) return -2;
    } else if (wtype == FL_W_BF16D) {
        bytes = pack_bf16d_(cell, Hout, (const uint16_t *)w, &cell->whhq);
        if (!bytes) return -2;
    } else {
        bytes = (size_t)cell->nb * Hout * FL_PW * 2;
        cell->whhq = fl_aligned_alloc(bytes);
        if (!cell->whhq) return -2;
        memset(cell->whhq, 0, bytes);
        for (int j = 0; j < cell->nb; j++)
            for (int col = 0; col < FL_PW; col++) {
                long row = packed_row_(H, j, col);
                if (row < 0) continue;
                for (int k = 0; k < Hout; k++) { /* bfloat16: columns interleaved (fl_internal.h) */
                    size_t dst = ((size_t)j * Hout + k) * FL_PW +
                                 (wtype == FL_W_BF16 ? FL_BF16_POS(col) : col);
                    ((uint16_t *)cell->whhq)[dst] = ((const uint16_t *)w)[(size_t)row * Hout + k];
                }
            }
    }
    /* The float32 panels are no longer needed: free them (a cell goes back
     * to float32 by being created again from the canonical weights). */
    fl_aligned_free(cell->whh);
    cell->whh = NULL;
    cell->wtype = wtype;
    cell->bytes += bytes - (size_t)cell->nb * Hout * FL_PW * sizeof(float);
    return 0;
}

int fl_cell_set_wih_reduced(fl_cell *cell, int wtype, const void *w, const float *scale)
{
    if (!cell || cell->dtype != FL_F32 || (wtype != FL_W_I8 && wtype != FL_W_BF16D) || !w ||
        (wtype == FL_W_I8 && !scale))
        return -1;
    if (!cell->wih || cell->in < 1) return -1; /* reduced once already, or no input */
    size_t bytes = wtype == FL_W_I8
        ? pack_i8_(cell, cell->in, (const int8_t *)w, scale, &cell->wihq, &cell->wih_scale,
                   &cell->wih_corr)
        : pack_bf16d_(cell, cell->in, (const uint16_t *)w, &cell->wihq);
    if (!bytes) return -2;
    cell->wih_type = wtype;
    fl_aligned_free(cell->wih);
    cell->wih = NULL;
    cell->bytes += bytes - (size_t)cell->nb * cell->in * FL_PW * sizeof(float);
    return 0;
}

int fl_cell_set_act_bits(fl_cell *cell, int bits)
{
    if (!cell || cell->dtype != FL_F32 || (bits != 8 && bits != 16)) return -1;
    cell->act_bits = bits;
    return 0;
}

int fl_cell_dtype(const fl_cell *cell) { return cell->dtype; }
size_t fl_cell_packed_bytes(const fl_cell *cell) { return cell->bytes; }

/* ---------------------------------------------------------------- driver */
#define REAL float
#define SFX f32
#define KERNELS_T fl_kernels_f32
#define KERNELS fl_kernels_f32_active()
#define FL_HAVE_LSTMQ 1
#include "engine_impl.h"
#undef FL_HAVE_LSTMQ
#undef REAL
#undef SFX
#undef KERNELS_T
#undef KERNELS

#define REAL double
#define SFX f64
#define KERNELS_T fl_kernels_f64
#define KERNELS (&fl_kernels_f64_portable)
#include "engine_impl.h"

static int check_stack(fl_cell *const *cells, int L, int D)
{
    if (!cells || L < 1 || (D != 1 && D != 2)) return -1;
    const fl_cell *c0 = cells[0];
    if (!c0) return -1;
    for (int l = 0; l < L; l++)
        for (int d = 0; d < D; d++) {
            const fl_cell *c = cells[l * D + d];
            if (!c || c->dtype != c0->dtype || c->H != c0->H || c->P != c0->P) return -1;
            if (l > 0 && c->in != D * c0->Hout) return -1;
            if (l == 0 && c->in != c0->in) return -1;
        }
    return 0;
}

size_t fl_workspace_bytes(fl_cell *const *cells, int L, int D, int T, int N)
{
    int TC, qc, ldx;
    size_t a, b, c, q, xq, xqs, cx;
    if (check_stack(cells, L, D) != 0 || T < 0 || N < 0) return 0;
    if (cells[0]->dtype == FL_F32)
        return plan_f32(cells, L, D, T, N, &TC, &a, &b, &c, &q, &qc, &xq, &xqs, &ldx, &cx);
    return plan_f64(cells, L, D, T, N, &TC, &a, &b, &c, &q, &qc, &xq, &xqs, &ldx, &cx);
}

int fl_forward(fl_cell *const *cells, int L, int D, const fl_io *io, void *ws, int nthreads)
{
    if (check_stack(cells, L, D) != 0) return -1;
    if (!io || io->T < 0 || io->N < 0 || !io->hn || !io->cn || !ws) return -2;
    if (io->T > 0 && io->N > 0 && (!io->x || !io->y)) return -2;
    if (nthreads <= 0) nthreads = fl_num_threads_get();
    if (cells[0]->dtype == FL_F32) return forward_f32(cells, L, D, io, ws, nthreads);
    return forward_f64(cells, L, D, io, ws, nthreads);
}
