/* step.c: one concern, the training step's schedule: its stages in order, on one or several
 * threads with the same results. */

/* Bytes per vector in this build (64, 32 or 16). */
int ln_vector_bytes(void) { return VBYTES; }

/* What the threads of one step share: the arguments, and the batch-norm scales between the
 * forward and the backward. */
typedef struct {
    ln_ws *ws;
    const ln_args *a;
    augment_t aug;
    mix_t mix;
    int nch, B, bn;
    float istd1[C1], istd2[C2];
} step_ctx;

/* conv2_bwd_input's output rows cost the kernel rows that overlap the 10-row gradient: 1 to 5 */
static int conv2_bwd_input_cost(int y) { return (y + 1 > H2 ? H2 + 4 - y : 5) - (y < 4 ? 4 - y : 0); }

/* conv1's pooling row py of chunk c (its rows 2py and 2py + 1 of all maps) into a1, activated
 * and pooled in place: without batch norm. Written whole and then read back, conv1's 1.2 MB
 * output went through a 512 KB cache twice (cachegrind: 37,600 misses per step). */
static void conv1_rows(chunk *c, float *const *P, int py, int relu, int maxpool)
{
    conv1_fwd(c->x, P[P_C1W], P[P_C1B], c->a1, 2 * py, 2 * py + 2, 0, C1);
    for (int m = 0; m < C1; m++)
        act_pool_fwd(c->a1, c->a1, c->p1, H1, ZEROS, ONES, ONES, ZEROS, 0, m * Q1 + py, m * Q1 + py + 1, relu,
                     maxpool);
}

/* conv2's unit u of chunk c (register tile of output maps u / Q2, pooling row u % Q2): with
 * batch norm (K2: its shifts) into z2, with its row sums; without, into a2, activated and pooled
 * in place. */
static void conv2_rows(chunk *c, float *const *P, int u, const float *K2, int relu, int maxpool)
{
    const int o0 = u / Q2 * CONV2_OCB, py = u % Q2;
    conv2_fwd(c->p1, P[P_C2W], P[P_C2B], K2 ? c->z2 : c->a2, 2 * py, 2 * py + 2, o0, o0 + CONV2_OCB);
    if (K2)
        bn_row_sums(c, c->z2, H2, K2, c->rs + RS2A, c->rs + RS2B, o0, o0 + CONV2_OCB, 2 * py, 2 * py + 2);
    else
        for (int m = o0; m < o0 + CONV2_OCB; m++)
            act_pool_fwd(c->a2, c->a2, c->p2, H2, ZEROS, ONES, ONES, ZEROS, 0, m * Q2 + py, m * Q2 + py + 1,
                         relu, maxpool);
}

/* conv2's input gradient for chunk c's pooling rows [b0, b1), shared between the threads by
 * the rows' cost, and act1's backward on each thread's rows (its gradient into a1 in place). */
static void conv2_bwd_band(chunk *c, const float *w2t, int b0, int b1, int t, int T, int bn, int relu,
                           int maxpool)
{
    int cost[Q1], lo, hi;
    for (int y = b0; y < b1; y++)
        cost[y - b0] = conv2_bwd_input_cost(y);
    share_weighted(cost, b1 - b0, t, T, &lo, &hi);
    conv2_bwd_input(c->a2, w2t, NULL, c->dp1, b0 + lo, b0 + hi, 0, C1);
    for (int m = 0; m < C1; m++)
        act_pool_bwd(c->dp1, c->a1, c->a1, H1, H1, 0, bn ? c->z1 : NULL, c->rs + RS1A, c->rs + RS1B,
                     m * Q1 + b0 + lo, m * Q1 + b0 + hi, relu, maxpool);
}

/* The backward of chunk c from act2 to conv1's weight gradient on one thread without batch
 * norm, row by row, each gradient read while it is in cache: act2's backward by pooling rows,
 * each followed by conv2's weight gradient over its two rows; then conv2's input gradient
 * and act1's backward by pooling rows, each followed by conv1's weight gradient over its two
 * rows (conv2_bwd_band). Every weight's sum runs over the rows in the order of the
 * stage-by-stage loops. (Interleaving the two passes missed more: conv2's 77 KB of weight
 * partials and the rows of x were evicted between the rows.) */
