/*
 * fl_internal.h -- what the engine, the kernels and the thread pool share.
 *
 * Packed layout (one layout for every ISA, so forcing another ISA never
 * needs a repack).  Hidden units are cut into blocks of FL_BW = 16; for block
 * j the four gates of its 16 units sit side by side in 64 columns:
 *     column  g*16 + l   <->  canonical row  g*H + j*16 + l   (g = i,f,g,o)
 * A "panel" is K rows of those 64 columns, contiguous:
 *     panel_j[k*64 + col] = W[row(col)][k]      (zero where j*16+l >= H)
 * so one recurrent step streams each panel front to back.  The projection
 * W_hr (P, H) is packed the same way without gates: panel p holds output
 * columns p*64 .. p*64+63.
 *
 * int8 W_hh (FL_W_I8) is packed k-quad interleaved for integer dot products:
 * with Kp = K rounded up to a multiple of 4 (pad rows are zero),
 *     panel_j[(k/4)*256 + col*4 + k%4] = q[row(col)][k]      (int8)
 * so 64 bytes hold 16 columns x 4 k: the operand of one vpdpbusd, whose
 * 32-bit lane multiplies them with 4 unsigned bytes of h (k .. k+3); the
 * paths without AVX512_VNNI widen 16 or 32 bytes (vpmovsxbw) to int16 and
 * multiply pairs (vpmaddwd), adding the two pair sums of a column at the end.
 * bfloat16 W_hh (FL_W_BF16) keeps the panel rows but interleaves the columns
 * of each 32-column half-row:
 *     panel_j[k*64 + 32*(col/32) + 2*(col%16) + (col%32)/16] = w[row(col)][k]
 * so a 32-bit lane holds columns c (low half) and c + 16 (high half): a
 * shift left by 16 makes the first a float32, clearing the low half makes
 * the second one (one integer op per 16 weights instead of a widening move
 * and a shift).
 * bfloat16 W_hh with bfloat16 dot products (FL_W_BF16D) is packed k-pair
 * interleaved, Kp = K rounded up to 2 (a pad row is zero):
 *     panel_j[(k/2)*128 + 2*col + k%2] = w[row(col)][k]
 * so 64 bytes hold 16 columns x 2 k: one vdpbf16ps operand (each 32-bit
 * lane: k even in the low half, k odd in the high half).
 * Every ISA reads these layouts.
 */
#ifndef FL_INTERNAL_H
#define FL_INTERNAL_H

#define FL_BF16_POS(col) (32 * ((col) / 32) + 2 * ((col) % 16) + ((col) % 32) / 16)

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "fastlstm.h"

#define FL_BW 16            /* hidden units per block */
#define FL_PW 64            /* columns per panel (4 gates x FL_BW) */
#define FL_ALIGN 64
#define FL_MAX_THREADS 64
/* int8 W_hh: h is quantized to int16 in [-FL_HQ_MAX, FL_HQ_MAX] per row and
 * step; integer sums run over K chunks of FL_I8_KC (FL_I8_KC * 128 * 32767
 * < 2^31, so the int32 sums are exact). */
#define FL_HQ_MAX 32767
#define FL_HQ8_MAX 127 /* 8-bit codes (fl_cell_set_act_bits), held as q = 256 * q8 */
#define FL_I8_KC 256
/* Cache tuning, chosen once for the CPU by fl_tune_init (engine.c; called
 * by CPU detection and by every forward plan, idempotent):
 * fl_kc: K chunk of the recurrent and input GEMMs in floats (a multiple of
 *   16; each row tile streams a panel slice of fl_kc x 64 floats).  Sums
 *   accumulate sequentially through the chunks (partial sums are stored
 *   and reloaded, never re-associated), so the value never changes results.
 * fl_pf_panel: prefetch the next W_hh panel into L2 in compute-bound steps.
 * fl_gchunk: bytes of G (input projection) per time-step chunk; it sizes
 *   workspaces, so it never changes after the first use. */
extern int fl_kc;
extern int fl_pf_panel;
extern size_t fl_gchunk;
void fl_tune_init(void);

/* What the epilogue of the recurrent kernel needs besides the GEMM. */
typedef struct {
    int is_default;          /* sigmoid/tanh/tanh, no clip, no peepholes */
    const void *peep;        /* block's peepholes, 3 x FL_BW (i, f, o), or NULL */
    const fl_cell_opts *opts;
} fl_epi;

