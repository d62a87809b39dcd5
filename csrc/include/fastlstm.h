/*
 * fastlstm.h -- the whole public surface of the fastlstm C engine.
 *
 * Layering (see README "Architecture"):
 *   Python validates, allocates outputs and the workspace, then calls
 *   fl_forward() with the GIL released.  Nothing in here allocates or fails
 *   per call except for the documented argument checks of fl_forward().
 *
 * Canonical weight layout (PyTorch's, gate order i, f, g, o):
 *   w_ih  (4H, In)      row-major
 *   w_hh  (4H, Hout)    row-major, Hout = P if proj_size P > 0 else H
 *   bias  (4H)          b_ih + b_hh, or NULL
 *   w_hr  (P, H)        row-major, or NULL when P == 0
 *   peep  (3, H)        peepholes for i, f, o (Graves 2013), or NULL
 * fl_cell_create() packs them once into the kernel layout; the caller may
 * free its arrays afterwards.
 */
#ifndef FASTLSTM_H
#define FASTLSTM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum fl_dtype { FL_F32 = 0, FL_F64 = 1 };

/* Storage of the recurrent weights W_hh (state stays float32).  FL_W_BF16D:
 * bfloat16 W_hh whose dot products take h_{t-1} rounded to bfloat16 too
 * (vdpbf16ps; float32 sums), FL_W_BF16: bfloat16 W_hh times float32 h. */
enum fl_wtype { FL_W_F32 = 0, FL_W_F16 = 1, FL_W_BF16 = 2, FL_W_I8 = 3, FL_W_BF16D = 4 };

enum fl_isa { FL_ISA_PORTABLE = 0, FL_ISA_AVX2 = 1, FL_ISA_AVX512 = 2 };

/* Activation functions (the ONNX LSTM set). alpha/beta as in ONNX. */
enum fl_act {
    FL_ACT_SIGMOID = 0,
    FL_ACT_TANH = 1,
    FL_ACT_RELU = 2,
    FL_ACT_HARDSIGMOID = 3, /* clip(alpha*x + beta, 0, 1) */
    FL_ACT_AFFINE = 4,      /* alpha*x + beta */
    FL_ACT_LEAKYRELU = 5,   /* x >= 0 ? x : alpha*x */
    FL_ACT_THRESHOLDEDRELU = 6, /* x > alpha ? x : 0 */
    FL_ACT_SCALEDTANH = 7,  /* alpha*tanh(beta*x) */
    FL_ACT_ELU = 8,         /* x >= 0 ? x : alpha*(exp(x) - 1) */
    FL_ACT_SOFTSIGN = 9,    /* x / (1 + |x|) */
    FL_ACT_SOFTPLUS = 10,   /* log(1 + exp(x)) */
    FL_ACT_COUNT = 11
};

/* Cell options.  The default (zeroed struct with act = {SIGMOID, TANH, TANH})
 * is the plain PyTorch LSTM and runs on the fused SIMD epilogue; anything
 * else runs the same GEMMs with a generic scalar epilogue. */
typedef struct {
    int act[3];        /* f (gates i, f, o), g (candidate), h (output) */
    double alpha[3];
    double beta[3];
    double clip;       /* > 0: clamp gate pre-activations to [-clip, clip]
                          (ONNX Runtime's `clip`); 0: none */
    double cell_clip;  /* > 0: clamp c_t to [-cell_clip, cell_clip] (TF1) */
    int input_forget;  /* 1: f = 1 - i (ONNX `input_forget`) */
} fl_cell_opts;

void fl_cell_opts_default(fl_cell_opts *opts);

typedef struct fl_cell fl_cell;

/* Returns NULL on bad sizes or out of memory. */
fl_cell *fl_cell_create(int dtype, int input_size, int hidden_size, int proj_size,
                        const void *w_ih, const void *w_hh, const void *bias,
                        const void *w_hr, const void *peep, const fl_cell_opts *opts);
void fl_cell_free(fl_cell *cell);
/* Store W_hh in reduced precision (float32 cells only): w is (4H, Hout)
 * row-major in the given type (F16/BF16/BF16D as uint16 bit patterns, I8 as
 * int8 with one float scale per row: W = w * scale[row]).  Once, on a
 * fresh cell: the float32 panels are freed.  Returns 0 or a negative code
 * (bad type, already reduced, or out of memory). */
int fl_cell_set_whh_reduced(fl_cell *cell, int wtype, const void *w, const float *scale);
/* Store W_ih as int8 (FL_W_I8 only; float32 cells with input_size >= 1):
 * w is (4H, input_size) int8 with one float scale per row.  Each input row
 * (time step x batch row) is then quantized to int16 like h (see the
 * README, "Reduced precision") for integer dot products.  Once, on a fresh
 * cell; the float32 panels are freed.  Returns 0 or a negative code. */
int fl_cell_set_wih_reduced(fl_cell *cell, int wtype, const void *w, const float *scale);
/* Bits of the int8 kernels' quantized h_{t-1} and input rows: 16 (the
 * default: int16 codes) or 8 (int8 codes, q8 = rne(h * 127 / m) per row, as
 * torch's and ONNX Runtime's dynamic quantization do: half the integer
 * work, ~250x coarser).  Float32 cells only; returns 0 or -1. */
int fl_cell_set_act_bits(fl_cell *cell, int bits);
int fl_cell_dtype(const fl_cell *cell);
size_t fl_cell_packed_bytes(const fl_cell *cell);

