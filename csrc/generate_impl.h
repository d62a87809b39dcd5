/*
 * generate_impl.h -- head kernel, sampler and generation driver, instantiated
 * for float and double by generate.c (REAL, SFX, FL_DT).
 */
#define FG_CAT_(a, b) a##b
#define FG_CAT(a, b) FG_CAT_(a, b)
#define FG(name) FG_CAT(name, SFX)

static void FG(head_pack_)(fl_head *h, const REAL *w, const REAL *b)
{
    REAL *pw = (REAL *)h->w, *pb = (REAL *)h->b;
    const int K = h->in;
    for (int v = 0; v < h->out; v++) {
        int blk = v / FL_HB, r = v % FL_HB;
        REAL *panel = pw + (size_t)blk * K * FL_HB;
        const REAL *src = w + (size_t)v * K;
        for (int k = 0; k < K; k++) panel[(size_t)k * FL_HB + r] = src[k];
        if (b) pb[v] = b[v];
    }
}

/* R rows of x times one panel: y[r][c] = bias[c] + sum_k x[r][k] * panel[k][c],
 * each sum sequential in k.  Always inlined with a constant R, so the
 * accumulators live in registers; the per-row arithmetic is the same for
 * every R.  GNU C vector types give one 16-lane vector per row (a zmm with
 * AVX-512, two ymm with AVX2, four xmm with SSE2). */
#if defined(__GNUC__) || defined(__clang__)
typedef REAL FG(hvec_) __attribute__((vector_size(FL_HB * sizeof(REAL)), aligned(sizeof(REAL)),
                                      may_alias));
FL_INLINE void FG(head_tile_)(const int R, int K, const REAL *x, ptrdiff_t ldx,
                              const REAL *panel, const REAL *bias, REAL *y, ptrdiff_t ldy,
                              int ncols)
{
    typedef FG(hvec_) vec;
    vec acc[4];
    const vec b = *(const vec *)bias;
    for (int r = 0; r < R; r++) acc[r] = b;
    for (int k = 0; k < K; k++) {
        const vec w = *(const vec *)(panel + (size_t)k * FL_HB);
        for (int r = 0; r < R; r++) acc[r] += x[r * ldx + k] * w;
    }
    for (int r = 0; r < R; r++) {
        if (ncols == FL_HB) {
            *(vec *)(y + r * ldy) = acc[r];
        } else {
            REAL tmp[FL_HB];
            *(vec *)tmp = acc[r];
            for (int c = 0; c < ncols; c++) y[r * ldy + c] = tmp[c];
        }
    }
}
#else
FL_INLINE void FG(head_tile_)(const int R, int K, const REAL *x, ptrdiff_t ldx,
                              const REAL *panel, const REAL *bias, REAL *y, ptrdiff_t ldy,
                              int ncols)
{
    REAL acc[4][FL_HB];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < FL_HB; c++) acc[r][c] = bias[c];
    for (int k = 0; k < K; k++) {
        const REAL *wk = panel + (size_t)k * FL_HB;
        for (int r = 0; r < R; r++) {
            const REAL xv = x[r * ldx + k];
            for (int c = 0; c < FL_HB; c++) acc[r][c] += xv * wk[c];
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < ncols; c++) y[r * ldy + c] = acc[r][c];
}
#endif

/* Blocks [b0, b1) for rows [0, N). */
#define FG_HEAD_BODY                                                                      \
    const int K = h->in;                                                                  \
    const REAL *pw = (const REAL *)h->w, *pb = (const REAL *)h->b;                        \
    for (int blk = b0; blk < b1; blk++) {                                                 \
        const REAL *panel = pw + (size_t)blk * K * FL_HB;                                 \
        const REAL *bias = pb + (size_t)blk * FL_HB;                                      \
        int ncols = h->out - blk * FL_HB;                                                 \
        if (ncols > FL_HB) ncols = FL_HB;                                                 \
        REAL *yb = y + (ptrdiff_t)blk * FL_HB;                                            \
        int n = 0;                                                                        \
        for (; n + 4 <= N; n += 4)                                                        \
            FG(head_tile_)(4, K, x + n * ldx, ldx, panel, bias, yb + n * ldy, ldy, ncols); \
        switch (N - n) {                                                                  \
        case 3: FG(head_tile_)(3, K, x + n * ldx, ldx, panel, bias, yb + n * ldy, ldy, ncols); break; \
        case 2: FG(head_tile_)(2, K, x + n * ldx, ldx, panel, bias, yb + n * ldy, ldy, ncols); break; \
        case 1: FG(head_tile_)(1, K, x + n * ldx, ldx, panel, bias, yb + n * ldy, ldy, ncols); break; \
        default: break;                                                                   \
        }                                                                                 \
    }

static void FG(head_blocks_portable_)(const fl_head *h, int N, const REAL *x, ptrdiff_t ldx,
                                      REAL *y, ptrdiff_t ldy, int b0, int b1)
{
    FG_HEAD_BODY
}