static void conv_backward_rows(chunk *c, ln_ws *ws, int relu, int maxpool)
{
    for (int py = 0; py < Q2; py++) {
        for (int m = 0; m < C2; m++)
            act_pool_bwd(c->dp2, c->a2, c->a2, H2, H2, 0, NULL, c->rs + RS2A, c->rs + RS2B, m * Q2 + py,
                         m * Q2 + py + 1, relu, maxpool);
        conv2_wgrad(c->p1, c->a2, ws->pw2, 0, CONV2_WGRAD_UNITS, 2 * py, 2 * py + 2);
    }
    for (int py = 0; py < Q1; py++) {
        conv2_bwd_band(c, ws->w2t, py, py + 1, 0, 1, 0, relu, maxpool);
        conv1_wgrad(c->x, c->a1, ws->pw1, 0, CONV1_WGRAD_UNITS, 2 * py, 2 * py + 2);
    }
}

/* Every stage's outputs are split between the threads by ownership (share): each activation,
 * gradient, weight-gradient and optimiser-state element is computed by one thread, with the
 * arithmetic and in the order of the single-threaded step (register tiles are never split, a
 * sum over the batch or over pixels stays inside its owner's loop, and the per-row sums of the
 * activation backward are added up in the old order by sum_rows). So the results are the same
 * bits for any thread count, and the same as the single-threaded step's before the threads.
 * A barrier (SYNC) stands wherever a stage reads another thread's outputs: 12 per step of one
 * chunk without batch norm, 7 more per further chunk (6 with batch norm), 4 more with batch
 * norm. Small stages run on one thread: fc3, the loss and fc3's gradients, conv2's
 * weight flip. On one thread without batch norm the conv layers run their own row-by-row
 * order (conv1_rows, conv2_rows, conv_backward_rows): the same arithmetic, in a schedule that
 * keeps each activation's rows in cache from the stage that writes them to the one that reads
 * them; on several the stages keep their partition (a row pipeline there would need a barrier
 * per row). */
/* A barrier between the step's threads: wherever a stage reads what another thread wrote. */
#define SYNC() (PROF_ARRIVE(t), barrier_wait(&X->ws->pool.bar, T), PROF_LEAVE(t))

/* The images packed by 16-lane groups, the dropout scales transposed by rows, conv2's
 * weights flipped and transposed for its input gradient. */
static void stage_pack(step_ctx *X, int t, int T)
{
    const ln_args *A = X->a;
    chunk *ch = X->ws->ch;
    int lo, hi;
    share(X->nch * LANE_GROUPS, t, T, &lo, &hi);
    for (int u = lo; u < hi; u++) {
        const int k = u / LANE_GROUPS, b0 = u % LANE_GROUPS * 16;
        pack_input(&ch[k], A->x, A->idx, (int64_t)k * BATCH, &X->aug, &X->mix, b0);
    }
    if (A->drop) {
        share(X->nch * F1, t, T, &lo, &hi);
        for (int u = lo; u < hi; u++) {
            chunk *c = &ch[u / F1];
            const int k = u / F1, o = u % F1;
            for (int b = 0; b < BATCH; b++)
                c->drop[o * BATCH + b] = b < c->n ? A->drop[((int64_t)k * BATCH + b) * F1 + o] : 0.f;
        }
    }
    if (t == T - 1)
        for (int o = 0; o < C2; o++)
            for (int c = 0; c < C1; c++)
                for (int i = 0; i < 25; i++)
                    X->ws->w2t[(c * C2 + o) * 25 + 24 - i] = A->params[P_C2W][(o * C1 + c) * 25 + i];
}

/* On one thread without batch norm: conv1 by pooling rows, and conv2's pooling row as soon as
 * conv1 has made the p1 rows under it, each activated and pooled while in cache. */