/* Kernel signatures (REAL = float or double):
 * gemm: out[r][col] = init[r*ldi + col] + sum_k A[r*lda + k] * panel[k*64 + col]
 *       for r < R (R <= rmax), col < ncols.  init NULL means zeros; ldi = 0
 *       broadcasts one row (a bias); init == out accumulates in place.
 * lstm: pre[r][col] = G[r*ldg + col] + sum_k A[r*lda + k] * panel[k*64 + col]
 *       (A NULL means h_{t-1} = 0), then the gate math for the block's
 *       `nvalid` units: reads/writes c[r*ldc + l], writes h[r*ldh + l]. */
typedef void (*fl_gemm_f32)(int R, int K, const float *A, ptrdiff_t lda,
                            const float *panel, const float *init, ptrdiff_t ldi,
                            float *out, ptrdiff_t ldo, int ncols);
typedef void (*fl_lstm_f32)(int R, int K, const float *A, ptrdiff_t lda,
                            const float *panel, const float *G, ptrdiff_t ldg,
                            float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh,
                            int nvalid, const fl_epi *epi);
typedef void (*fl_gemm_f64)(int R, int K, const double *A, ptrdiff_t lda,
                            const double *panel, const double *init, ptrdiff_t ldi,
                            double *out, ptrdiff_t ldo, int ncols);
typedef void (*fl_lstm_f64)(int R, int K, const double *A, ptrdiff_t lda,
                            const double *panel, const double *G, ptrdiff_t ldg,
                            double *c, ptrdiff_t ldc, double *h, ptrdiff_t ldh,
                            int nvalid, const fl_epi *epi);

/* lstmq: as lstm, with the panel in float16 or bfloat16 (wtype, fl_wtype)
 * widened to float32 exactly: pre = G + sum_k A[r][k] * w[k][col].
 * No K chunking: called once with the whole K. */
typedef void (*fl_lstmq_f32)(int wtype, int R, int K, const float *A, ptrdiff_t lda,
                             const void *panel, const float *scale,
                             const float *G, ptrdiff_t ldg,
                             float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh,
                             int nvalid, const fl_epi *epi);
/* lstmq2: lstmq for one row (R = 1) and two adjacent blocks j, j+1 at once
 * (panel: block j's, block j+1's follows; G, c, h: block j's, j+1's follow
 * at +64, +16, +16; epi: block j's, nvalid2: block j+1's).  Twice the
 * independent FMA chains; every column's sum is the same k-ordered chain,
 * so the results are bitwise those of two lstmq calls.  NULL if the ISA
 * has no such kernel. */
typedef void (*fl_lstmq2_f32)(int wtype, int K, const float *A, const void *panel,
                              const float *G, float *c, float *h, int nvalid2,
                              const fl_epi *epi);
/* lstmi8: int8 W_hh (k-quad panel above) times int16 h.  Q: rows of ldq
 * int16; a row is the int16 h (ldq/2 of them, zero-padded, ldq/2 >= Kp) then
 * the same values split into bytes for vpdpbusd, hi plane then lo plane
 * (ldq/2 bytes each; fl_quantize_h).  hs[r] = the row's h scale.
 *     acc_c = sum over chunk c of FL_I8_KC k of qw[k][col] * Q[r][k]  (int32, exact)
 *     accf  = ((0 + (float)acc_0) + (float)acc_1) + ...             (float32, chunk order)
 *     pre   = fmaf(accf, scale[col] * hs[r], G[r][col])
 * then the gate math.  Integer sums are exact and the float operations are
 * this one sequence on every ISA, so every path gives bitwise the same
 * pre-activations.  Q NULL means h_{t-1} = 0 (accf = 0, hs = 0).
 * corr[c*64 + col] = -32768 * (sum over chunk c of qw[k][col]): the offset
 * the byte split adds (only the vpdpbusd kernel reads it).  planes = 1: the
 * codes are 8-bit (q = 256 * q8, every lo byte zero), so the vpdpbusd
 * kernel skips the lo plane -- the same sums; the other kernels ignore it.
 * epi NULL: an input projection (int8 W_ih, Q the quantized input rows,
 * G the bias with ldg = 0): no gate math, h[r*ldh + col] = pre for all 64
 * columns (c unused). */