#ifdef FL_GEN_MULTI
FL_TARGET_AVX2 static void FG(head_blocks_avx2_)(const fl_head *h, int N, const REAL *x,
                                                 ptrdiff_t ldx, REAL *y, ptrdiff_t ldy,
                                                 int b0, int b1)
{
    FG_HEAD_BODY
}

FL_TARGET_AVX512 static void FG(head_blocks_avx512_)(const fl_head *h, int N, const REAL *x,
                                                     ptrdiff_t ldx, REAL *y, ptrdiff_t ldy,
                                                     int b0, int b1)
{
    FG_HEAD_BODY
}
#endif

static void FG(head_blocks_)(const fl_head *h, int N, const REAL *x, ptrdiff_t ldx, REAL *y,
                             ptrdiff_t ldy, int b0, int b1)
{
#ifdef FL_GEN_MULTI
    int isa = fl_isa_active();
    if (isa >= FL_ISA_AVX512) {
        FG(head_blocks_avx512_)(h, N, x, ldx, y, ldy, b0, b1);
        return;
    }
    if (isa == FL_ISA_AVX2) {
        FG(head_blocks_avx2_)(h, N, x, ldx, y, ldy, b0, b1);
        return;
    }
#endif
    FG(head_blocks_portable_)(h, N, x, ldx, y, ldy, b0, b1);
}

typedef struct {
    const fl_head *h;
    int N;
    const REAL *x;
    ptrdiff_t ldx;
    REAL *y;
    ptrdiff_t ldy;
} FG(head_task_);

static void FG(head_thread_)(void *arg, int tid, int nt)
{
    FG(head_task_) *t = (FG(head_task_) *)arg;
    int nb = t->h->nb;
    int b0 = (int)((long)nb * tid / nt), b1 = (int)((long)nb * (tid + 1) / nt);
    if (b1 > b0) FG(head_blocks_)(t->h, t->N, t->x, t->ldx, t->y, t->ldy, b0, b1);
}

/* nthreads: at most the number of CPUs (the caller asks sysconf once per
 * call: it reads /sys and costs microseconds).
 * Threads only when each gets enough work (~2^17 multiply-adds) to pay for
 * waking the pool; the result does not depend on the split. */
static void FG(head_run_)(const fl_head *h, int N, const REAL *x, ptrdiff_t ldx, REAL *y,
                          ptrdiff_t ldy, int nthreads)
{
    if (N <= 0) return;
    double work = (double)N * h->in * h->out;
    int nt = nthreads; /* already clamped to the CPU count by the caller */
    if (nt > FL_MAX_THREADS) nt = FL_MAX_THREADS;
    if (nt > h->nb) nt = h->nb;
    if ((double)nt * 131072.0 > work) nt = (int)(work / 131072.0);
    if (nt <= 1) {
        FG(head_blocks_)(h, N, x, ldx, y, ldy, 0, h->nb);
        return;
    }
    FG(head_task_) task = {h, N, x, ldx, y, ldy};
    fl_pool_run(FG(head_thread_), &task, nt);
}

/* ------------------------------------------------------------- sampling */
static int FG(argmax_)(const REAL *l, int V)
{
    int best = 0;
    for (int v = 0; v < V; v++) {
        if (l[v] != l[v]) return v; /* NaN: torch.argmax treats it as the maximum */
        if (l[v] > l[best]) best = v;
    }
    return best;
}

/* The k-th largest of l[0..V) (1 <= k < V, no NaN): a min-heap of the k
 * largest seen so far; its root at the end. */
static REAL FG(kth_largest_)(const REAL *l, int V, int k, REAL *heap)
{
    for (int i = 0; i < k; i++) {
        /* sift up */
        int j = i;
        REAL v = l[i];
        while (j > 0) {
            int p = (j - 1) / 2;
            if (heap[p] <= v) break;
            heap[j] = heap[p];
            j = p;
        }
        heap[j] = v;
    }
    for (int i = k; i < V; i++) {
        REAL v = l[i];
        if (!(v > heap[0])) continue;
        /* replace the root, sift down */
        int j = 0;
        for (;;) {
            int c = 2 * j + 1;
            if (c >= k) break;
            if (c + 1 < k && heap[c + 1] < heap[c]) c++;
            if (heap[c] >= v) break;
            heap[j] = heap[c];
            j = c;
        }
        heap[j] = v;
    }
    return heap[0];
}

static int FG(sample_)(const REAL *l, int V, double temperature, int top_k, uint64_t seed,
                       uint64_t stream, uint64_t step, double *prob, REAL *heap)
{
    int best = FG(argmax_)(l, V);
    if (l[best] != l[best]) return best;           /* NaN */
    if (temperature <= 0.0 || top_k == 1) return best;
    const double m = (double)l[best];
    if (isinf(m)) return best;                     /* +inf wins; all -inf: index 0 */
    int keep_all = top_k <= 0 || top_k >= V;
    REAL thr = 0;
    int quota = 0; /* how many logits equal to thr are kept, lowest index first */
    if (!keep_all) {
        thr = FG(kth_largest_)(l, V, top_k, heap);
        int greater = 0;
        for (int v = 0; v < V; v++) greater += l[v] > thr;
        quota = top_k - greater;
    }
    const double inv_t = 1.0 / temperature;
    double total = 0.0;
    for (int v = 0; v < V; v++) {
        int kept = keep_all || l[v] > thr || (l[v] == thr && quota-- > 0);
        double pv = kept ? exp(((double)l[v] - m) * inv_t) : 0.0;
        prob[v] = pv;
        total += pv;
    }
    double target = fl_gen_uniform(seed, stream, step) * total;
    double acc = 0.0;
    int last = best;
    for (int v = 0; v < V; v++) {
        if (prob[v] <= 0.0) continue;
        acc += prob[v];
        last = v;
        if (acc > target) return v;
    }
    return last; /* rounding: the last token with a nonzero probability */
}