static void stage_convs_rows(step_ctx *X)
{
    const ln_args *A = X->a;
    for (int k = 0; k < X->nch; k++)
        for (int py = 0; py < Q1; py++) {
            conv1_rows(&X->ws->ch[k], A->params, py, A->relu, A->maxpool);
            if (py >= 5 && py % 2) /* p1 rows 2 py2 .. 2 py2 + 5 are made: conv2's row py2 */
                for (int u = (py - 5) / 2; u < C2 / CONV2_OCB * Q2; u += Q2)
                    conv2_rows(&X->ws->ch[k], A->params, u, NULL, A->relu, A->maxpool);
        }
}

/* conv1 by pooling rows (block row py: conv1 rows 2py and 2py + 1 of all maps): without batch
 * norm into a1, activated and pooled in place; with it into z1 with its row sums (K1: their
 * shifts, computed here). */
static void stage_conv1(step_ctx *X, int t, int T, float *K1)
{
    float *const *P = X->a->params;
    chunk *ch = X->ws->ch;
    int lo, hi;
    share(Q1, t, T, &lo, &hi);
    if (X->bn)
        bn_shift(ch[0].x, 1, XP, 14, C1, P[P_C1W], P[P_C1B], K1); /* conv1's (14, 14), padded */
    for (int k = 0; k < X->nch; k++)
        for (int py = lo; py < hi; py++) {
            if (X->bn) {
                conv1_fwd(ch[k].x, P[P_C1W], P[P_C1B], ch[k].z1, 2 * py, 2 * py + 2, 0, C1);
                bn_row_sums(&ch[k], ch[k].z1, H1, K1, ch[k].rs + RS1A, ch[k].rs + RS1B, 0, C1, 2 * py,
                            2 * py + 2);
            } else
                conv1_rows(&ch[k], P, py, X->a->relu, X->a->maxpool);
        }
}

/* Batch norm 1 by channels (statistics, running statistics, normalise, activate, pool). */
static void stage_bn1(step_ctx *X, int t, int T, const float *K1)
{
    const ln_args *A = X->a;
    int lo, hi;
    share(C1, t, T, &lo, &hi);
    bn_layer_fwd(X->ws->ch, X->nch, 1, H1, A->params, A->run, A->nbt[0], A->bn_eps, A->bn_momentum,
                 (int64_t)X->B * H1 * H1, K1, X->istd1, A->relu, A->maxpool, lo, hi, t == 0);
}

/* conv2 by (register tile of output maps, pooling row): without batch norm into a2, activated
 * and pooled in place; with it into z2 with its row sums (K2: their shifts). */
static void stage_conv2(step_ctx *X, int t, int T, const float *K2)
{
    int lo, hi;
    share(C2 / CONV2_OCB * Q2, t, T, &lo, &hi);
    for (int k = 0; k < X->nch; k++)
        for (int u = lo; u < hi; u++)
            conv2_rows(&X->ws->ch[k], X->a->params, u, X->bn ? K2 : NULL, X->a->relu, X->a->maxpool);
}

/* Batch norm 2 by channels. */
static void stage_bn2(step_ctx *X, int t, int T, const float *K2)
{
    const ln_args *A = X->a;
    int lo, hi;
    share(C2, t, T, &lo, &hi);
    bn_layer_fwd(X->ws->ch, X->nch, 2, H2, A->params, A->run, A->nbt[1], A->bn_eps, A->bn_momentum,
                 (int64_t)X->B * H2 * H2, K2, X->istd2, A->relu, A->maxpool, lo, hi, t == 0);
}

/* The forward through both conv layers: on one thread without batch norm as one pipeline of
 * rows (stage_convs_rows), else stage by stage with batch norm's statistics between. */