typedef void (*fl_lstmi8_f32)(int R, int K, const int16_t *Q, ptrdiff_t ldq, const float *hs,
                              const int8_t *panel, const int32_t *corr, int planes,
                              const float *scale,
                              const float *G, ptrdiff_t ldg,
                              float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh,
                              int nvalid, const fl_epi *epi);
/* lstmb: bfloat16 W_hh (FL_W_BF16D, k-pair panel above) times h_{t-1}
 * rounded to bfloat16 (B: rows of ldb codes, fl_f32_to_bf16, zero from K to
 * Kp).  Per row and column, over the k pairs p in order:
 *     acc = 0;  acc += w[2p+1] b[2p+1];  acc += w[2p] b[2p];  ...
 *     pre = acc + G[r][col]
 * each += one float32 rounding (nearest even) of acc plus the product, which
 * is exact (bfloat16 x bfloat16 fits float32), denormals flushed: the
 * arithmetic of vdpbf16ps (measured on Zen 4: odd product first, two
 * roundings), which the other paths reproduce with float32 FMAs of the
 * widened values, so every path gives bitwise the same.  B NULL means
 * h_{t-1} = 0.  epi NULL: an input projection (bfloat16 W_ih, B the input
 * rows rounded, G the bias with ldg = 0): h[r*ldh + col] = pre for all 64
 * columns, no gate math (c unused).  lstmb2: one row (R = 1), two adjacent
 * blocks, as lstmq2 (NULL if the ISA has none). */
typedef void (*fl_lstmb_f32)(int R, int K, const uint16_t *B, ptrdiff_t ldb, const void *panel,
                             const float *G, ptrdiff_t ldg, float *c, ptrdiff_t ldc, float *h,
                             ptrdiff_t ldh, int nvalid, const fl_epi *epi);
typedef void (*fl_lstmb2_f32)(int K, const uint16_t *B, const void *panel, const float *G,
                              float *c, float *h, int nvalid2, const fl_epi *epi);
/* lstmx: one time step with its input projection fused (float32 panels):
 *     acc = bias[col];  acc += X[r][k] wx[k][col], k < Kx;  acc += A[r][k] w[k][col], k < K
 * one chain per column in that order, then the gate math: bitwise what gemm
 * (G = bias + x W_ih^T) followed by lstm gives, since G is stored and
 * reloaded exactly; without the round trip of G and with one call per tile
 * instead of two.  A NULL means h_{t-1} = 0.  NULL if the ISA has none. */
typedef void (*fl_lstmx_f32)(int R, int Kx, const float *X, ptrdiff_t ldx, const float *wx,
                             const float *bias, int K, const float *A, ptrdiff_t lda,
                             const float *panel, float *c, ptrdiff_t ldc, float *h, ptrdiff_t ldh,
                             int nvalid, const fl_epi *epi);

typedef struct {
    int rmax;
    fl_gemm_f32 gemm;
    fl_lstm_f32 lstm;
    fl_lstmq_f32 lstmq;
    fl_lstmq2_f32 lstmq2;
    fl_lstmi8_f32 lstmi8;
    fl_lstmb_f32 lstmb;
    fl_lstmb2_f32 lstmb2;
    fl_lstmx_f32 lstmx;
    const char *name;
} fl_kernels_f32;
typedef struct { int rmax; fl_gemm_f64 gemm; fl_lstm_f64 lstm; const char *name; } fl_kernels_f64;

extern const fl_kernels_f32 fl_kernels_f32_portable;
extern const fl_kernels_f64 fl_kernels_f64_portable;
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define FL_X86 1
extern const fl_kernels_f32 fl_kernels_f32_avx2;
extern const fl_kernels_f32 fl_kernels_f32_avx512;
/* vdpbf16ps (through inline asm) needs GCC >= 10 or clang >= 9 and their
 * assemblers; older compilers build the FMA kernels only. */
#if defined(__clang__)
#if __clang_major__ >= 9
#define FL_HAVE_BF16_ASM 1
#endif
#elif defined(__GNUC__) && __GNUC__ >= 10
#define FL_HAVE_BF16_ASM 1
#endif
#endif

const fl_kernels_f32 *fl_kernels_f32_active(void);
/* AVX512_VNNI (cpuid 7.0 ECX bit 11) seen and enabled: the AVX-512 int8
 * kernel uses vpdpbusd, otherwise vpmaddwd + vpaddd (the same exact sums). */
