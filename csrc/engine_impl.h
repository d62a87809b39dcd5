/*
 * The forward driver, instantiated for float and double by engine.c.
 * Expects REAL, SFX and KERNELS (an expression giving the kernel table).
 *
 * One call = one parallel region.  Each thread owns either a range of batch
 * rows (no synchronisation at all: rows are independent through time and
 * layers) or a range of hidden blocks (one barrier per step, two with a
 * projection: every thread needs all of h_{t-1}).  Within its share a thread
 *   - computes the input projection G = x W_ih^T + b for a chunk of time
 *     steps (its own rows/blocks only, so no barrier), into a buffer sized to
 *     stay in cache, then
 *   - runs those steps: per block of 16 hidden units one kernel call does
 *     h_{t-1} W_hh^T for all four gates and the gate math in its epilogue.
 */
#define FL_CAT_(a, b) a##b
#define FL_CAT(a, b) FL_CAT_(a, b)
#define FN(name) FL_CAT(name, SFX)

typedef struct {
    fl_cell *const *cells;
    int L, D, T, N, TC;
    const fl_io *io;
    int split_batch;
    int split_dir;    /* two threads, one direction each (bidirectional float32 stacks) */
    REAL *G;          /* TC x N x (nb*64); a second one at G + gstride for direction 1 */
    ptrdiff_t gstride;
    REAL *buf[2];     /* inter-layer outputs, T x N x (D*Hout) */
    REAL *hraw;       /* N x H, projection input */
    int *cnt;         /* T + 1 counts of active rows */
    char *q;          /* int8 W_hh: qcopies copies of h_{t-1} (fl_hq_copy_bytes) */
    size_t qcopy, qscale_off; /* bytes per copy; offset of its scales */
    int ldq, qcopies;
    int16_t *xq;      /* int8 W_ih: the chunk's input rows quantized (rows of ldx int16) */
    float *xqs;       /* and their scales */
    int ldx;
    int kc;           /* K chunk of the GEMMs for this REAL, read once per call */
    int row_split[FL_MAX_THREADS + 1];
} FN(ctx_);

/* Room in the workspace for a call's context and its io, each on lines of
 * their own (forward_). */
#define FL_ROOM_(type) ((sizeof(type) + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN)

/* h_n rows [hr0, hr1), columns [col0, col1) of layer l, direction d: the
 * output at each row's last processed step (ydir: that direction's output,
 * strides yst, ysn), h0 for rows of length 0 (h0 may alias h_n), else 0. */
static void FN(hn_copy_)(const FN(ctx_) *cx, int l, int d, int col0, int col1, int hr0, int hr1,
                         const REAL *ydir, ptrdiff_t yst, ptrdiff_t ysn)
{
    const fl_io *io = cx->io;
    const int N = cx->N, T = cx->T, D = cx->D, Hout = cx->cells[0]->Hout;
    const int32_t *len = io->lengths;
    REAL *hn = (REAL *)io->hn + (size_t)(l * D + d) * N * Hout;
    const REAL *h0 = io->h0 ? (const REAL *)io->h0 + (size_t)(l * D + d) * N * Hout : NULL;
    if (col1 <= col0) return;
    for (int n = hr0; n < hr1; n++) {
        int Ln = len ? len[n] : T;
        REAL *dst = hn + (size_t)n * Hout + col0;
        size_t bytes = (size_t)(col1 - col0) * sizeof(REAL);
        if (Ln > 0)
            memcpy(dst, ydir + (ptrdiff_t)(d ? 0 : Ln - 1) * yst + n * ysn + col0, bytes);
        else if (h0)
            memmove(dst, h0 + (size_t)n * Hout + col0, bytes); /* h0 may alias hn */
        else
            memset(dst, 0, bytes);
    }
}

static inline int FN(imin_)(int a, int b) { return a < b ? a : b; }

/* Rows of the tile that starts `off` rows into a run of `rows` rows cut into
 * ceil(rows / rmax) tiles as evenly as possible (8 rows: 4 + 4, not 6 + 2;
 * the kernels run 4-6 rows at ~the same speed, 2 rows ~15% slower); `off`
 * is a tile start.  A row's sums never depend on its tile. */
static inline int FN(tile_at_)(int rows, int rmax, int off)
{
    const int ntile = (rows + rmax - 1) / rmax, base = rows / ntile, extra = rows % ntile;
    return off < extra * (base + 1) ? base + 1 : base;
}

/* The same for the tile starting at row n when rows [a, b) (continuing from
 * the previous step) and [b, c) (starting from h0) are tiled apart. */
static inline int FN(seg_tile_)(int n, int a, int b, int c, int rmax)
{
    return n < b ? FN(tile_at_)(b - a, rmax, n - a) : FN(tile_at_)(c - b, rmax, n - b);
}

/* Rows (o, i) for o in [o0, o1), i in [0, ni): A row at A + o*a_so + i*a_si,
 * G row at G + o*g_so + i*g_si.  Blocks [j0, j1).
 * Blocking: a chunk of rows whose A slice stays in L2, and K in chunks of
 * fl_kc so that the panel slice stays in cache while every row tile of the
 * chunk streams over it; partial sums accumulate in G in place.  When the
 * (o, i) rows are one evenly strided matrix (a contiguous x: time steps of
 * whole batches) they are tiled as one, so every tile but the last has rmax
 * rows (batch 8 would otherwise run tiles of 6 + 2 at every time step).
 * A row's sum never depends on its tile, so the results do not either. */