/* --------------------------------------------------------------- driver */
/* x[t*N + n] = input vector of token tok: embedding row or one-hot. */
static inline void FG(lookup_)(const fl_gen_net *net, int32_t tok, REAL *dst)
{
    const int E = net->in_features;
    if (net->embedding) {
        memcpy(dst, (const REAL *)net->embedding + (size_t)tok * E, (size_t)E * sizeof(REAL));
    } else {
        memset(dst, 0, (size_t)E * sizeof(REAL));
        dst[tok] = (REAL)1;
    }
}

static int FG(run_stages_)(const fl_gen_net *net, int T, int N, const REAL *x0, REAL *ybuf[2],
                           const int32_t *lengths, void *lstm_ws, int nthreads)
{
    const REAL *xin = x0;
    int in = net->in_features;
    for (int s = 0; s < net->nstages; s++) {
        const fl_gen_stage *st = &net->stages[s];
        const int Hout = st->cells[0]->Hout;
        fl_io io;
        io.T = T;
        io.N = N;
        io.x = xin;
        io.x_st = (ptrdiff_t)N * in;
        io.x_sn = in;
        io.y = ybuf[s & 1];
        io.y_st = (ptrdiff_t)N * Hout;
        io.y_sn = Hout;
        io.h0 = st->h;
        io.c0 = st->c;
        io.hn = st->h;
        io.cn = st->c;
        io.lengths = lengths;
        io.eager_threads = 0;
        int rc = fl_forward(st->cells, st->layers, 1, &io, lstm_ws, nthreads);
        if (rc != 0) return rc - 10;
        xin = ybuf[s & 1];
        in = Hout;
    }
    return 0;
}

static int FG(generate_)(const fl_gen_net *net, const fl_gen_io *io, char *base,
                         const gen_plan *p, int nthreads)
{
    const int N = io->N, T = io->T, steps = io->steps, E = net->in_features;
    const int V = net->head->out;
    if (N == 0) return 0;
    void *lstm_ws = base + p->lstm;
    REAL *x = (REAL *)(base + p->x);
    REAL *ybuf[2] = {(REAL *)(base + p->y0), (REAL *)(base + p->y1)};
    REAL *logits = (REAL *)(base + p->logits);
    double *prob = (double *)(base + p->prob);
    REAL *heap = (REAL *)(base + p->sel);
    int32_t *tok = (int32_t *)(base + p->tok);
    const fl_gen_stage *top = &net->stages[net->nstages - 1];
    const int Hout = top->cells[0]->Hout;
    const REAL *htop = (const REAL *)top->h + (size_t)(top->layers - 1) * N * Hout;
    int rc;

    /* 1. the prompt, in one call per stage */
    if (T > 0) {
        for (int t = 0; t < T; t++)
            for (int n = 0; n < N; n++) {
                int L = io->lengths ? io->lengths[n] : T;
                REAL *dst = x + ((size_t)t * N + n) * E;
                if (t < L) FG(lookup_)(net, io->prompt[(size_t)n * T + t], dst);
                else memset(dst, 0, (size_t)E * sizeof(REAL));
            }
        rc = FG(run_stages_)(net, T, N, x, ybuf, io->lengths, lstm_ws, nthreads);
        if (rc != 0) return rc;
    }
    if (steps == 0) return 0;
    FG(head_run_)(net->head, N, htop, Hout, logits, V, nthreads);

    /* 2. token by token */
    for (int s = 0; s < steps; s++) {
        for (int n = 0; n < N; n++) {
            const REAL *ln = logits + (size_t)n * V;
            int v;
            if (io->temperature > 0.0 && io->top_k != 1)
                v = FG(sample_)(ln, V, io->temperature, io->top_k, io->seeds[n], io->streams[n],
                                (uint64_t)s, prob, heap);
            else
                v = FG(argmax_)(ln, V);
            tok[n] = v;
            io->tokens[(size_t)n * steps + s] = v;
        }
        if (s + 1 == steps) break;
        for (int n = 0; n < N; n++) FG(lookup_)(net, tok[n], x + (size_t)n * E);
        rc = FG(run_stages_)(net, 1, N, x, ybuf, NULL, lstm_ws, nthreads);
        if (rc != 0) return rc;
        FG(head_run_)(net->head, N, htop, Hout, logits, V, nthreads);
    }
    return 0;
}

#undef FG_HEAD_BODY
#undef FG
#undef FG_CAT
#undef FG_CAT_