extern int fl_use_vnni;
/* AVX512_BF16 (cpuid 7.1 EAX bit 5) seen and enabled: the AVX-512
 * FL_W_BF16D kernels use vdpbf16ps, otherwise FMAs (the same sums). */
extern int fl_use_bf16dot;

/* Quantize one row of h (n floats) to int16 for the int8 kernels:
 *   m = max_k |h_k|;  non-finite m: q = 0, *hs = NaN (the row's
 *   pre-activations become NaN);  m < FL_HQ_MIN: q = 0, *hs = 0;
 *   else inv = 32767.0f / m, q_k = rne(clamp(h_k * inv, +-32767)),
 *   *hs = m / 32767.0f.   q[n .. npad) is zeroed.
 * bits = 8: inv = 127.0f / m, q_k = 256 * rne(clamp(h_k * inv, +-127)),
 *   *hs = m / 127.0f * 2^-8 (the same products as 8-bit codes).
 * Then the byte planes after q[npad] (npad bytes each) for vpdpbusd, which
 * multiplies unsigned bytes by signed ones:
 *   hi_k = (q_k >> 8) + 128 (0 .. 255),  lo_k = q_k & 255 (0 .. 255),
 * so q_k = 256 * hi_k + lo_k - 32768. */
#define FL_HQ_MIN 0x1p-96f
void fl_quantize_h(const float *h, int n, int npad, int bits, int16_t *q, float *hs);

/* Rows (k) of one reduced-precision W_hh panel: int8 panels hold whole k
 * quads (K not a multiple of 4 gets zero rows). */
static inline int fl_whhq_rows(int wtype, int K)
{
    return wtype == FL_W_I8 ? (K + 3) / 4 * 4 : wtype == FL_W_BF16D ? (K + 1) / 2 * 2 : K;
}
/* K chunks of an int8 panel (each has 64 corr values). */
static inline int fl_i8_chunks(int K) { return (fl_whhq_rows(FL_W_I8, K) + FL_I8_KC - 1) / FL_I8_KC; }

/* int16 per quantized row of n values for the int8 kernels: the int16
 * codes then their two byte planes, each n rounded up to 32 (see lstmi8). */
static inline int fl_hq_row_len(int n) { return 2 * ((n + 31) / 32 * 32); }

/* One int16 copy of h_{t-1} for the int8 kernels: N rows of ldq int16
 * (fl_hq_row_len(Hout)), then N float scales at *scale_off, both aligned.
 * Returns the bytes of the copy. */