static void FN(input_gemm_)(const fl_cell *cell, int kc_, const REAL *A, ptrdiff_t a_so, ptrdiff_t a_si,
                            REAL *G, ptrdiff_t g_so, ptrdiff_t g_si,
                            int o0, int o1, int ni, int j0, int j1)
{
    const KERNELS_T *kr = KERNELS;
    const int K = cell->in, rmax = kr->rmax;
    const REAL *wih = (const REAL *)cell->wih, *bias = (const REAL *)cell->bias;
    if (o1 - o0 > 1 && a_so == (ptrdiff_t)ni * a_si && g_so == (ptrdiff_t)ni * g_si
        && (long)(o1 - o0) * ni <= 0x7fffffffL) {
        A += (ptrdiff_t)o0 * a_so;
        G += (ptrdiff_t)o0 * g_so;
        ni *= o1 - o0;
        o0 = 0;
        o1 = 1;
    }
    /* rows per chunk: their A slices (one K chunk each) within ~256 KB */
    size_t row_bytes = (size_t)(K < kc_ ? K : kc_) * sizeof(REAL);
    int rc = row_bytes ? (int)((256u * 1024u) / row_bytes) / rmax * rmax : rmax;
    if (rc < rmax) rc = rmax;
    int ic = ni, oc = 1;
    if (ni >= rc) ic = rc;
    else oc = rc / (ni > 0 ? ni : 1);
    if (oc < 1) oc = 1;
    for (int c0 = o0; c0 < o1; c0 += oc) {
        int c1 = FN(imin_)(o1, c0 + oc);
        for (int i0 = 0; i0 < ni; i0 += ic) {
            int i1 = FN(imin_)(ni, i0 + ic);
            for (int j = j0; j < j1; j++) {
                const REAL *panel = wih + (size_t)j * K * FL_PW;
                const REAL *bj = bias + (size_t)j * FL_PW;
                int k0 = 0;
                do {
                    int kc = FN(imin_)(kc_, K - k0);
                    for (int o = c0; o < c1; o++) {
                        for (int i = i0, R; i < i1; i += R) {
                            R = FN(tile_at_)(i1 - i0, rmax, i - i0);
                            REAL *g = G + o * g_so + i * g_si + (ptrdiff_t)j * FL_PW;
                            kr->gemm(R, kc, A + o * a_so + i * a_si + k0, a_si,
                                     panel + (size_t)k0 * FL_PW, k0 ? g : bj, k0 ? g_si : 0,
                                     g, g_si, FL_PW);
                        }
                    }
                    k0 += kc;
                } while (k0 < K);
            }
        }
    }
}

#ifdef FL_HAVE_LSTMQ
/* int8 W_ih: G rows (o, i), o < no, i < ni (at G + o*g_so + i*g_si) from the
 * quantized input rows m = o*ni + i (Q + m*ldx, scales qs[m]), blocks
 * [j0, j1): G = bias + dequantized (x W_ih^T), each row's sum the exact
 * int32 chunk sums of fl_lstmi8_f32.  Rows in chunks whose Q slice stays in
 * L2 while every block streams its panel over them. */
static void input_gemm_i8_(const fl_cell *cell, const int16_t *Q, ptrdiff_t ldx, const float *qs,
                           float *G, ptrdiff_t g_so, ptrdiff_t g_si, int no, int ni, int j0, int j1)
{
    const fl_kernels_f32 *kr = fl_kernels_f32_active();
    const int K = cell->in, rmax = kr->rmax, nch = fl_i8_chunks(K);
    const size_t pstride = (size_t)fl_whhq_rows(FL_W_I8, K) * FL_PW;
    if (no > 1 && g_so == (ptrdiff_t)ni * g_si && (long)no * ni <= 0x7fffffffL) {
        ni *= no;
        no = 1;
    }
    int rc = (int)((256u * 1024u) / ((size_t)ldx * sizeof(int16_t))) / rmax * rmax;
    if (rc < rmax) rc = rmax;
    for (int o = 0; o < no; o++)
        for (int i0 = 0; i0 < ni; i0 += rc) {
            int i1 = i0 + rc < ni ? i0 + rc : ni;
            for (int j = j0; j < j1; j++) {
                const int8_t *panel = (const int8_t *)cell->wihq + (size_t)j * pstride;
                for (int i = i0, R; i < i1; i += R) {
                    R = tile_at_f32(i1 - i0, rmax, i - i0);
                    ptrdiff_t m = (ptrdiff_t)o * ni + i;
                    kr->lstmi8(R, K, Q + m * ldx, ldx, qs + m, panel,
                               cell->wih_corr + (size_t)j * nch * FL_PW, fl_act_planes(cell),
                               cell->wih_scale + (size_t)j * FL_PW,
                               (const float *)cell->bias + (size_t)j * FL_PW, 0, NULL, 0,
                               G + o * g_so + i * g_si + (ptrdiff_t)j * FL_PW, g_si, FL_PW, NULL);
                }
            }
        }
}

/* bfloat16 W_ih: G rows (o, i) as input_gemm_i8_, from the input rows
 * rounded to bfloat16 (B + m*ldb, m = o*ni + i): G = bias + x W_ih^T with
 * the sums of fl_lstmb_f32. */
static void input_gemm_b_(const fl_cell *cell, const uint16_t *B, ptrdiff_t ldb, float *G,
                          ptrdiff_t g_so, ptrdiff_t g_si, int no, int ni, int j0, int j1)
{
    const fl_kernels_f32 *kr = fl_kernels_f32_active();
    const int K = cell->in, rmax = kr->rmax;
    const size_t pstride = (size_t)fl_whhq_rows(FL_W_BF16D, K) * FL_PW;
    if (no > 1 && g_so == (ptrdiff_t)ni * g_si && (long)no * ni <= 0x7fffffffL) {
        ni *= no;
        no = 1;
    }
    int rc = (int)((256u * 1024u) / ((size_t)ldb * sizeof(uint16_t))) / rmax * rmax;
    if (rc < rmax) rc = rmax;
    for (int o = 0; o < no; o++)
        for (int i0 = 0; i0 < ni; i0 += rc) {
            int i1 = i0 + rc < ni ? i0 + rc : ni;
            for (int j = j0; j < j1; j++) {
                const uint16_t *panel = (const uint16_t *)cell->wihq + (size_t)j * pstride;
                for (int i = i0, R; i < i1; i += R) {
                    R = tile_at_f32(i1 - i0, rmax, i - i0);
                    ptrdiff_t m = (ptrdiff_t)o * ni + i;
                    kr->lstmb(R, K, B + m * ldb, ldb, panel, (const float *)cell->bias + (size_t)j * FL_PW,
                              0, NULL, 0, G + o * g_so + i * g_si + (ptrdiff_t)j * FL_PW, g_si, FL_PW, NULL);
                }
            }
        }
}
#endif

/* One step for hidden block j and rows [n0, n1): gates = G + h_{t-1} W_hh^T,
 * then the epilogue.  K is cut in chunks of fl_kc (the panel slice stays in
 * L1 across row tiles; partial sums accumulate in G in place) and only the
 * last chunk runs the fused LSTM kernel.  The chunking does not depend on
 * the rows, so every thread split gives bitwise the same sums. */
