/*
 * Thread-safety stress of the engine, built with -fsanitize=thread by
 * .ci/tsan.sh (any data race TSan sees fails the run).  Each configuration
 * runs once on one thread and then repeatedly on two; every two-thread run
 * must give bitwise the one-thread outputs (the engine's contract: results
 * never depend on the thread count).  The configurations cover both thread
 * splits (hidden blocks with a barrier per step; batch rows without any),
 * time steps beyond one input-projection chunk, several layers, both
 * directions, lengths, and the reduced-precision paths (int8 W_hh and W_ih
 * with 16- and 8-bit codes, bfloat16 with float32 and with bfloat16
 * activations).  A pool stress runs jobs of 2-4 threads in turn (workers
 * left out of a job while the next is published) and two callers at once.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fl_internal.h"

static unsigned rng_state = 12345u;
static float frand(void) /* uniform in [-0.5, 0.5) */
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return (float)(rng_state >> 8) / 16777216.0f - 0.5f;
}

static void quantize_rows(const float *w, long rows, int K, int8_t *q, float *scale)
{
    for (long r = 0; r < rows; r++) {
        float m = 0.0f;
        for (int k = 0; k < K; k++) m = fmaxf(m, fabsf(w[r * K + k]));
        scale[r] = m > 0.0f ? m / 127.0f : 1.0f;
        for (int k = 0; k < K; k++) q[r * K + k] = (int8_t)lrintf(w[r * K + k] / scale[r]);
    }
}

/* A float32 cell with random weights (input K, hidden H); its W_ih and W_hh
 * are left in wih (4H x K) and whh (4H x H) for reduced-precision copies. */
static fl_cell *random_cell(int K, int H, float *wih, float *whh)
{
    fl_cell_opts o;
    fl_cell_opts_default(&o);
    float *b = malloc(sizeof(float) * 4 * H);
    for (long i = 0; i < 4L * H * K; i++) wih[i] = 0.6f * frand();
    for (long i = 0; i < 4L * H * H; i++) whh[i] = 0.6f * frand();
    for (int i = 0; i < 4 * H; i++) b[i] = 0.1f * frand();
    fl_cell *cell = fl_cell_create(FL_F32, K, H, 0, wih, whh, b, NULL, NULL, &o);
    free(b);
    return cell;
}

/* wmode: 0 float32, 1 int8 W_hh + W_ih (16-bit codes), 2 the same with 8-bit
 * codes, 3 bfloat16 W_hh, 4 bfloat16 W_hh + W_ih with bfloat16 dot products. */