static void forward_convs(step_ctx *X, int t, int T)
{
    float K1[C1], K2[C2]; /* bn_row_sums' shifts of conv1's and conv2's maps */
    if (!X->bn && T == 1) {
        stage_convs_rows(X);
        PROF(t, S_CONV1);
    } else {
        stage_conv1(X, t, T, K1);
        SYNC();
        PROF(t, S_CONV1);
        if (X->bn) {
            stage_bn1(X, t, T, K1);
            SYNC();
            float *const *P = X->a->params;
            bn_shift(X->ws->ch[0].p1, C1, Q1, 5, C2, P[P_C2W], P[P_C2B], K2); /* every thread alike */
        }
        PROF(t, S_BN1);
        stage_conv2(X, t, T, K2);
    }
    SYNC();
    PROF(t, S_CONV2);
    if (X->bn) {
        stage_bn2(X, t, T, K2);
        SYNC();
    }
    PROF(t, S_BN2);
}

/* Chunk c's classifier forward by blocks of each layer's outputs: fc1 with its dropout and
 * activation (p2 transposed for fc1's weight gradient), fc2 and its activation (a3 transposed
 * where fc2_wgrad takes it so), then on thread 0 fc3, the loss and fc3's gradients. */
static void classifier_fwd(step_ctx *X, int k, int t, int T)
{
    const ln_args *A = X->a;
    float *const *P = A->params;
    ln_ws *ws = X->ws;
    chunk *c = &ws->ch[k];
    int lo, hi;
    share(F1 / LIN_OB, t, T, &lo, &hi);
    int r0 = lo * LIN_OB, r1 = hi * LIN_OB;
    linear_fwd(c->p2, P[P_F1W], P[P_F1B], c->a3, r0, r1, FEAT, FEAT, 1);
    if (A->drop)
        for (int i = r0 * BATCH; i < r1 * BATCH; i += VW)
            ST(c->a3 + i, LD(c->a3 + i) * LD(c->drop + i));
    act_inplace(c->a3 + r0 * BATCH, (r1 - r0) * BATCH, A->relu);
    share(FEAT / 16, t, T, &lo, &hi);
    transpose_rows(c->p2, ws->featT, FEAT, 16 * lo, 16 * hi);
    SYNC();
    share(F2 / LIN_OB, t, T, &lo, &hi);
    r0 = lo * LIN_OB, r1 = hi * LIN_OB;
    linear_fwd(c->a3, P[P_F2W], P[P_F2B], c->a4, r0, r1, F1, F1, 1);
    act_inplace(c->a4 + r0 * BATCH, (r1 - r0) * BATCH, A->relu);
#if F1_FITS_VECTORS
    share(F1 / 8, t, T, &lo, &hi);
    transpose_rows(c->a3, ws->a3T, F1, 8 * lo, 8 * hi);
#endif
    SYNC();
    if (t == 0) { /* fc3, the loss and fc3's gradients */
        int64_t labels[BATCH], partners[BATCH]; /* the images' labels, and their partners' (mixing) */
        linear_fwd10(c->a4, P[P_F3W], P[P_F3B], c->lg, 0, F3, F2, F2, 1);
        for (int b = 0; b < c->n; b++) {
            labels[b] = A->y[A->idx ? A->idx[k * BATCH + b] : k * BATCH + b];
            if (A->mix_with) {
                const int64_t p = A->mix_with[k * BATCH + b];
                partners[b] = A->y[A->idx ? A->idx[p] : p];
            }
        }
        loss_fwd_bwd(c, labels, A->mix_with ? partners : NULL, A->mix_with ? A->mix_lam + k * BATCH : NULL,
                     A->targets ? A->targets + (int64_t)k * BATCH * F3 : NULL, 1.0 / X->B, A->smoothing,
                     A->totals);
        linear_wgrad10(c->dlg, c->a4, ws->grad + goff(P_F3W), 0, F3, F2);
        bias_grad(c->dlg, ws->grad + goff(P_F3B), F3);
    }
}

/* Chunk c's classifier backward: by blocks of 4 of fc2's outputs their gradient, through the
 * activation, and fc2's weight and bias gradients for them; likewise fc1's outputs, through
 * the activation and dropout; then the gradient w.r.t. the pooled conv2 maps. */