static inline void FN(step_block_)(const KERNELS_T *kr, int kc, int K, const REAL *A, ptrdiff_t lda,
                                   const REAL *panel, REAL *Gj, ptrdiff_t ldg,
                                   REAL *c, ptrdiff_t ldc, REAL *h, ptrdiff_t ldh,
                                   int n0, int n1, int nvalid, const fl_epi *epi,
                                   const REAL *pf)
{
    const int rmax = kr->rmax;
    int klast = 0;
    /* pf: the panel of the next block, prefetched into L2 slice by slice
     * between tile calls (compute-bound steps only: see the caller). */
    const int ntile = (n1 - n0 + rmax - 1) / rmax;
    const int parts = ntile * ((A && K > kc) ? (K - 1) / kc + 1 : 1);
    const size_t pf_bytes = (size_t)K * FL_PW * sizeof(REAL);
    int part = 0;
    if (A && K > kc) { /* also with one tile: sums must not depend on the tiling */
        klast = (K - 1) / kc * kc;
        for (int k0 = 0; k0 < klast; k0 += kc)
            for (int n = n0, R; n < n1; n += R) {
                R = FN(tile_at_)(n1 - n0, rmax, n - n0);
                if (pf) fl_prefetch_l2_slice(pf, pf_bytes, part++, parts);
                kr->gemm(R, kc, A + n * lda + k0, lda, panel + (size_t)k0 * FL_PW,
                         Gj + n * ldg, ldg, Gj + n * ldg, ldg, FL_PW);
            }
    }
    for (int n = n0, R; n < n1; n += R) {
        R = FN(tile_at_)(n1 - n0, rmax, n - n0);
        if (pf) fl_prefetch_l2_slice(pf, pf_bytes, part++, parts);
        kr->lstm(R, K - klast, A ? A + n * lda + klast : NULL, lda, panel + (size_t)klast * FL_PW,
                 Gj + n * ldg, ldg, c + n * ldc, ldc, h + n * ldh, ldh, nvalid, epi);
    }
}

/* h_{t-1} of row n: rows below rs continue from the previous step's output
 * (Aprev, stride ysn), the others start from h0 (stride Hout); NULL = zero. */
static inline const REAL *FN(hprev_row_)(int n, int rs, const REAL *Aprev, ptrdiff_t ysn,
                                          const REAL *h0, int Hout)
{
    if (n < rs) return Aprev ? Aprev + n * ysn : NULL;
    return h0 ? h0 + (ptrdiff_t)n * Hout : NULL;
}