static int run_config(int T, int N, int In, int H, int L, int D, int wmode, int use_len, int reps)
{
    fl_cell *cells[8];
    int nc = L * D, Hout = H;
    for (int c = 0; c < nc; c++) {
        int K = c < D ? In : D * Hout;
        float *wih = malloc(sizeof(float) * 4 * H * K), *whh = malloc(sizeof(float) * 4 * H * H);
        cells[c] = random_cell(K, H, wih, whh);
        if (!cells[c]) return 1;
        if (wmode == 1 || wmode == 2) {
            int8_t *q = malloc((size_t)4 * H * (K > H ? K : H));
            float *sc = malloc(sizeof(float) * 4 * H);
            quantize_rows(whh, 4L * H, H, q, sc);
            if (fl_cell_set_whh_reduced(cells[c], FL_W_I8, q, sc)) return 1;
            quantize_rows(wih, 4L * H, K, q, sc);
            if (fl_cell_set_wih_reduced(cells[c], FL_W_I8, q, sc)) return 1;
            if (wmode == 2 && fl_cell_set_act_bits(cells[c], 8)) return 1;
            free(q);
            free(sc);
        } else if (wmode == 3 || wmode == 4) {
            uint16_t *bf = malloc(sizeof(uint16_t) * 4 * H * (K > H ? K : H));
            for (long i = 0; i < 4L * H * H; i++) {
                uint32_t u;
                memcpy(&u, &whh[i], 4);
                bf[i] = (uint16_t)(u >> 16);
            }
            if (fl_cell_set_whh_reduced(cells[c], wmode == 3 ? FL_W_BF16 : FL_W_BF16D, bf, NULL))
                return 1;
            if (wmode == 4) { /* bfloat16 W_ih: the input rows rounded per chunk */
                for (long i = 0; i < 4L * H * K; i++) {
                    uint32_t u;
                    memcpy(&u, &wih[i], 4);
                    bf[i] = (uint16_t)(u >> 16);
                }
                if (fl_cell_set_wih_reduced(cells[c], FL_W_BF16D, bf, NULL)) return 1;
            }
            free(bf);
        }
        free(wih);
        free(whh);
    }
    size_t ny = (size_t)T * N * D * Hout;
    float *x = malloc(sizeof(float) * T * N * In), *y1 = calloc(ny, sizeof(float));
    float *y2 = calloc(ny, sizeof(float));
    float *hn = calloc((size_t)nc * N * Hout, sizeof(float)), *cn = calloc((size_t)nc * N * H, sizeof(float));
    int32_t *len = malloc(sizeof(int32_t) * N);
    for (long i = 0; i < (long)T * N * In; i++) x[i] = 2.0f * frand();
    for (int n = 0; n < N; n++) len[n] = T - (n * T) / (2 * N); /* sorted descending, all >= T/2 */
    fl_io io;
    memset(&io, 0, sizeof io);
    io.T = T; io.N = N; io.x = x; io.x_st = (ptrdiff_t)N * In; io.x_sn = In;
    io.y_st = (ptrdiff_t)N * D * Hout; io.y_sn = D * Hout; io.hn = hn; io.cn = cn;
    io.lengths = use_len ? len : NULL;
    void *ws = malloc(fl_workspace_bytes(cells, L, D, T, N));
    io.y = y1;
    if (fl_forward(cells, L, D, &io, ws, 1)) return 1;
    /* h_n and c_n too: a hidden split's last h_n is copied by the caller */
    size_t nh = (size_t)nc * N * Hout, ncs = (size_t)nc * N * H;
    float *hn1 = malloc(sizeof(float) * nh), *cn1 = malloc(sizeof(float) * ncs);
    memcpy(hn1, hn, sizeof(float) * nh);
    memcpy(cn1, cn, sizeof(float) * ncs);
    int bad = 0;
    io.y = y2;
    for (int r = 0; r < reps; r++) {
        memset(hn, 0xff, sizeof(float) * nh); /* NaNs: every element must be written */
        memset(cn, 0xff, sizeof(float) * ncs);
        if (fl_forward(cells, L, D, &io, ws, 2)) return 1;
        if (memcmp(y1, y2, sizeof(float) * ny) || memcmp(hn1, hn, sizeof(float) * nh)
            || memcmp(cn1, cn, sizeof(float) * ncs))
            bad++;
    }
    free(hn1);
    free(cn1);
    printf("T %3d N %2d In %2d H %3d L %d D %d weights %d lengths %d: %d/%d two-thread runs differ\n",
           T, N, In, H, L, D, wmode, use_len, bad, reps);
    for (int c = 0; c < nc; c++) fl_cell_free(cells[c]);
    free(x); free(y1); free(y2); free(hn); free(cn); free(len); free(ws);
    return bad != 0;
}

/* Streaming steps: T = 1 calls with the state kept in place (h0 == hn,
 * c0 == cn, as fastlstm.Stream does) and eager threads, so that even these
 * tiny calls split the hidden blocks.  Each thread reads all of h0 while the
 * others write their columns of h_n into the same array: the barrier after
 * the last step must order the two (TSan reports the race without it).  The
 * two-thread outputs must equal the one-thread ones step for step. */
static int run_stream_config(int steps, int N, int In, int H, int L)
{
    fl_cell *cells[8];
    for (int l = 0; l < L; l++) {
        int K = l ? H : In;
        float *wih = malloc(sizeof(float) * 4 * H * K), *whh = malloc(sizeof(float) * 4 * H * H);
        cells[l] = random_cell(K, H, wih, whh);
        free(wih);
        free(whh);
        if (!cells[l]) return 1;
    }
    float *x = malloc(sizeof(float) * steps * N * In);
    for (long i = 0; i < (long)steps * N * In; i++) x[i] = 2.0f * frand();
    float *h[2], *c[2], *y[2];
    for (int v = 0; v < 2; v++) {
        h[v] = calloc((size_t)L * N * H, sizeof(float));
        c[v] = calloc((size_t)L * N * H, sizeof(float));
        y[v] = calloc((size_t)steps * N * H, sizeof(float));
    }
    void *ws = malloc(fl_workspace_bytes(cells, L, 1, 1, N));
    for (int v = 0; v < 2; v++)
        for (int t = 0; t < steps; t++) {
            fl_io io;
            memset(&io, 0, sizeof io);
            io.T = 1; io.N = N; io.x = x + (size_t)t * N * In; io.x_st = (ptrdiff_t)N * In; io.x_sn = In;
            io.y = y[v] + (size_t)t * N * H; io.y_st = (ptrdiff_t)N * H; io.y_sn = H;
            io.h0 = io.hn = h[v]; io.c0 = io.cn = c[v];
            io.eager_threads = 1;
            if (fl_forward(cells, L, 1, &io, ws, v ? 2 : 1)) return 1;
        }
    int bad = memcmp(y[0], y[1], sizeof(float) * steps * N * H) != 0;
    printf("stream steps %d N %d In %d H %d L %d: two-thread steps %s\n", steps, N, In, H, L,
           bad ? "DIFFER" : "equal");
    for (int l = 0; l < L; l++) fl_cell_free(cells[l]);
    for (int v = 0; v < 2; v++) { free(h[v]); free(c[v]); free(y[v]); }
    free(x);
    free(ws);
    return bad;
}

