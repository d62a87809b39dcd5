/*
 * Kernel-only timings of the active ISA's float32 micro-kernels, no engine,
 * no Python (the figures the README quotes as "kernel-only C harness"):
 *
 *   tiles   gemm and lstm (with the gate math) for R = 1..6 rows on one
 *           L2-resident panel (K = 256), GFLOP/s
 *   gates   the gate math alone: lstm at K = 1, ns per row and block (16
 *           hidden units), best of the repetitions
 *   stream  a batch-32 recurrent step's kernel calls over a 4 MB W_hh (32
 *           blocks, K = 512, row tiles 6,6,5,5,5,5), gemm and lstm, GFLOP/s
 *   step    one streaming step at hidden = input = 128 (8 blocks): the fused
 *           one-step kernel (lstmx), its dot products alone (gemm), and
 *           gemm + lstm with K = 0 (the gate math alone added), µs
 *
 * Medians over repetitions.  Build and run: benchmarks/c/run.sh
 * (FASTLSTM_ISA=portable|avx2|avx512 picks a lower path, as in Python).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "fl_internal.h"

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, n, sizeof *v, cmp);
    return v[n / 2];
}

static float *fill(size_t n, float scale)
{
    float *p = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    for (size_t i = 0; i < n; i++) p[i] = scale * (float)((i * 2654435761u) % 1000) / 1000.0f - scale / 2;
    return p;
}

#define REPS 21

int main(void)
{
    const char *want = getenv("FASTLSTM_ISA");
    if (want) { /* the same names as in Python: portable, avx2, avx512 */
        int found = 0;
        for (int isa = 0; isa <= fl_isa_detected(); isa++)
            if (strcmp(fl_isa_name(isa), want) == 0) { fl_isa_set(isa); found = 1; }
        if (!found) {
            fprintf(stderr, "FASTLSTM_ISA=%s: not available here\n", want);
            return 2;
        }
    }
    const fl_kernels_f32 *kr = fl_kernels_f32_active();
    fl_cell_opts o;
    fl_cell_opts_default(&o);
    fl_epi epi = {1, NULL, &o};
    double r[REPS];
    printf("# kernels: %s (rmax %d)\n", kr->name, kr->rmax);

    { /* tiles */
        const int K = 256;
        float *A = fill(6 * K, 1.0f), *P = fill((size_t)K * FL_PW, 0.01f);
        float G[6 * FL_PW] __attribute__((aligned(64)));
        float c[6 * FL_BW] = {0}, h[6 * FL_BW];
        memset(G, 0, sizeof G);
        for (int R = 1; R <= kr->rmax; R++) {
            const int n = 4000;
            double g, l;
            for (int t = 0; t < REPS; t++) {
                double t0 = now_ns();
                for (int i = 0; i < n; i++) kr->gemm(R, K, A, K, P, G, FL_PW, G, FL_PW, FL_PW);
                r[t] = (now_ns() - t0) / n;
            }
            g = median(r, REPS);
            for (int t = 0; t < REPS; t++) {
                double t0 = now_ns();
                for (int i = 0; i < n; i++) kr->lstm(R, K, A, K, P, G, FL_PW, c, FL_BW, h, FL_BW, FL_BW, &epi);
                r[t] = (now_ns() - t0) / n;
            }
            l = median(r, REPS);
            printf("tiles  R=%d K=%d: gemm %.1f GFLOP/s, lstm %.1f GFLOP/s\n", R, K,
                   2.0 * R * K * FL_PW / g, 2.0 * R * K * FL_PW / l);
        }
        free(A);
        free(P);
    }

    { /* gates: the epilogue's cost per row-block */
        float A[6 * 4], P[4 * FL_PW] __attribute__((aligned(64))), G[6 * FL_PW], c[6 * FL_BW], h[6 * FL_BW];
        for (int i = 0; i < 24; i++) A[i] = 0.1f;
        for (int i = 0; i < 4 * FL_PW; i++) P[i] = 0.01f * (float)(i % 5);
        for (int i = 0; i < 6 * FL_PW; i++) G[i] = 0.3f * (float)(i % 9 - 4);
        for (int i = 0; i < 6 * FL_BW; i++) c[i] = 0.0f;
        for (int R = 1; R <= kr->rmax; R++) {
            const int n = 20000;
            for (int t = 0; t < REPS; t++) {
                double t0 = now_ns();
                for (int i = 0; i < n; i++) kr->lstm(R, 1, A, 4, P, G, FL_PW, c, FL_BW, h, FL_BW, FL_BW, &epi);
                r[t] = (now_ns() - t0) / n / R;
            }
            qsort(r, REPS, sizeof *r, cmp);
            printf("gates  R=%d: %.1f ns per row and block\n", R, r[0]);
        }
    }

    { /* stream: one batch-32 step over 4 MB of W_hh */
        const int K = 512, NP = 32, N = 32;
        const int tiles[6] = {6, 6, 5, 5, 5, 5};
        float *A = fill((size_t)N * K, 1.0f), *P = fill((size_t)NP * K * FL_PW, 0.01f);
        float *G = fill((size_t)N * NP * FL_PW, 0.1f), *c = calloc((size_t)N * NP * FL_BW, 4),
              *h = calloc((size_t)N * NP * FL_BW, 4);
        const ptrdiff_t ldg = (ptrdiff_t)NP * FL_PW, ldh = (ptrdiff_t)NP * FL_BW;
        for (int v = 0; v < 2; v++) {
            for (int t = 0; t < REPS; t++) {
                double t0 = now_ns();
                for (int j = 0; j < NP; j++) {
                    int n = 0;
                    for (int q = 0; q < 6; q++) {
                        int R = tiles[q] < kr->rmax ? tiles[q] : kr->rmax;
                        for (int m = 0; m < tiles[q]; m += R) {
                            float *g = G + (size_t)(n + m) * ldg + j * FL_PW;
                            const float *a = A + (size_t)(n + m) * K, *p = P + (size_t)j * K * FL_PW;
                            if (v == 0) kr->gemm(R, K, a, K, p, g, ldg, g, ldg, FL_PW);
                            else kr->lstm(R, K, a, K, p, g, ldg, c + (size_t)(n + m) * ldh + j * FL_BW, ldh,
                                          h + (size_t)(n + m) * ldh + j * FL_BW, ldh, FL_BW, &epi);
                        }
                        n += tiles[q];
                    }
                }
                r[t] = now_ns() - t0;
            }
            double m = median(r, REPS);
            printf("stream batch 32, K=%d, %d panels (%d KB): %s %.1f GFLOP/s\n", K, NP,
                   (int)((size_t)NP * K * FL_PW * 4 / 1024), v ? "lstm" : "gemm", 2.0 * N * K * FL_PW * NP / m);
        }
        free(A); free(P); free(G); free(c); free(h);
    }

    { /* step: hidden = input = 128, one row, 8 blocks */
        const int H = 128, In = 128, nb = H / FL_BW;
        float *wih = fill((size_t)nb * In * FL_PW, 0.01f), *whh = fill((size_t)nb * H * FL_PW, 0.01f),
              *bias = fill((size_t)nb * FL_PW, 0.02f);
        float x[128], hp[128], hn[128], c[128];
        float G[8 * FL_PW] __attribute__((aligned(64)));
        for (int i = 0; i < 128; i++) { x[i] = 0.3f; hp[i] = 0.1f; c[i] = 0.0f; }
        const char *name[3] = {"lstmx (fused step)", "dot products alone", "dots + gate math (lstm K=0)"};
        for (int v = 0; v < 3; v++) {
            if (v == 0 && !kr->lstmx) continue;
            for (int t = 0; t < REPS; t++) {
                const int n = 2000;
                double t0 = now_ns();
                for (int it = 0; it < n; it++)
                    for (int j = 0; j < nb; j++) {
                        const float *wx = wih + (size_t)j * In * FL_PW, *wh = whh + (size_t)j * H * FL_PW;
                        if (v == 0) {
                            kr->lstmx(1, In, x, In, wx, bias + j * FL_PW, H, hp, H, wh, c + j * FL_BW, H,
                                      hn + j * FL_BW, H, FL_BW, &epi);
                            continue;
                        }
                        kr->gemm(1, In, x, In, wx, bias + j * FL_PW, 0, G + j * FL_PW, FL_PW, FL_PW);
                        kr->gemm(1, H, hp, H, wh, G + j * FL_PW, FL_PW, G + j * FL_PW, FL_PW, FL_PW);
                        if (v == 2) kr->lstm(1, 0, NULL, 0, NULL, G + j * FL_PW, FL_PW, c + j * FL_BW, H,
                                             hn + j * FL_BW, H, FL_BW, &epi);
                    }
                r[t] = (now_ns() - t0) / n / 1000;
            }
            printf("step   hidden 128, 512 KB of weights: %-28s %.2f us\n", name[v], median(r, REPS));
        }
        free(wih); free(whh); free(bias);
    }
    return 0;
}