static void FN(thread_)(void *arg, int tid, int nt)
{
    FN(ctx_) *cx = (FN(ctx_) *)arg;
    const fl_io *io = cx->io;
    const KERNELS_T *kr = KERNELS;
    const int L = cx->L, D = cx->D, T = cx->T, N = cx->N, TC = cx->TC, rmax = kr->rmax, kc = cx->kc;
    const fl_cell *c0cell = cx->cells[0];
    const int H = c0cell->H, P = c0cell->P, Hout = c0cell->Hout, nb = c0cell->nb, np = c0cell->np;
    const ptrdiff_t ldg = (ptrdiff_t)nb * FL_PW;
    /* cnt[t]: rows active at time t (lengths sorted descending: a prefix). */
    const int *cnt = cx->cnt;
    int n0 = 0, n1 = N, j0 = 0, j1 = nb, p0 = 0, p1 = np;
    /* the pool may run a call on one thread after all (congestion, or
     * another call holding it): the splits then do not apply */
    const int split_dir = cx->split_dir && nt > 1;
    const int sync = (nt > 1) && !cx->split_batch && !split_dir;
    if (nt > 1 && !split_dir) {
        if (cx->split_batch) {
            n0 = cx->row_split[tid];
            n1 = cx->row_split[tid + 1];
        } else {
            j0 = (int)((long)nb * tid / nt);
            j1 = (int)((long)nb * (tid + 1) / nt);
            p0 = (int)((long)np * tid / nt);
            p1 = (int)((long)np * (tid + 1) / nt);
        }
    }
    unsigned fpsave = fl_fpenv_enter();

    for (int l = 0; l < L; l++) {
        const REAL *xin;
        ptrdiff_t xst, xsn;
        REAL *yout;
        ptrdiff_t yst, ysn;
        if (l == 0) {
            xin = (const REAL *)io->x; xst = io->x_st; xsn = io->x_sn;
        } else {
            xin = cx->buf[(l - 1) & 1]; xst = (ptrdiff_t)N * D * Hout; xsn = (ptrdiff_t)D * Hout;
        }
        if (l == L - 1) {
            yout = (REAL *)io->y; yst = io->y_st; ysn = io->y_sn;
        } else {
            yout = cx->buf[l & 1]; yst = (ptrdiff_t)N * D * Hout; ysn = (ptrdiff_t)D * Hout;
        }
        /* A direction split: each thread runs its direction over every row
         * and block, without a barrier per step; both wait at the end of a
         * layer, whose output the next layer reads whole. */
        if (split_dir && l > 0) fl_pool_barrier(tid, nt);
        for (int d = 0; d < D; d++) {
            if (split_dir && d != tid) continue;
            REAL *const Gd = cx->G + (split_dir ? d * cx->gstride : 0);
            const fl_cell *cell = cx->cells[l * D + d];
            const REAL *whh = (const REAL *)cell->whh;
            const REAL *whr = (const REAL *)cell->whr;
            REAL *cst = (REAL *)io->cn + (size_t)(l * D + d) * N * H;
            const REAL *h0 = io->h0 ? (const REAL *)io->h0 + (size_t)(l * D + d) * N * Hout : NULL;
            REAL *ydir = yout + (ptrdiff_t)d * Hout;
            /* the call's last layer and direction of a hidden split: its h_n
             * is copied by the caller after the call (see the last barrier) */
            const int defer_hn = sync && l == L - 1 && d == D - 1;
            fl_epi epi;
            epi.is_default = cell->is_default;
            epi.opts = &cell->opts;
#ifdef FL_HAVE_LSTMQ
            /* A one-step call (a streaming step) with float32 weights: the
             * input projection runs inside the recurrent kernel (lstmx),
             * block by block, the same bits without G's round trip. */
            const int fuse = T == 1 && kr->lstmx && !cell->wihq && cell->wtype == FL_W_F32;
#else
            const int fuse = 0;
#endif

            for (int s0 = 0; s0 < T; s0 += TC) {
                int s1 = FN(imin_)(T, s0 + TC);
                /* time steps of this chunk: t in [tlo, tlo + nts) */
                int tlo = d ? T - s1 : s0;
                int nts = s1 - s0;
                int rows_hi = FN(imin_)(n1, cnt[tlo]); /* most rows active in the chunk */
                if (rows_hi <= n0 && !sync) {
                    if (!d) break; /* forward: later chunks are shorter still */
                    continue;
                }
                if (cnt[tlo] == 0) { /* no row of any thread is active: skip together */
                    if (!d) break;
                    continue;
                }
                int nrows = rows_hi - n0;
                const REAL *xa = xin + (ptrdiff_t)tlo * xst + (ptrdiff_t)n0 * xsn;
                REAL *ga = Gd + (ptrdiff_t)n0 * ldg;
                /* The input GEMM tiles batch rows (time major) when there are
                 * enough of them or one step, else time steps. */
                const int tmaj = nrows >= rmax || nts == 1;
#ifdef FL_HAVE_LSTMQ
                if (cell->wihq) {
                    /* int8 W_ih: quantize the chunk's input rows once, like h
                     * (fl_quantize_h), into rows m of the GEMM's order: time
                     * major (m = t*nrows + i) when it tiles batch rows, batch
                     * major when it tiles time steps (few rows).  A batch
                     * split: each thread its own rows [n0 * TC, n1 * TC), the
                     * same for every chunk and layer (the threads do not
                     * wait for each other: one may be chunks ahead); a
                     * hidden split: the threads share the rows out, then
                     * wait for each other (once per chunk). */
                    const int M = nrows > 0 ? nts * nrows : 0;
                    const int ldx = cx->ldx;
                    /* a direction split: each thread its direction's copy */
                    const ptrdiff_t xr0 = (split_dir ? (ptrdiff_t)d * TC * N : 0) + (ptrdiff_t)n0 * TC;
                    int16_t *Qx = cx->xq + xr0 * ldx;
                    float *qxs = cx->xqs + xr0;
                    int m0 = sync ? (int)((long)M * tid / nt) : 0;
                    int m1 = sync ? (int)((long)M * (tid + 1) / nt) : M;
                    const int bf = cell->wih_type == FL_W_BF16D;
                    for (int m = m0; m < m1; m++) {
                        int tr = tmaj ? m / nrows : m % nts, i = tmaj ? m % nrows : m / nts;
                        const REAL *xr = xa + (ptrdiff_t)tr * xst + (ptrdiff_t)i * xsn;
                        if (bf)
                            fl_round_bf16_row(xr, cell->in, fl_whhq_rows(FL_W_BF16D, cell->in),
                                              (uint16_t *)(Qx + (ptrdiff_t)m * ldx));
                        else
                            fl_quantize_h(xr, cell->in, ldx / 2, cell->act_bits,
                                          Qx + (ptrdiff_t)m * ldx, qxs + m);
                    }
                    if (sync) fl_pool_barrier(tid, nt);
                    if (M > 0 && bf) {
                        if (tmaj)
                            input_gemm_b_(cell, (const uint16_t *)Qx, ldx, ga, (ptrdiff_t)N * ldg, ldg,
                                          nts, nrows, j0, j1);
                        else
                            input_gemm_b_(cell, (const uint16_t *)Qx, ldx, ga, ldg, (ptrdiff_t)N * ldg,
                                          nrows, nts, j0, j1);
                    } else if (M > 0) {
                        if (tmaj)
                            input_gemm_i8_(cell, Qx, ldx, qxs, ga, (ptrdiff_t)N * ldg, ldg, nts, nrows,
                                           j0, j1);
                        else
                            input_gemm_i8_(cell, Qx, ldx, qxs, ga, ldg, (ptrdiff_t)N * ldg, nrows, nts,
                                           j0, j1);
                    }
                } else
#endif
                if (nrows > 0 && !fuse) {
                    if (tmaj)
                        FN(input_gemm_)(cell, kc, xa, xst, xsn, ga, (ptrdiff_t)N * ldg, ldg,
                                        0, nts, nrows, j0, j1);
                    else
                        FN(input_gemm_)(cell, kc, xa, xsn, xst, ga, ldg, (ptrdiff_t)N * ldg,
                                        0, nrows, nts, j0, j1);
                }
                for (int s = s0; s < s1; s++) {
                    int t = d ? T - 1 - s : s;
                    int nact = cnt[t];
                    if (nact == 0) continue; /* the same for every thread */
                    int r1 = FN(imin_)(n1, nact);
                    /* Rows [n0, rs) continue from y[t -/+ 1]; rows [rs, r1) start
                     * here from h0 (every row at t = 0 forward; in reverse, the
                     * rows whose valid prefix ends at t). */
                    int rs = s == 0 ? n0 : (d ? FN(imin_)(r1, cnt[t + 1]) : r1);
                    if (rs < n0) rs = n0;
                    const REAL *Aprev = s == 0 ? NULL : ydir + (ptrdiff_t)(d ? t + 1 : t - 1) * yst;
                    REAL *Gt = Gd + (ptrdiff_t)(t - tlo) * N * ldg;
                    REAL *hdst = P ? cx->hraw : ydir + (ptrdiff_t)t * yst;
                    ptrdiff_t ldh = P ? H : ysn;
#ifdef FL_HAVE_LSTMQ
                    /* int8 W_hh: h_{t-1} to int16 (and its byte planes), once per
                     * row and step, before the blocks.  Threads that split the blocks each quantize
                     * every row into their own copy (the same bits in each: no
                     * barrier); threads that split the rows share copy 0. */
                    int16_t *qh = NULL;
                    float *qs = NULL;
                    const int ldq = cx->ldq;
                    /* bfloat16 dot products: h_{t-1} to bfloat16 codes, once per
                     * row and step, in the same buffers (and copies) as int8's. */
                    uint16_t *hb = NULL;
                    if (cell->wtype == FL_W_BF16D) {
                        hb = (uint16_t *)(cx->q + (size_t)(sync || split_dir ? tid : 0) * cx->qcopy);
                        const int kp = fl_whhq_rows(FL_W_BF16D, Hout);
                        for (int n = n0; n < r1; n++) {
                            const REAL *src = FN(hprev_row_)(n, rs, Aprev, ysn, h0, Hout);
                            if (src) fl_round_bf16_row(src, Hout, kp, hb + (ptrdiff_t)n * ldq);
                        }
                    }
                    if (cell->wtype == FL_W_I8) {
                        char *qb = cx->q + (size_t)(sync || split_dir ? tid : 0) * cx->qcopy;
                        qh = (int16_t *)qb;
                        qs = (float *)(qb + cx->qscale_off);
                        for (int n = n0; n < r1; n++) {
                            const REAL *src = FN(hprev_row_)(n, rs, Aprev, ysn, h0, Hout);
                            if (src)
                                fl_quantize_h(src, Hout, ldq / 2, cell->act_bits,
                                              qh + (ptrdiff_t)n * ldq, qs + n);
                        }
                    }
#endif
                    /* Zig-zag over the blocks: odd steps walk them backwards, so
                     * the panels read last (still in L2) are read first; when
                     * W_hh is larger than L2 about an L2's worth of it hits. */
                    for (int jj = j0; jj < j1; jj++) {
                        int j = (s & 1) ? j0 + j1 - 1 - jj : jj;
                        int nvalid = FN(imin_)(FL_BW, H - j * FL_BW);
                        epi.peep = cell->peep ? (const REAL *)cell->peep + (size_t)j * 3 * FL_BW : NULL;
#ifdef FL_HAVE_LSTMQ
                        if (cell->wtype == FL_W_I8) {
                            const int8_t *pq = (const int8_t *)cell->whhq + (size_t)j * fl_whhq_rows(FL_W_I8, Hout) * FL_PW;
                            const float *sc = cell->whh_scale + (size_t)j * FL_PW;
                            const int32_t *corr = cell->whh_corr + (size_t)j * fl_i8_chunks(Hout) * FL_PW;
                            for (int n = n0, R; n < r1; n += R) {
                                R = FN(seg_tile_)(n, n0, rs, r1, rmax);
                                int has = n < rs ? Aprev != NULL : h0 != NULL;
                                kr->lstmi8(R, Hout, has ? qh + (ptrdiff_t)n * ldq : NULL, ldq, qs + n, pq,
                                           corr, fl_act_planes(cell), sc,
                                           Gt + n * ldg + (ptrdiff_t)j * FL_PW, ldg,
                                           cst + (ptrdiff_t)n * H + j * FL_BW, H,
                                           hdst + n * ldh + j * FL_BW, ldh, nvalid, &epi);
                            }
                            continue;
                        }
                        if (cell->wtype == FL_W_BF16D) {
                            const uint16_t *pb = (const uint16_t *)cell->whhq;
                            const size_t pst = (size_t)fl_whhq_rows(FL_W_BF16D, Hout) * FL_PW;
                            if (kr->lstmb2 && r1 - n0 == 1 && jj + 1 < j1) {
                                /* one row: blocks in adjacent pairs, as lstmq2 below */
                                int jf = (s & 1) ? j - 1 : j;
                                int has = n0 < rs ? Aprev != NULL : h0 != NULL;
                                epi.peep = cell->peep ? (const REAL *)cell->peep + (size_t)jf * 3 * FL_BW : NULL;
                                kr->lstmb2(Hout, has ? hb + (ptrdiff_t)n0 * ldq : NULL, pb + (size_t)jf * pst,
                                           Gt + n0 * ldg + (ptrdiff_t)jf * FL_PW,
                                           cst + (ptrdiff_t)n0 * H + jf * FL_BW, hdst + n0 * ldh + jf * FL_BW,
                                           FN(imin_)(FL_BW, H - (jf + 1) * FL_BW), &epi);
                                jj++;
                                continue;
                            }
                            for (int n = n0, R; n < r1; n += R) {
                                R = FN(seg_tile_)(n, n0, rs, r1, rmax);
                                int has = n < rs ? Aprev != NULL : h0 != NULL;
                                kr->lstmb(R, Hout, has ? hb + (ptrdiff_t)n * ldq : NULL, ldq, pb + (size_t)j * pst,
                                          Gt + n * ldg + (ptrdiff_t)j * FL_PW, ldg,
                                          cst + (ptrdiff_t)n * H + j * FL_BW, H,
                                          hdst + n * ldh + j * FL_BW, ldh, nvalid, &epi);
                            }
                            continue;
                        }
                        if (cell->wtype != FL_W_F32 && kr->lstmq2 && r1 - n0 == 1 && jj + 1 < j1) {
                            /* One row: blocks in adjacent pairs, (j, j+1) walking
                             * forwards, (j-1, j) backwards; an odd last one alone. */
                            int jf = (s & 1) ? j - 1 : j;
                            const REAL *An = FN(hprev_row_)(n0, rs, Aprev, ysn, h0, Hout);
                            epi.peep = cell->peep ? (const REAL *)cell->peep + (size_t)jf * 3 * FL_BW : NULL;
                            kr->lstmq2(cell->wtype, Hout, An,
                                       (const char *)cell->whhq + (size_t)jf * Hout * FL_PW * 2,
                                       Gt + n0 * ldg + (ptrdiff_t)jf * FL_PW,
                                       cst + (ptrdiff_t)n0 * H + jf * FL_BW, hdst + n0 * ldh + jf * FL_BW,
                                       FN(imin_)(FL_BW, H - (jf + 1) * FL_BW), &epi);
                            jj++;
                            continue;
                        }
                        if (cell->wtype != FL_W_F32) {
                            const char *pq = (const char *)cell->whhq + (size_t)j * Hout * FL_PW * 2;
                            for (int n = n0, R; n < r1; n += R) {
                                R = FN(seg_tile_)(n, n0, rs, r1, rmax);
                                const REAL *An = FN(hprev_row_)(n, rs, Aprev, ysn, h0, Hout);
                                kr->lstmq(cell->wtype, R, Hout, An, n < rs ? ysn : Hout, pq, NULL,
                                          Gt + n * ldg + (ptrdiff_t)j * FL_PW, ldg,
                                          cst + (ptrdiff_t)n * H + j * FL_BW, H,
                                          hdst + n * ldh + j * FL_BW, ldh, nvalid, &epi);
                            }
                            continue;
                        }
                        if (fuse) {
                            const float *wxj = (const float *)cell->wih + (size_t)j * cell->in * FL_PW;
                            const float *bj = (const float *)cell->bias + (size_t)j * FL_PW;
                            const float *pj = (const float *)whh + (size_t)j * Hout * FL_PW;
                            for (int n = n0, R; n < r1; n += R) {
                                R = FN(seg_tile_)(n, n0, rs, r1, rmax);
                                kr->lstmx(R, cell->in, xa + (ptrdiff_t)(n - n0) * xsn, xsn, wxj, bj, Hout,
                                          FN(hprev_row_)(n, rs, Aprev, ysn, h0, Hout), n < rs ? ysn : Hout,
                                          pj, cst + (ptrdiff_t)n * H + j * FL_BW, H,
                                          hdst + n * ldh + j * FL_BW, ldh, nvalid, &epi);
                            }
                            continue;
                        }
#endif
                        const REAL *panel = whh + (size_t)j * Hout * FL_PW;
                        /* Compute-bound steps (>= 4 row tiles): the next block's
                         * panel is fetched into L2 while this one computes (W_hh
                         * beyond L2 would otherwise stall the first tile of every
                         * K chunk on L3 latency).  Measured: ~1.5% at batch 32-64,
                         * hidden 512; a loss at batch 8, hence the threshold. */
                        const REAL *pf = NULL;
                        if (fl_pf_panel && r1 - n0 >= 4 * rmax && jj + 1 < j1) {
                            int jn = (s & 1) ? j0 + j1 - 2 - jj : jj + 1;
                            pf = whh + (size_t)jn * Hout * FL_PW;
                        }
                        if (rs > n0)
                            FN(step_block_)(kr, kc, Hout, Aprev, ysn, panel, Gt + (ptrdiff_t)j * FL_PW, ldg,
                                            cst + j * FL_BW, H, hdst + j * FL_BW, ldh, n0, rs,
                                            nvalid, &epi, pf);
                        if (r1 > rs)
                            FN(step_block_)(kr, kc, Hout, h0, Hout, panel, Gt + (ptrdiff_t)j * FL_PW, ldg,
                                            cst + j * FL_BW, H, hdst + j * FL_BW, ldh, rs, r1,
                                            nvalid, &epi, rs > n0 ? NULL : pf);
                    }
                    if (P) {
                        if (sync) fl_pool_barrier(tid, nt);
                        REAL *yt = ydir + (ptrdiff_t)t * yst;
                        int pr1 = sync ? nact : r1, pr0 = sync ? 0 : n0;
                        for (int p = p0; p < p1; p++) {
                            const REAL *panel = whr + (size_t)p * H * FL_PW;
                            int ncols = FN(imin_)(FL_PW, P - p * FL_PW);
                            for (int n = pr0; n < pr1; n += rmax) {
                                int R = FN(imin_)(rmax, pr1 - n);
                                kr->gemm(R, H, cx->hraw + (ptrdiff_t)n * H, H, panel, NULL, 0,
                                         yt + n * ysn + p * FL_PW, ysn, ncols);
                            }
                        }
                    }
                    /* Every thread needs all of h_t for the next step (and the
                     * next layer all of this one's output).  Also after the
                     * last step of a layer and direction: h_n (below) may
                     * alias h0, which the other threads may still be reading
                     * (a stream keeps its state in place), so a thread must
                     * not write its columns of h_n before every thread is
                     * done with h0.  After the call's very last step nobody
                     * waits: the caller copies that h_n once every thread
                     * has finished (forward_), which saves a barrier a call
                     * (a streaming step: one of its two). */
                    if (sync && !(defer_hn && s == T - 1)) fl_pool_barrier(tid, nt);
                }
            }
            /* h_n: the state after each row's last processed step. */
            if (defer_hn) continue;
            int col0, col1;
            if (!sync) { col0 = 0; col1 = Hout; }
            else if (P) { col0 = FN(imin_)(P, p0 * FL_PW); col1 = FN(imin_)(P, p1 * FL_PW); }
            else { col0 = FN(imin_)(H, j0 * FL_BW); col1 = FN(imin_)(H, j1 * FL_BW); }
            FN(hn_copy_)(cx, l, d, col0, col1, sync ? 0 : n0, sync ? N : n1, ydir, yst, ysn);
        }
    }
    fl_fpenv_leave(fpsave);
}

