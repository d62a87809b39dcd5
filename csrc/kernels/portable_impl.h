/* Portable C kernels, instantiated for float and double by portable.c.
 * Expects REAL, SFX (suffix), SIGMOID(x), TANH(x) and EPI_GENERIC defined. */

#define FL_CAT_(a, b) a##b
#define FL_CAT(a, b) FL_CAT_(a, b)

static void FL_CAT(gemm_portable_, SFX)(int R, int K, const REAL *A, ptrdiff_t lda,
                                        const REAL *panel, const REAL *init, ptrdiff_t ldi,
                                        REAL *out, ptrdiff_t ldo, int ncols)
{
    for (int r = 0; r < R; r++) {
        REAL acc[FL_PW];
        for (int col = 0; col < FL_PW; col++) acc[col] = init ? init[r * ldi + col] : (REAL)0;
        const REAL *a = A + r * lda;
        for (int k = 0; k < K; k++) {
            const REAL ak = a[k];
            const REAL *w = panel + (size_t)k * FL_PW;
            for (int col = 0; col < FL_PW; col++) acc[col] += ak * w[col];
        }
        REAL *o = out + r * ldo;
        for (int col = 0; col < ncols; col++) o[col] = acc[col];
    }
}

/* The plain LSTM gate math on one row of pre-activations (i, f, g, o). */
static inline void FL_CAT(epilogue_default_, SFX)(const REAL *acc, REAL *cr, REAL *hr, int nvalid)
{
    for (int l = 0; l < nvalid; l++) {
        REAL i = SIGMOID(acc[l]);
        REAL f = SIGMOID(acc[FL_BW + l]);
        REAL gg = TANH(acc[2 * FL_BW + l]);
        REAL o = SIGMOID(acc[3 * FL_BW + l]);
        REAL cn = f * cr[l] + i * gg;
        cr[l] = cn;
        hr[l] = o * TANH(cn);
    }
}

static void FL_CAT(lstm_portable_, SFX)(int R, int K, const REAL *A, ptrdiff_t lda,
                                        const REAL *panel, const REAL *G, ptrdiff_t ldg,
                                        REAL *c, ptrdiff_t ldc, REAL *h, ptrdiff_t ldh,
                                        int nvalid, const fl_epi *epi)
{
    for (int r = 0; r < R; r++) {
        REAL acc[FL_PW];
        const REAL *g = G + r * ldg;
        for (int col = 0; col < FL_PW; col++) acc[col] = g[col];
        if (A) {
            const REAL *a = A + r * lda;
            for (int k = 0; k < K; k++) {
                const REAL ak = a[k];
                const REAL *w = panel + (size_t)k * FL_PW;
                for (int col = 0; col < FL_PW; col++) acc[col] += ak * w[col];
            }
        }
        REAL *cr = c + r * ldc, *hr = h + r * ldh;
        if (!epi->is_default)
            EPI_GENERIC(1, acc, cr, ldc, hr, ldh, nvalid, epi);
        else
            FL_CAT(epilogue_default_, SFX)(acc, cr, hr, nvalid);
    }
}

#undef FL_CAT
#undef FL_CAT_
