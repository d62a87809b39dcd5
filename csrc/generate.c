/*
 * generate.c -- dense heads and the autoregressive generation loop
 * (csrc/include/fastlstm_generate.h).  The float and double versions are
 * instantiated from generate_impl.h.
 *
 * Head layout: the vocabulary rows are cut into blocks of FL_HB = 16; block
 * b is a panel of K rows of 16 columns, panel_b[k*16 + r] = W[b*16 + r][k]
 * (zeros past the vocabulary), so a row of x times a panel is 16 independent
 * sequential sums -- plain lane-wise C that the compiler vectorises without
 * reassociating anything.  The kernel is compiled three times (baseline,
 * AVX2+FMA, AVX-512F) through target attributes and chosen by
 * fl_isa_active(), like the LSTM kernels.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "fastlstm.h"
#include "fastlstm_generate.h"
#include "fl_internal.h"

#define FL_HB 16 /* vocabulary rows per head panel */

/* ------------------------------------------------------------ Philox4x32 */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

void fl_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4])
{
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; round++) {
        if (round) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
        uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

double fl_gen_uniform(uint64_t seed, uint64_t stream, uint64_t step)
{
    uint32_t ctr[4] = {(uint32_t)step, (uint32_t)(step >> 32), (uint32_t)stream,
                       (uint32_t)(stream >> 32)};
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    uint32_t out[4];
    fl_philox4x32_10(ctr, key, out);
    uint64_t bits = ((uint64_t)out[0] << 21) | (out[1] >> 11); /* 53 bits */
    return (double)bits * (1.0 / 9007199254740992.0);
}

/* ------------------------------------------------------------------ head */
struct fl_head {
    int dtype;
    int in, out, nb;
    void *w;     /* nb panels of in x FL_HB */
    void *b;     /* nb * FL_HB (zeros without bias) */
    size_t bytes;
};

static size_t round_up(size_t n) { return (n + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN; }

#if defined(FL_X86) && (defined(__GNUC__) || defined(__clang__))
#define FL_GEN_MULTI 1
#define FL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FL_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#endif
#if defined(__GNUC__) || defined(__clang__)
#define FL_INLINE static inline __attribute__((always_inline))
#else
#define FL_INLINE static inline
#endif

typedef struct {
    size_t lstm, x, y0, y1, logits, prob, sel, tok, total;
} gen_plan;

#define REAL float
#define SFX f32
#define FL_DT FL_F32
#include "generate_impl.h"
#undef REAL
#undef SFX
#undef FL_DT

#define REAL double
#define SFX f64
#define FL_DT FL_F64
#include "generate_impl.h"
#undef REAL
#undef SFX
#undef FL_DT

fl_head *fl_head_create(int dtype, int in, int out, const void *w, const void *b)
{
    if (in < 1 || out < 1 || !w || (dtype != FL_F32 && dtype != FL_F64)) return NULL;
    if (in >= (1 << 28) || out >= (1 << 30)) return NULL;
    fl_head *h = (fl_head *)calloc(1, sizeof(fl_head));
    if (!h) return NULL;
    size_t isz = dtype == FL_F32 ? sizeof(float) : sizeof(double);
    h->dtype = dtype;
    h->in = in;
    h->out = out;
    h->nb = (out + FL_HB - 1) / FL_HB;
    size_t wbytes = round_up((size_t)h->nb * in * FL_HB * isz);
    size_t bbytes = round_up((size_t)h->nb * FL_HB * isz);
    h->w = fl_aligned_alloc(wbytes);
    h->b = fl_aligned_alloc(bbytes);
    if (!h->w || !h->b) {
        fl_head_free(h);
        return NULL;
    }
    memset(h->w, 0, wbytes);
    memset(h->b, 0, bbytes);
    h->bytes = wbytes + bbytes;
    if (dtype == FL_F32) head_pack_f32(h, (const float *)w, (const float *)b);
    else head_pack_f64(h, (const double *)w, (const double *)b);
    return h;
}

void fl_head_free(fl_head *h)
{
    if (!h) return;
    fl_aligned_free(h->w);
    fl_aligned_free(h->b);
    free(h);
}

size_t fl_head_packed_bytes(const fl_head *h) { return h ? h->bytes : 0; }

int fl_head_apply(const fl_head *h, int N, const void *x, ptrdiff_t ldx, void *y, ptrdiff_t ldy,
                  int nthreads)
{
    if (!h || N < 0 || (N > 0 && (!x || !y)) || ldx < h->in || ldy < h->out) return -2;
    if (nthreads <= 0) nthreads = fl_num_threads_get();
    if (nthreads > 1 && nthreads > fl_num_cpus()) nthreads = fl_num_cpus();
    if (h->dtype == FL_F32)
        head_run_f32(h, N, (const float *)x, ldx, (float *)y, ldy, nthreads);
    else
        head_run_f64(h, N, (const double *)x, ldx, (double *)y, ldy, nthreads);
    return 0;
}

/* ------------------------------------------------------------ generation */
static int check_net(const fl_gen_net *net)
{
    if (!net || net->nstages < 1 || !net->stages || !net->head) return -1;
    if (net->dtype != FL_F32 && net->dtype != FL_F64) return -1;
    if (net->vocab_in < 1 || net->in_features < 0) return -1;
    if (!net->embedding && net->in_features != net->vocab_in) return -1;
    int in = net->in_features;
    for (int s = 0; s < net->nstages; s++) {
        const fl_gen_stage *st = &net->stages[s];
        if (!st->cells || st->layers < 1) return -1;
        for (int l = 0; l < st->layers; l++) {
            const fl_cell *c = st->cells[l];
            if (!c || c->dtype != net->dtype || c->in != (l ? st->cells[0]->Hout : in)) return -1;
            if (c->H != st->cells[0]->H || c->P != st->cells[0]->P) return -1;
        }
        in = st->cells[0]->Hout;
    }
    if (net->head->dtype != net->dtype || net->head->in != in) return -1;
    if (net->head->out > net->vocab_in) return -1;
    return 0;
}

static int max_hout(const fl_gen_net *net)
{
    int m = 1;
    for (int s = 0; s < net->nstages; s++)
        if (net->stages[s].cells[0]->Hout > m) m = net->stages[s].cells[0]->Hout;
    return m;
}

static void plan_gen(const fl_gen_net *net, int T, int N, gen_plan *p)
{
    size_t isz = net->dtype == FL_F32 ? sizeof(float) : sizeof(double);
    size_t Tm = (size_t)(T > 1 ? T : 1), Nm = (size_t)(N > 0 ? N : 1);
    size_t lstm = 0;
    for (int s = 0; s < net->nstages; s++) {
        const fl_gen_stage *st = &net->stages[s];
        size_t a = fl_workspace_bytes(st->cells, st->layers, 1, (int)Tm, (int)Nm);
        size_t b = fl_workspace_bytes(st->cells, st->layers, 1, 1, (int)Nm);
        if (a > lstm) lstm = a;
        if (b > lstm) lstm = b;
    }
    size_t V = (size_t)net->head->out;
    size_t off = 0;
    p->lstm = off; off += round_up(lstm);
    p->x = off; off += round_up(Tm * Nm * (size_t)(net->in_features > 0 ? net->in_features : 1) * isz);
    p->y0 = off; off += round_up(Tm * Nm * (size_t)max_hout(net) * isz);
    p->y1 = off; off += round_up(Tm * Nm * (size_t)max_hout(net) * isz);
    p->logits = off; off += round_up(Nm * V * isz);
    p->prob = off; off += round_up(V * sizeof(double));
    p->sel = off; off += round_up(V * isz);
    p->tok = off; off += round_up(Nm * sizeof(int32_t));
    p->total = off + FL_ALIGN;
}

size_t fl_generate_workspace_bytes(const fl_gen_net *net, int T, int N)
{
    if (check_net(net) != 0 || T < 0 || N < 0) return 0;
    gen_plan p;
    plan_gen(net, T, N, &p);
    return p.total;
}

int fl_generate(const fl_gen_net *net, const fl_gen_io *io, void *ws, int nthreads)
{
    if (check_net(net) != 0) return -1;
    if (!io || !ws || io->N < 0 || io->T < 0 || io->steps < 0) return -2;
    if (io->N > 0 && io->T > 0 && !io->prompt) return -2;
    if (io->N > 0 && io->steps > 0 && !io->tokens) return -2;
    if (!(io->temperature >= 0.0) || isinf(io->temperature)) return -2;
    int sampling = io->temperature > 0.0 && io->top_k != 1;
    if (sampling && io->N > 0 && io->steps > 0 && (!io->seeds || !io->streams)) return -2;
    for (int s = 0; s < net->nstages; s++)
        if (!net->stages[s].h || !net->stages[s].c) return -2;
    if (io->lengths) {
        for (int n = 0; n < io->N; n++) {
            int L = io->lengths[n];
            if (L < 0 || L > io->T || (n > 0 && L > io->lengths[n - 1])) return -2;
        }
    }
    for (int n = 0; n < io->N; n++) {
        int L = io->lengths ? io->lengths[n] : io->T;
        const int32_t *row = io->prompt + (size_t)n * io->T;
        for (int t = 0; t < L; t++)
            if (row[t] < 0 || row[t] >= net->vocab_in) return -3;
    }
    if (nthreads <= 0) nthreads = fl_num_threads_get();
    if (nthreads > 1 && nthreads > fl_num_cpus()) nthreads = fl_num_cpus();
    gen_plan p;
    plan_gen(net, io->T, io->N, &p);
    char *base = (char *)(((uintptr_t)ws + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN);
    if (net->dtype == FL_F32) return generate_f32(net, io, base, &p, nthreads);
    return generate_f64(net, io, base, &p, nthreads);
}