static size_t FN(plan_)(fl_cell *const *cells, int L, int D, int T, int N, int *TC,
                        size_t *off_buf, size_t *off_hraw, size_t *off_cnt,
                        size_t *off_q, int *qcopies, size_t *off_xq, size_t *off_xqs, int *ldx,
                        size_t *off_ctx)
{
    const fl_cell *c = cells[0];
    size_t row = (size_t)c->nb * FL_PW * sizeof(REAL) * (size_t)(N > 0 ? N : 1);
    /* G chunk: about fl_gchunk bytes (1 MB or 512 KB by CPU), so the steps
     * read their gate inputs from L2, but at least ~48 rows so the input
     * GEMM keeps its panels busy. */
    fl_tune_init(); /* plan_ runs first in every entry point */
    size_t tc = fl_gchunk / row;
    size_t tmin = (size_t)(48 + (N > 0 ? N : 1) - 1) / (size_t)(N > 0 ? N : 1);
    if (tc < tmin) tc = tmin;
    if ((size_t)T < tc) tc = (size_t)(T > 0 ? T : 1);
    *TC = (int)tc;
    /* two G chunks for two directions: one for each thread of a direction
     * split (forward_), each in its own core's L2 */
    size_t bytes = (tc * row + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN * (D == 2 ? 2 : 1);
    *off_buf = bytes;
    if (L > 1)
        bytes += 2 * (((size_t)T * N * D * c->Hout * sizeof(REAL) + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN);
    *off_hraw = bytes;
    if (c->P) bytes += ((size_t)N * c->H * sizeof(REAL) + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN;
    *off_cnt = bytes;
    bytes += ((size_t)(T + 1) * sizeof(int) + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN;
    /* int8 W_hh: int16 copies of h_{t-1} and their scales (bfloat16 dot
     * products: the bfloat16 codes of h_{t-1}, in the same room).  A thread of a
     * hidden split needs a copy of its own: up to min(nb, FL_MAX_THREADS)
     * copies within ~4 MB (forward_ uses no more threads than copies). */
    *off_q = bytes;
    *qcopies = 0;
    int any_i8 = 0;
    for (int k = 0; k < L * D; k++) any_i8 |= cells[k]->wtype == FL_W_I8 || cells[k]->wtype == FL_W_BF16D;
    if (any_i8) {
        int ldq;
        size_t soff, copy = fl_hq_copy_bytes(N, c->Hout, &ldq, &soff);
        size_t nc = (size_t)(c->nb < FL_MAX_THREADS ? c->nb : FL_MAX_THREADS);
        if (nc * copy > ((size_t)4 << 20)) nc = ((size_t)4 << 20) / copy;
        if (nc < 1) nc = 1;
        *qcopies = (int)nc;
        bytes += nc * copy;
    }
    /* int8 W_ih: the quantized input rows of one chunk (TC x N rows, each
     * the int16 row and its byte planes, as for h) and their scales; two
     * sets for two directions (a direction split: one per thread). */
    *off_xq = bytes;
    *ldx = 0;
    int kin = 0;
    for (int k = 0; k < L * D; k++)
        if (cells[k]->wihq && cells[k]->in > kin) kin = cells[k]->in;
    if (kin > 0) {
        size_t rows = (size_t)*TC * (size_t)(N > 0 ? N : 1) * (D == 2 ? 2 : 1);
        *ldx = fl_hq_row_len(kin);
        bytes += (rows * (size_t)*ldx * sizeof(int16_t) + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN;
    }
    *off_xqs = bytes;
    if (kin > 0)
        bytes += ((size_t)*TC * (size_t)(N > 0 ? N : 1) * (D == 2 ? 2 : 1) * sizeof(float) + FL_ALIGN - 1)
                 / FL_ALIGN * FL_ALIGN;
    /* the call's context and a copy of its io (forward_) */
    *off_ctx = bytes;
    bytes += FL_ROOM_(FN(ctx_)) + FL_ROOM_(fl_io);
    return bytes + FL_ALIGN;
}

static int FN(forward_)(fl_cell *const *cells, int L, int D, const fl_io *io, void *ws, int nthreads)
{
    FN(ctx_) cx;
    memset(&cx, 0, sizeof cx); /* padding too: compared line by line below */
    size_t off_buf, off_hraw, off_cnt, off_q, off_xq, off_xqs, off_ctx;
    int T = io->T, N = io->N;
    FN(plan_)(cells, L, D, T, N, &cx.TC, &off_buf, &off_hraw, &off_cnt, &off_q, &cx.qcopies,
              &off_xq, &off_xqs, &cx.ldx, &off_ctx);
    char *base = (char *)(((uintptr_t)ws + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN);
    /* The context the threads read lives in the workspace, not on this
     * stack, and is written only where it changed since the last call on
     * this workspace (a stream's steps: nowhere, or only x and y): a line
     * the caller rewrites must move to the other cores, a few tens of ns
     * each, one after another as thread_ follows cx -> io -> x; unchanged
     * lines are still in their caches.  The same for the row counts. */
    FN(ctx_) *cxw = (FN(ctx_) *)(base + off_ctx);
    fl_io *iow = (fl_io *)(base + off_ctx + FL_ROOM_(FN(ctx_)));
#define FL_SETF_(f) if (iow->f != io->f) iow->f = io->f
    FL_SETF_(T); FL_SETF_(N); FL_SETF_(x); FL_SETF_(x_st); FL_SETF_(x_sn);
    FL_SETF_(y); FL_SETF_(y_st); FL_SETF_(y_sn); FL_SETF_(h0); FL_SETF_(c0);
    FL_SETF_(hn); FL_SETF_(cn); FL_SETF_(lengths); FL_SETF_(eager_threads);
#undef FL_SETF_
    const fl_cell *c = cells[0];
    size_t bufsz = ((size_t)T * N * D * c->Hout * sizeof(REAL) + FL_ALIGN - 1) / FL_ALIGN * FL_ALIGN;
    cx.cells = cells; cx.L = L; cx.D = D; cx.T = T; cx.N = N; cx.io = iow;
    /* fl_kc is in floats: a double panel row is twice the bytes */
    cx.kc = fl_kc * (int)sizeof(float) / (int)sizeof(REAL);
    if (cx.kc < 16) cx.kc = 16;
    cx.G = (REAL *)base;
    cx.gstride = (ptrdiff_t)(off_buf / (D == 2 ? 2 : 1) / sizeof(REAL));
    cx.buf[0] = L > 1 ? (REAL *)(base + off_buf) : NULL;
    cx.buf[1] = L > 1 ? (REAL *)(base + off_buf + bufsz) : NULL;
    cx.hraw = c->P ? (REAL *)(base + off_hraw) : NULL;
    cx.cnt = (int *)(base + off_cnt);
    cx.q = base + off_q;
    cx.qcopy = fl_hq_copy_bytes(N, c->Hout, &cx.ldq, &cx.qscale_off);
    cx.xq = (int16_t *)(base + off_xq);
    cx.xqs = (float *)(base + off_xqs);

    /* Active rows per time step; lengths must be sorted descending. */
    long total = 0;
    if (io->lengths) {
        for (int n = 0; n < N; n++) {
            int Ln = io->lengths[n];
            if (Ln < 0 || Ln > T || (n > 0 && Ln > io->lengths[n - 1])) return -4;
            total += Ln;
        }
        int n = N;
        for (int t = 0; t <= T; t++) {
            while (n > 0 && io->lengths[n - 1] <= t) n--;
            if (cx.cnt[t] != n) cx.cnt[t] = n;
        }
    } else {
        for (int t = 0; t < T; t++)
            if (cx.cnt[t] != N) cx.cnt[t] = N;
        total = (long)T * N;
    }
    if (T >= 0 && cx.cnt[T] != 0) cx.cnt[T] = 0;

    /* c state lives in cn from the start. */
    for (int k = 0; k < L * D; k++) {
        REAL *cn = (REAL *)io->cn + (size_t)k * N * c->H;
        if (io->c0 && io->c0 != io->cn)
            memcpy(cn, (const REAL *)io->c0 + (size_t)k * N * c->H, (size_t)N * c->H * sizeof(REAL));
        else if (!io->c0)
            memset(cn, 0, (size_t)N * c->H * sizeof(REAL));
    }

    /* Threads.  The time of one step on one thread is estimated as the
     * larger of its FLOPs at ~100 GFLOP/s and the weight bytes it streams at
     * ~90 GB/s (L2; at batch 1 a step is bound by reading W_hh, and at T = 1,
     * a streaming step, by reading W_ih as well).  Hidden blocks are split
     * when each thread's share of a step (~FL_SPLIT_US) pays for the barrier
     * (~0.3 us); otherwise batch rows are split, balancing (row, step) pairs. */
    int nt = nthreads;
    int maxcpu = fl_num_cpus();
    if (nt > maxcpu) nt = maxcpu;
    if (nt > FL_MAX_THREADS) nt = FL_MAX_THREADS;
    double flops_step = 2.0 * N * 4.0 * c->H * (c->in + c->Hout);
    double wbytes = sizeof(REAL) * 4.0 * c->H * ((double)c->Hout + (double)c->in / FN(imin_)(T > 0 ? T : 1, cx.TC));
    double step_us = flops_step / 1.0e5 > wbytes / 9.0e4 ? flops_step / 1.0e5 : wbytes / 9.0e4;
    const double split_us = FL_SPLIT_US, call_us = FL_CALL_US;
    const int eager = io->eager_threads;
    cx.split_batch = 0;
    cx.split_dir = 0;
    /* Bidirectional, two threads: one direction each.  Each thread then
     * streams only its direction's weights (half the bytes of a batch split),
     * tiles all rows (larger row tiles than half a batch), and waits once per
     * layer instead of once per step (a hidden split).  Reduced-precision
     * weights need a copy of h's codes per thread (int8, bfloat16 dot
     * products; the input rows' codes have one set per direction); no
     * projection (its buffer is one per call).  Bitwise the same results: no
     * row's sums depend on the split. */
    /* With few rows a step is bound by reading W_hh: one direction's W_hh
     * whole in a core then needs to stay in its L2 (within fl_gchunk, half
     * of it), else a hidden split, which gives each core half of it, is
     * faster (measured on Zen 5, batch 1, 2 threads: hidden 128 ~12% faster
     * split by direction, hidden 256 ~20% slower; batch 16-32 ~0-10% faster). */
    int dir_ok = D == 2 && nt == 2 && !c->P && (cx.qcopies == 0 || cx.qcopies >= 2)
                 && (N >= 8 * nt || 4.0 * c->H * c->Hout * sizeof(REAL) <= (double)fl_gchunk);
    if (dir_ok && T > 0 && N > 0 && total > 0 && (eager || step_us * (double)T * L * D >= call_us)) {
        cx.split_dir = 1;
    } else if (nt > 1) {
        if ((!eager && step_us / nt < split_us) || c->nb < nt) {
            if (N >= nt) cx.split_batch = 1;
            else nt = 1;
        } else if (N >= 8 * nt) {
            /* Enough rows per thread (>= 8) that each step is compute-bound
             * even when every thread reads all of W_hh: no barriers at all.
             * Also robust to a core shared with other spinning threads (e.g.
             * another library's OpenMP pool right after its own call): with
             * a barrier per step such a neighbour stalls every step.  Measured
             * (batch 64, hidden 512, 2 threads, peers' calls interleaved in
             * benchmarks/run_all.py): a hidden split ran 0.46x the best peer,
             * the batch split ~1.0x; alone the two are within ~5%. */
            cx.split_batch = 1;
        }
    }
    /* A whole call of less than ~20 us: waking sleeping workers costs more. */
    if (T == 0 || N == 0 || total == 0 || (!eager && step_us * (double)T * L * D < call_us))
        nt = 1;
    /* int8 W_hh with a hidden split: one int16 copy of h per thread (plan_
     * holds up to ~4 MB of copies); beyond that split the rows instead. */
    if (cx.qcopies > 0 && !cx.split_batch && nt > cx.qcopies) {
        if (N >= nt) cx.split_batch = 1;
        else nt = cx.qcopies;
    }
    if (cx.split_batch && nt > 1) {
        long acc = 0;
        int k = 1;
        cx.row_split[0] = 0;
        for (int n = 0; n < N && k < nt; n++) {
            acc += io->lengths ? io->lengths[n] : T;
            while (k < nt && acc * nt >= total * k) cx.row_split[k++] = n + 1;
        }
        while (k <= nt) cx.row_split[k++] = N;
    }
    /* thread_'s sync with the threads the pool actually used: a hidden split
     * leaves the last layer and direction's h_n to the caller, now that
     * every thread is done with h0 and y */
    for (size_t o = 0; o < sizeof cx; o += FL_ALIGN) {
        size_t n = sizeof cx - o < FL_ALIGN ? sizeof cx - o : FL_ALIGN;
        if (memcmp((char *)cxw + o, (char *)&cx + o, n) != 0) memcpy((char *)cxw + o, (char *)&cx + o, n);
    }
    /* A one-step call with the state in place (a stream's step): the next
     * step reads all of h_n, which the caller writes after this call. */
    const void *pf = NULL;
    size_t pfbytes = 0;
    if (T == 1 && io->h0 && io->h0 == io->hn) {
        pf = io->hn;
        pfbytes = (size_t)L * D * N * c->Hout * sizeof(REAL);
        if (pfbytes > ((size_t)16 << 10)) pfbytes = (size_t)16 << 10;
    }
    int used = fl_pool_run_pf(FN(thread_), cxw, nt, pf, pfbytes);
    if (used > 1 && !cx.split_batch && !cx.split_dir) {
        const REAL *yl = (const REAL *)io->y + (ptrdiff_t)(D - 1) * c->Hout;
        FN(hn_copy_)(cxw, L - 1, D - 1, 0, c->Hout, 0, N, yl, io->y_st, io->y_sn);
    }
    return 0;
}

#undef FN
#undef FL_CAT
#undef FL_CAT_