static void classifier_bwd(step_ctx *X, int k, int t, int T)
{
    const ln_args *A = X->a;
    float *const *P = A->params, *grad = X->ws->grad;
    chunk *c = &X->ws->ch[k];
    int lo, hi;
    share(F2 / 4, t, T, &lo, &hi);
    int r0 = 4 * lo, r1 = 4 * hi;
    linear_bwd_input84(c->dlg, P[P_F3W], NULL, c->da4, r0, r1, F3, 1, F2);
    act_bwd(c->da4 + r0 * BATCH, c->a4 + r0 * BATCH, NULL, (r1 - r0) * BATCH, A->relu);
#if F1_FITS_VECTORS
    fc2_wgrad(c->da4, X->ws->a3T, grad + goff(P_F2W), c->n, r0, r1);
#else
    linear_wgrad(c->da4, c->a3, grad + goff(P_F2W), r0, r1, F1);
#endif
    bias_grad(c->da4 + r0 * BATCH, grad + goff(P_F2B) + r0, r1 - r0);
    SYNC();
    share(F1 / DA3_ROWS, t, T, &lo, &hi);
    r0 = DA3_ROWS * lo, r1 = DA3_ROWS * hi;
    linear_bwd_input(c->da4, P[P_F2W], NULL, c->da3, r0, r1, F2, 1, F1);
    act_bwd(c->da3 + r0 * BATCH, c->a3 + r0 * BATCH, A->drop ? c->drop + r0 * BATCH : NULL,
            (r1 - r0) * BATCH, A->relu);
    fc1_wgrad(c->da3, X->ws->featT, grad + goff(P_F1W), c->n, r0, r1);
    bias_grad(c->da3 + r0 * BATCH, grad + goff(P_F1B) + r0, r1 - r0);
    SYNC();
    share(FEAT / LINI_OB, t, T, &lo, &hi);
    linear_bwd_input(c->da3, P[P_F1W], NULL, c->dp2, lo * LINI_OB, hi * LINI_OB, F1, 1, FEAT);
}

/* The classifier, chunk by chunk (its weight gradients add up over the chunks in order). */
static void classifier(step_ctx *X, int t, int T)
{
    for (int k = 0; k < X->nch; k++) {
        classifier_fwd(X, k, t, T);
        SYNC();
        PROF(t, S_CLSF);
        classifier_bwd(X, k, t, T);
        SYNC();
        PROF(t, S_CLSB);
    }
}

/* conv2's bias gradient without batch norm: its per-row sums of act2's backward, per channel */
static void conv2_bias_grad(step_ctx *X)
{
    float *grad = X->ws->grad;
    for (int c = 0; c < C2; c++)
        grad[goff(P_C2B) + c] += (float)sum_rows(X->ws->ch, X->nch, RS2A, c, H2, X->a->maxpool ? Q2 : H2);
}

/* act2's backward by pooling rows (its gradient into a2 in place), then with batch norm its
 * backward by channels. */
static void stage_act2_bwd(step_ctx *X, int t, int T)
{
    const ln_args *A = X->a;
    chunk *ch = X->ws->ch;
    int lo, hi;
    share(C2 * Q2, t, T, &lo, &hi);
    for (int k = 0; k < X->nch; k++)
        act_pool_bwd(ch[k].dp2, ch[k].a2, ch[k].a2, H2, H2, 0, X->bn ? ch[k].z2 : NULL, ch[k].rs + RS2A,
                     ch[k].rs + RS2B, lo, hi, A->relu, A->maxpool);
    SYNC();
    PROF(t, S_ACT2B);
    if (X->bn) {
        share(C2, t, T, &lo, &hi);
        bn_layer_bwd(ch, X->nch, 2, A->params, X->ws->grad, X->istd2, (int64_t)X->B * H2 * H2, A->maxpool, lo,
                     hi);
        SYNC();
    }
    PROF(t, S_BN2B);
}

/* conv2's weight gradient by register tiles of weights; conv2's input gradient and act1's
 * backward by rows (conv2_bwd_band); without batch norm conv1's weight gradient by register
 * tiles, after a barrier (each tile reads every row). [*lo, *hi): this thread's conv1 units. */