/* One forward call over a stack of cells: cells[layer * dirs + dir].
 * Strides are in elements.  x row (t, n) starts at x + t*x_st + n*x_sn;
 * y row (t, n) at y + t*y_st + n*y_sn and holds [forward | reverse].
 * h0, c0 (L*D, N, Hout) / (L*D, N, H) contiguous, or NULL for zeros.
 * hn, cn likewise, required.
 * lengths: NULL (every sequence has T steps) or N values in [0, T] sorted in
 * descending order (the caller permutes its rows); steps past a sequence's
 * end are not computed and y there is not written (the caller zeroes it);
 * hn/cn hold the state at the last valid step; the reverse direction runs
 * over each valid prefix only (PyTorch PackedSequence semantics).
 * h0 may alias hn and c0 may alias cn (streaming).                        */
typedef struct {
    int T, N;
    const void *x;
    ptrdiff_t x_st, x_sn;
    void *y;
    ptrdiff_t y_st, y_sn;
    const void *h0, *c0;
    void *hn, *cn;
    const int32_t *lengths;
    /* 0: fewer threads than nthreads when a call is too short to pay for
     * waking the workers (~20 us of work).  1: split even short calls
     * (streaming steps fed back to back, where the workers are still
     * spinning from the previous step). */
    int eager_threads;
} fl_io;

size_t fl_workspace_bytes(fl_cell *const *cells, int layers, int dirs, int T, int N);

/* Returns 0 on success, a negative code if the arguments are inconsistent
 * (these are also checked in Python first).  nthreads <= 0: default. */
int fl_forward(fl_cell *const *cells, int layers, int dirs, const fl_io *io,
               void *workspace, int nthreads);

/* CPU dispatch. */
int fl_isa_detected(void);  /* best ISA this CPU + OS + build supports */
int fl_isa_active(void);
int fl_isa_set(int isa);    /* clamps to detected; returns the ISA now active */
const char *fl_isa_name(int isa);
/* int8 W_hh on the AVX-512 path: vpdpwssd (AVX512_VNNI) when on = 1 and the
 * CPU has it, else vpmaddwd + vpaddd (bitwise the same results).  on < 0
 * only queries.  Returns whether VNNI is used. */
int fl_int8_vnni_set(int on);
/* FL_W_BF16D on the AVX-512 path: vdpbf16ps (AVX512_BF16) when on = 1 and
 * the CPU has it, else float32 FMAs of the widened values (bitwise the same
 * results).  on < 0 only queries.  Returns whether vdpbf16ps is used. */
int fl_bf16_dot_set(int on);
/* Cache tuning, chosen at first use for the CPU (engine.c, fl_tune_init);
 * results never depend on it.  FL_TUNE_KC: the K chunk of the GEMMs in
 * floats (set: rounded down to a multiple of 16, at least 16).
 * FL_TUNE_PREFETCH: 1 prefetches the next block's W_hh panel into L2 during
 * compute-bound steps, 0 leaves it to the hardware.  FL_TUNE_GCHUNK
 * (read-only): bytes of input projection computed ahead of the steps.
 * value < 0 (KC: <= 0) only asks.  Returns the value now used, -1 for an unknown knob.  For
 * benchmarks and tests; not while calls run. */
enum fl_tune { FL_TUNE_KC = 0, FL_TUNE_PREFETCH = 1, FL_TUNE_GCHUNK = 2 };
int fl_tune_set(int knob, int value);

/* Measured float32 FMA throughput of one core on the active ISA path, in
 * GFLOP/s (best of 5 runs, ~seconds in all): for benchmarks' peak fraction. */
double fl_fma_peak_gflops(double seconds);

/* Measured read bandwidth, GB/s, of a working set of `bytes` read over and
 * over by `nthreads` threads of the pool, each its own contiguous slice
 * (bytes / nthreads), in 64 KB chunks whose order reverses from pass to
 * pass, as the engine's steps walk W_hh's panels: the ceiling for a
 * batch-1 step that must read those bytes (benchmarks' "% of read
 * bandwidth").  Vector loads of the active ISA path; best of 5 runs, ~seconds
 * in all.  *used (if not NULL): the threads the pool ran (at most the online
 * CPUs; fewer when another call holds the pool or after a congested call).  -1 if bytes is 0 or the buffer
 * cannot be allocated. */
double fl_read_bw_gbps(size_t bytes, int nthreads, double seconds, int *used);
/* The round trip of a cache line between the calling thread and the pool's
 * first worker (each writes its own line and spins on the other's), ns,
 * the median of 5 runs, ~seconds in all: what a two-thread step's barrier
 * and h exchange pay per hop on this pair of cores right now (on a VM it
 * changes as the host moves the vCPUs).  -1: fewer than 2 CPUs; -2: the
 * pool is held by another call or congested; -3: no memory. */
double fl_core_roundtrip_ns(double seconds);

/* Threads. */
int fl_num_threads_get(void);
void fl_num_threads_set(int n); /* n <= 0: default (online CPUs) */
int fl_num_cpus(void);
/* Calls that spent over a third of their time waiting for a partner thread
 * descheduled mid-call (waits of over 0.5 ms at barriers between steps), after
 * which the pool ran the next ~10 ms of calls on the calling thread alone.
 * Diagnostics only; results never depend on it. */
unsigned fl_pool_congested_calls(void);

#ifdef __cplusplus
}
#endif
#endif
