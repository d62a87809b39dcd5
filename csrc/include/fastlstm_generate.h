/*
 * fastlstm_generate.h -- output heads and autoregressive generation in C.
 *
 * A generation network is: an input stage (embedding table lookup, or a
 * one-hot vector over the vocabulary), a chain of unidirectional LSTM stacks
 * (fastlstm.h cells; usually one stack), and a dense head whose outputs are
 * the logits over the vocabulary.  fl_generate() runs the whole loop with no
 * Python in it:
 *
 *   1. the prompt (T tokens per row, fewer with lengths) goes through the
 *      stacks in one fl_forward() call per stack;
 *   2. then, for each of `steps` tokens: head GEMM on the top layer's h,
 *      sampling (greedy or temperature / top-k), lookup of the sampled token,
 *      and one fl_forward() call per stack with T = 1 and the state arrays
 *      aliased (h0 == hn, c0 == cn).
 *
 * Sampling uses Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC 2011), a
 * counter-based generator: the uniform draw for generated token `step` of a
 * row is a pure function of (seed, stream, step), so a row's tokens do not
 * depend on the other rows of the batch, on the thread count or on how the
 * run is split into calls.  key = seed (64 bits), counter = (step, stream)
 * (64 bits each, low words first); the uniform is the top 53 bits of
 * (out[0], out[1]) times 2^-53, in [0, 1).
 *
 * Sampling rule (deterministic given the logits and the uniform u):
 *   - temperature == 0 or top_k == 1: argmax, the lowest index among equal
 *     maxima (torch.argmax); a NaN logit counts as the maximum.
 *   - otherwise p_v = exp((l_v - max) / temperature) in double over the kept
 *     set (the top_k largest logits, ties at the k-th value kept lowest index
 *     first; every logit if top_k <= 0 or >= vocabulary); the token is the
 *     first kept v (ascending index) whose running sum of p exceeds
 *     u * sum(p).  A NaN logit is returned as in argmax; a +inf logit wins.
 *
 * The state left in the stage arrays after fl_generate() is the state after
 * the prompt and every generated token but the last: to continue, call again
 * with the last token as the prompt and this state.
 */
#ifndef FASTLSTM_GENERATE_H
#define FASTLSTM_GENERATE_H

#include <stddef.h>
#include <stdint.h>
#include "fastlstm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------ dense head */
typedef struct fl_head fl_head;

/* w (out_features, in_features) row-major (torch.nn.Linear's layout), b
 * (out_features) or NULL.  Packed once; the caller may free its arrays.
 * Returns NULL on bad sizes or out of memory. */
fl_head *fl_head_create(int dtype, int in_features, int out_features, const void *w,
                        const void *b);
void fl_head_free(fl_head *head);
size_t fl_head_packed_bytes(const fl_head *head);

/* y[n*ldy + v] = b[v] + sum_k x[n*ldx + k] * w[v][k] for n < N, v < out.
 * Each output is one sequential sum over k (bias first), the same for every
 * N, row position and thread count.  Returns 0, or < 0 on bad arguments. */
int fl_head_apply(const fl_head *head, int N, const void *x, ptrdiff_t ldx, void *y,
                  ptrdiff_t ldy, int nthreads);

/* ------------------------------------------------------------ generation */
typedef struct {
    fl_cell *const *cells;  /* `layers` cells of one unidirectional stack */
    int layers;
    void *h;                /* (layers, N, Hout): initial state in, final state out */
    void *c;                /* (layers, N, H)     likewise */
} fl_gen_stage;

typedef struct {
    int dtype;
    const void *embedding;  /* (vocab_in, in_features) row-major, or NULL: one-hot
                               input (in_features == vocab_in) */
    int vocab_in, in_features;
    int nstages;
    const fl_gen_stage *stages;
    const fl_head *head;    /* in = last stage's Hout, out <= vocab_in */
} fl_gen_net;

typedef struct {
    int N, T;                /* rows; prompt length (the longest, with lengths) */
    const int32_t *prompt;   /* N x T row-major tokens in [0, vocab_in) */
    const int32_t *lengths;  /* NULL (every row T) or N values in [0, T], sorted
                                descending; tokens past a row's length are ignored */
    int steps;               /* tokens generated per row (>= 0) */
    int32_t *tokens;         /* out: N x steps row-major */
    double temperature;      /* >= 0; 0: greedy */
    int top_k;               /* <= 0: no truncation */
    const uint64_t *seeds;   /* N Philox keys (may be NULL for greedy) */
    const uint64_t *streams; /* N Philox streams (may be NULL for greedy) */
} fl_gen_io;

size_t fl_generate_workspace_bytes(const fl_gen_net *net, int T, int N);

/* Returns 0, or a negative code: -1 inconsistent network, -2 bad io
 * arguments, -3 prompt token out of range, or an fl_forward() code - 10. */
int fl_generate(const fl_gen_net *net, const fl_gen_io *io, void *workspace, int nthreads);

/* Philox4x32-10 block and the uniform in [0, 1) the sampler draws. */
void fl_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);
double fl_gen_uniform(uint64_t seed, uint64_t stream, uint64_t step);

#ifdef __cplusplus
}
#endif
#endif
