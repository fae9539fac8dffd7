/* forward.c: one concern, the eval-mode forward (and the tanh the accuracy test reads). */

/* y = tanh(x) element-wise as the step computes it (n a multiple of 16; for the accuracy test). */
void ln_tanh(const float *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i += VW) {
        vf v;
        memcpy(&v, x + i, sizeof v);
        vtanh_n(&v, 1);
        memcpy(y + i, &v, sizeof v);
    }
}

typedef struct {
    ln_ws *ws;
    const ln_args *a;
    const float *m1, *s1, *g1, *b1, *m2, *s2, *g2, *b2; /* each batch norm's affine map, or the identity */
} forward_ctx;

/* Thread t's run of 64-image chunks, in its own chunk buffers. */
static void forward_job(void *arg, int t, int T)
{
    const forward_ctx *X = arg;
    const ln_args *A = X->a;
    float *const *P = A->params;
    chunk *c = &X->ws->ch[t];
    const int relu = A->relu, maxpool = A->maxpool;
    const int64_t n = A->rows, chunks = (n + BATCH - 1) / BATCH;
    for (int64_t j = chunks * t / T; j < chunks * (t + 1) / T; j++) {
        const int64_t first = j * BATCH;
        set_lanes(c, n - first < BATCH ? (int)(n - first) : BATCH);
        for (int b0 = 0; b0 < BATCH; b0 += 16)
            pack_input(c, A->x, NULL, first, NULL, NULL, b0);
        /* each conv by pooling rows, activated and pooled while they are in cache */
        for (int py = 0; py < Q1; py++) {
            conv1_fwd(c->x, P[P_C1W], P[P_C1B], c->z1, 2 * py, 2 * py + 2, 0, C1);
            for (int m = 0; m < C1; m++)
                act_pool_fwd(c->z1, NULL, c->p1, H1, X->m1, X->s1, X->g1, X->b1, 0, m * Q1 + py, m * Q1 + py + 1,
                             relu, maxpool);
        }
        for (int py = 0; py < Q2; py++) {
            conv2_fwd(c->p1, P[P_C2W], P[P_C2B], c->z2, 2 * py, 2 * py + 2, 0, C2);
            for (int m = 0; m < C2; m++)
                act_pool_fwd(c->z2, NULL, c->p2, H2, X->m2, X->s2, X->g2, X->b2, 0, m * Q2 + py, m * Q2 + py + 1,
                             relu, maxpool);
        }
        linear_fwd(c->p2, P[P_F1W], P[P_F1B], c->a3, 0, F1, FEAT, FEAT, 1);
        act_inplace(c->a3, F1 * BATCH, relu);
        linear_fwd(c->a3, P[P_F2W], P[P_F2B], c->a4, 0, F2, F1, F1, 1);
        act_inplace(c->a4, F2 * BATCH, relu);
        linear_fwd10(c->a4, P[P_F3W], P[P_F3B], c->lg, 0, F3, F2, F2, 1);
        for (int b = 0; b < c->n; b++)
            for (int k = 0; k < F3; k++)
                A->out[(first + b) * F3 + k] = c->lg[k * BATCH + b];
    }
}

/* Eval-mode logits of a->rows images (a->x: (rows, 784)) into a->out (rows, 10): batch norm
 * with the running statistics (a->run, a->bn_eps), no dropout, a->relu and a->maxpool as for
 * the step, a->threads threads each on its own run of 64-image chunks (a row's logits do not
 * depend on the chunking), in workspace ws (its buffers and threads kept for the next call:
 * evaluation calls this per 500 images), or in a temporary one where ws is NULL. Returns LN_OK,
 * or LN_NO_MEMORY. */
int ln_forward(ln_ws *ws, const ln_args *a)
{
    const int64_t chunks = (a->rows + BATCH - 1) / BATCH;
    if (chunks < 1)
        return LN_OK;
    int threads = a->threads < 1 ? 1 : a->threads > LN_MAX_THREADS ? LN_MAX_THREADS : a->threads;
    if (threads > chunks)
        threads = (int)chunks;
    ln_ws *own = ws ? NULL : ln_ws_new();
    if (!ws)
        ws = own;
    if (!ws || ws_reserve(ws, threads)) {
        ln_ws_free(own);
        return LN_NO_MEMORY;
    }
    float *const *P = a->params;
    float m1[C1], s1[C1], m2[C2], s2[C2];
    forward_ctx X = {ws, a, ZEROS, ONES, ONES, ZEROS, ZEROS, ONES, ONES, ZEROS};
    if (P[P_BN1W]) {
        for (int i = 0; i < C1; i++) {
            m1[i] = a->run[R_MEAN1][i];
            s1[i] = (float)(1.0 / sqrt((double)a->run[R_VAR1][i] + a->bn_eps));
        }
        for (int i = 0; i < C2; i++) {
            m2[i] = a->run[R_MEAN2][i];
            s2[i] = (float)(1.0 / sqrt((double)a->run[R_VAR2][i] + a->bn_eps));
        }
        X = (forward_ctx){ws, a, m1, s1, P[P_BN1W], P[P_BN1B], m2, s2, P[P_BN2W], P[P_BN2B]};
    }
    pool_run(&ws->pool, threads, forward_job, &X);
    ln_ws_free(own);
    return LN_OK;
}