static inline size_t fl_hq_copy_bytes(int N, int Hout, int *ldq, size_t *scale_off)
{
    size_t n = (size_t)(N > 0 ? N : 1);
    *ldq = fl_hq_row_len(Hout);
    *scale_off = (n * (size_t)*ldq * sizeof(int16_t) + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN;
    return *scale_off + (n * sizeof(float) + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN;
}

/* Scalar epilogue shared by every ISA for non-default cells.
 * pre is R x 64 (row stride 64), gate order i, f, g, o per 16 lanes. */
void fl_epilogue_generic_f32(int R, const float *pre, float *c, ptrdiff_t ldc,
                             float *h, ptrdiff_t ldh, int nvalid, const fl_epi *epi);
void fl_epilogue_generic_f64(int R, const double *pre, double *c, ptrdiff_t ldc,
                             double *h, ptrdiff_t ldh, int nvalid, const fl_epi *epi);

struct fl_cell {
    int dtype;
    int in, H, P, Hout;     /* Hout = P ? P : H */
    int nb;                 /* hidden blocks: ceil(H / 16) */
    int np;                 /* projection panels: ceil(P / 64) */
    void *wih;              /* nb panels of in x 64 */
    void *whh;              /* nb panels of Hout x 64 */
    void *bias;             /* nb x 64 (zeros if no bias) */
    void *whr;              /* np panels of H x 64, or NULL */
    void *peep;             /* nb x 3 x 16, or NULL */
    int wtype;              /* fl_wtype of whhq (F32: whh is used) */
    void *whhq;             /* nb panels of Hout x 64 in wtype (I8: Kp x 64, k-quad
                               interleaved, Kp = Hout rounded up to 4), or NULL */
    float *whh_scale;       /* nb x 64 (I8 only) */
    int32_t *whh_corr;      /* nb x fl_i8_chunks(Hout) x 64 (I8 only; see lstmi8) */
    void *wihq;             /* int8 W_ih: nb panels of Kp x 64 (k-quad, Kp = in rounded
                               up to 4); bfloat16 W_ih (wih_type FL_W_BF16D): k-pair
                               panels (Kp = in rounded up to 2), the input rows rounded
                               to bfloat16; or NULL (then wih holds float32 panels) */
    int wih_type;           /* FL_W_I8 or FL_W_BF16D with wihq */
    float *wih_scale;       /* nb x 64 with wihq */
    int32_t *wih_corr;      /* nb x fl_i8_chunks(in) x 64 with wihq */
    int act_bits;           /* 16 or 8: the int8 kernels' codes of h and inputs */
    fl_cell_opts opts;
    int is_default;
    size_t bytes;           /* packed bytes (fl_cell_packed_bytes), kept by every repack */
};

/* Byte planes the vpdpbusd kernel multiplies for this cell's codes (lstmi8). */
static inline int fl_act_planes(const fl_cell *cell) { return cell->act_bits == 8 ? 1 : 2; }

/* Thread pool: run fn(arg, tid, nthreads) on nthreads threads (the caller is
 * tid 0); returns the number of threads actually used (1 if the pool is busy
 * with another call, so concurrent callers never oversubscribe). */
/* The spin-wait hint of the pool's waits and peak.c's round-trip probe. */
#if defined(FL_X86)
#include <immintrin.h>
#define FL_PAUSE() _mm_pause()
#else
#define FL_PAUSE() ((void)0)
#endif
typedef void (*fl_task_fn)(void *arg, int tid, int nthreads);
int fl_pool_run(fl_task_fn fn, void *arg, int nthreads);
/* The same, with a hint: [pf, pf + pfbytes) is memory the next job will
 * likely read (a stream's state, which the caller rewrites after the job);
 * the workers of this job prefetch it now and then while they wait for the
 * next one.  Only a hint: nothing is read but by prefetch instructions. */
int fl_pool_run_pf(fl_task_fn fn, void *arg, int nthreads, const void *pf, size_t pfbytes);
/* Barrier among the threads of the current fl_pool_run (between steps). */
void fl_pool_barrier(int tid, int nthreads);

/* Scalar conversions of reduced-precision weights (portable paths, packing). */
static inline float fl_f16_to_f32(uint16_t hbits)
{
    uint32_t sign = (uint32_t)(hbits & 0x8000u) << 16;
    uint32_t exp = (hbits >> 10) & 0x1f, man = hbits & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float fl_bf16_to_f32(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* float32 -> bfloat16 for the FL_W_BF16D kernels' h: round to nearest even;
 * NaN stays NaN (quieted); zero and denormals give a signed zero (as
 * vcvtneps2bf16, which treats denormals as zero); overflow gives Inf. */
static inline uint16_t fl_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    if ((u & 0x7f800000u) == 0) return (uint16_t)((u >> 16) & 0x8000u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One row of h (n floats) as bfloat16 codes b[0 .. n), zeros in [n, npad). */
static inline void fl_round_bf16_row(const float *h, int n, int npad, uint16_t *b)
{
    for (int k = 0; k < n; k++) b[k] = fl_f32_to_bf16(h[k]);
    for (int k = n; k < npad; k++) b[k] = 0;
}

/* Unaligned loads of 4 and 8 bytes (the int8 kernels' broadcasts of h). */
static inline int32_t fl_ld_i32(const void *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline int64_t fl_ld_i64(const void *p)
{
    int64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Floating-point environment inside the kernels: flush denormals. */
unsigned fl_fpenv_enter(void);
void fl_fpenv_leave(unsigned saved);

/* Thread-split thresholds (csrc/engine_impl.h): each thread's estimated
 * share of one step, and the estimated whole call, in microseconds. */
#ifndef FL_SPLIT_US
#define FL_SPLIT_US 1.2
#endif
#ifndef FL_CALL_US
#define FL_CALL_US 20.0
#endif

/* Prefetch slice i of `parts` of [p, p + bytes) into L2 (prefetcht1). */
static inline void fl_prefetch_l2_slice(const void *p, size_t bytes, int i, int parts)
{
    size_t a = bytes * (size_t)i / (size_t)parts, b = bytes * (size_t)(i + 1) / (size_t)parts;
    for (size_t o = a & ~(size_t)63; o < b; o += 64)
        __builtin_prefetch((const char *)p + o, 0, 2);
}

void *fl_aligned_alloc(size_t bytes);
void fl_aligned_free(void *p);

#endif