static void stage_conv2_bwd(step_ctx *X, int t, int T, int *lo, int *hi)
{
    const ln_args *A = X->a;
    ln_ws *ws = X->ws;
    share(CONV2_WGRAD_UNITS, t, T, lo, hi);
    for (int k = 0; k < X->nch; k++)
        conv2_wgrad(ws->ch[k].p1, ws->ch[k].a2, ws->pw2, *lo, *hi, 0, H2);
    conv2_wgrad_finish(ws->pw2, ws->grad + goff(P_C2W), *lo, *hi);
    if (!X->bn && t == 0)
        conv2_bias_grad(X);
    share(CONV1_WGRAD_UNITS, t, T, lo, hi);
    for (int k = 0; k < X->nch; k++) {
        conv2_bwd_band(&ws->ch[k], ws->w2t, 0, Q1, t, T, X->bn, A->relu, A->maxpool);
        if (!X->bn) {
            SYNC();
            conv1_wgrad(ws->ch[k].x, ws->ch[k].a1, ws->pw1, *lo, *hi, 0, H1);
        }
    }
}

/* Batch norm 1's backward by channels, then conv1's weight gradient by register tiles. */
static void stage_bn1_bwd(step_ctx *X, int t, int T, int *lo, int *hi)
{
    const ln_args *A = X->a;
    ln_ws *ws = X->ws;
    share(C1, t, T, lo, hi);
    bn_layer_bwd(ws->ch, X->nch, 1, A->params, ws->grad, X->istd1, (int64_t)X->B * H1 * H1, A->maxpool, *lo,
                 *hi);
    SYNC();
    PROF(t, S_BN1B);
    share(CONV1_WGRAD_UNITS, t, T, lo, hi);
    for (int k = 0; k < X->nch; k++)
        conv1_wgrad(ws->ch[k].x, ws->ch[k].a1, ws->pw1, *lo, *hi, 0, H1);
}

/* The backward through both conv layers, up to conv1's weight gradient's partials: on one
 * thread without batch norm row by row (conv_backward_rows), else stage by stage. Returns this
 * thread's units of conv1's weight gradient in [*lo, *hi). */
static void backward_convs(step_ctx *X, int t, int T, int *lo, int *hi)
{
    if (!X->bn && T == 1) {
        for (int k = 0; k < X->nch; k++)
            conv_backward_rows(&X->ws->ch[k], X->ws, X->a->relu, X->a->maxpool);
        conv2_wgrad_finish(X->ws->pw2, X->ws->grad + goff(P_C2W), 0, CONV2_WGRAD_UNITS);
        conv2_bias_grad(X);
        *lo = 0, *hi = CONV1_WGRAD_UNITS;
        PROF(t, S_BACK2);
        return;
    }
    stage_act2_bwd(X, t, T);
    stage_conv2_bwd(X, t, T, lo, hi);
    if (!X->bn) {
        PROF(t, S_BACK2);
        return;
    }
    SYNC();
    PROF(t, S_BACK2);
    stage_bn1_bwd(X, t, T, lo, hi);
}

/* conv1's weight gradient's sums for units [lo, hi); on thread 0 conv1's bias gradient
 * without batch norm, and Adam's step counts advanced. */
static void stage_conv1_finish(step_ctx *X, int t, int lo, int hi)
{
    const ln_args *A = X->a;
    float *grad = X->ws->grad;
    conv1_wgrad_finish(X->ws->pw1, grad + goff(P_C1W), lo, hi);
    if (t != 0)
        return;
    if (!X->bn)
        for (int c = 0; c < C1; c++)
            grad[goff(P_C1B) + c] += (float)sum_rows(X->ws->ch, X->nch, RS1A, c, H1, A->maxpool ? Q1 : H1);
    if (A->optimizer != OPT_SGD)
        for (int s = 0; s < NPARAM; s++)
            if (A->params[s])
                *A->steps[s] += 1.0f;
}