/* The pool alone: each thread writes its slot, waits at a barrier, then
 * checks every slot; several rounds per job; thread counts changing from job
 * to job (a worker left out of one job must not run it, nor miss the next),
 * and a second caller at the same time (it runs alone: the pool is busy). */
#define POOL_ROUNDS 5
typedef struct { int vals[FL_MAX_THREADS]; int job; int bad; int ran[FL_MAX_THREADS]; } pool_job;

static void pool_task(void *arg, int tid, int nt)
{
    pool_job *pj = (pool_job *)arg;
    pj->ran[tid]++;
    for (int r = 0; r < POOL_ROUNDS; r++) {
        pj->vals[tid] = pj->job * 100 + r;
        fl_pool_barrier(tid, nt);
        for (int j = 0; j < nt; j++)
            if (pj->vals[j] != pj->job * 100 + r) pj->bad = 1; /* a thread ahead or behind */
        fl_pool_barrier(tid, nt); /* nobody overwrites a slot still being checked */
    }
}

static int pool_jobs(int njobs, int seed)
{
    int fail = 0;
    for (int k = 0; k < njobs; k++) {
        pool_job pj;
        memset(&pj, 0, sizeof pj);
        pj.job = k;
        int want = 2 + (k * 7 + seed) % 3; /* 2, 3 or 4 threads */
        int used = fl_pool_run(pool_task, &pj, want);
        if (pj.bad) fail = 1;
        for (int t = 0; t < FL_MAX_THREADS; t++)
            if (pj.ran[t] != (t < used ? 1 : 0)) fail = 1; /* each participant exactly once */
    }
    return fail;
}

static void *pool_caller(void *p)
{
    (void)p;
    return (void *)(intptr_t)pool_jobs(300, 1);
}

static int run_pool_stress(void)
{
    int fail = pool_jobs(300, 0);
    pthread_t th;
    if (pthread_create(&th, NULL, pool_caller, NULL) != 0) return 1;
    fail |= pool_jobs(300, 2);
    void *r;
    pthread_join(th, &r);
    fail |= r != NULL;
    printf("pool: jobs of 2-4 threads, two callers: %s\n", fail ? "FAILED" : "ok");
    return fail;
}

int main(void)
{
    int fail = 0;
    fail |= run_pool_stress();
    /* T beyond one chunk (the G chunk is about 48 rows at least: T * N >> 48) */
    for (int wmode = 0; wmode < 5; wmode++) {
        fail |= run_config(130, 5, 25, 58, 2, 1, wmode, 0, 4);  /* small steps: batch split */
        fail |= run_config(90, 3, 12, 160, 2, 2, wmode, 1, 3);  /* direction split, lengths */
        /* hidden split (17 blocks: uneven), lengths, bidir: W_hh (1.2 MB) beyond
         * half an L2, so no direction split; the caller copies the last h_n */
        fail |= run_config(50, 2, 16, 272, 2, 2, wmode, 1, 2);
        fail |= run_config(70, 16, 20, 40, 1, 1, wmode, 1, 3);  /* batch split, lengths */
    }
    fail |= run_stream_config(40, 2, 9, 40, 2); /* hidden split (3 blocks), two layers */
    fail |= run_stream_config(40, 1, 17, 20, 1);
    printf(fail ? "tsan_stress: FAILED\n" : "tsan_stress: OK\n");
    return fail;
}