/* The update by ranges of 16 elements of the slots laid end to end. */
static void stage_update(step_ctx *X, int t, int T)
{
    const ln_args *A = X->a;
    float *const *P = A->params, *grad = X->ws->grad;
    int lo, hi;
    share(goff(NPARAM) / 16, t, T, &lo, &hi);
    for (int s = 0; s < NPARAM; s++) {
        const int off = goff(s), i0 = 16 * lo > off ? 16 * lo - off : 0;
        const int i1 = 16 * hi - off < PSIZE[s] ? 16 * hi - off : PSIZE[s];
        if (!P[s] || i0 >= i1)
            continue;
        if (A->optimizer == OPT_SGD)
            sgd_update(P[s] + i0, grad + off + i0, A->s1[s] ? A->s1[s] + i0 : NULL, i1 - i0, A->lr, A->momentum,
                       A->weight_decay);
        else
            adam_update(P[s] + i0, grad + off + i0, A->s1[s] + i0, A->s2[s] + i0, i1 - i0, *A->steps[s],
                        A->optimizer == OPT_ADAMW, A->lr, A->beta1, A->beta2, A->eps, A->weight_decay);
    }
}

/* The step as thread t of T sees it: its stages in order, a barrier wherever one reads what
 * another thread wrote (see the comment above for why the results do not depend on T). */
static void step_job(void *arg, int t, int T)
{
    step_ctx *X = arg;
    int lo, hi; /* this thread's units of conv1's weight gradient */
    PROF_START(t);
    stage_pack(X, t, T);
    SYNC();
    PROF(t, S_PACK);
    forward_convs(X, t, T);
    classifier(X, t, T);
    backward_convs(X, t, T, &lo, &hi);
    stage_conv1_finish(X, t, lo, hi);
    SYNC();
    PROF(t, S_WG1);
    stage_update(X, t, T);
    PROF_ARRIVE(t); /* the update's end: the pool's barrier */
    PROF(t, S_UPD);
}
#undef SYNC

/* One training step on a batch of B images: forward, mean cross-entropy, backward, one update,
 * on a->threads threads (see ln_args for the fields). Returns LN_OK, or LN_BAD_INDEX for an
 * index out of range, LN_BAD_LABEL for a label out of range, LN_BAD_MIX for mixing outside
 * the batch or the image (mix_valid), LN_BAD_TARGET for a soft target outside [0, 1] (or
 * NaN), LN_NO_MEMORY, LN_BAD_BATCH for a batch size out of range
 * (nothing is changed then). */
int ln_train_step(ln_ws *ws, const ln_args *a)
{
    if (a->batch < 1 || a->batch > (1 << 24))
        return LN_BAD_BATCH;
    const int B = (int)a->batch;
    for (int b = 0; b < B; b++) {
        const int64_t r = a->idx ? a->idx[b] : b;
        if (r < 0 || r >= a->rows)
            return LN_BAD_INDEX;
        if (a->y[r] < 0 || a->y[r] >= F3)
            return LN_BAD_LABEL;
    }
    const mix_t mix = {a->mix_with, a->mix_lam, a->mix_box};
    if (mix.with && !(mix.lam && mix_valid(&mix, B)))
        return LN_BAD_MIX;
    if (a->targets)
        for (int64_t i = 0; i < (int64_t)B * F3; i++)
            if (!(a->targets[i] >= 0.f && a->targets[i] <= 1.f)) /* NaN fails too */
                return LN_BAD_TARGET;
    const int nch = (B + BATCH - 1) / BATCH;
    if (ws_reserve(ws, nch))
        return LN_NO_MEMORY;
    for (int k = 0; k < nch; k++)
        set_lanes(&ws->ch[k], B - k * BATCH < BATCH ? B - k * BATCH : BATCH);
    step_ctx X = {ws, a, {a->move, a->pad, a->erase_rows, a->erase_cols, (float)a->background}, mix, nch, B,
                  a->params[P_BN1W] != NULL, {0}, {0}};
    pool_run(&ws->pool, a->threads, step_job, &X);
    return LN_OK;
}
