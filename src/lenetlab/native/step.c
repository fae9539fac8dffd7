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
        conv2_wgrad(c->p1, c->a2, ws->pw2, 0, conv2_wgrad_UNITS, 2 * py, 2 * py + 2);
    }
    for (int py = 0; py < Q1; py++) {
        conv2_bwd_band(c, ws->w2t, py, py + 1, 0, 1, 0, relu, maxpool);
        conv1_wgrad(c->x, c->a1, ws->pw1, 0, conv1_wgrad_UNITS, 2 * py, 2 * py + 2);
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
 * norm. Small stages run on one thread: fc3, the loss and fc3's gradients (~10 us), conv2's
 * weight flip. On one thread without batch norm the conv layers run their own row-by-row
 * order (conv1_rows, conv2_rows, conv_backward_rows): the same arithmetic, in a schedule that
 * keeps each activation's rows in cache from the stage that writes them to the one that reads
 * them; on several the stages keep their partition (a row pipeline there would need a barrier
 * per row). */
static void step_job(void *arg, int t, int T)
{
    step_ctx *X = arg;
    ln_ws *ws = X->ws;
    const ln_args *A = X->a;
    float *const *P = A->params;
    float *grad = ws->grad;
    chunk *ch = ws->ch;
    const int nch = X->nch, bn = X->bn, relu = A->relu, maxpool = A->maxpool;
    const int64_t *idx = A->idx;
    barrier_t *bar = &ws->pool.bar;
    float K1[C1], K2[C2]; /* bn_row_sums' shifts of conv1's and conv2's maps */
    int lo, hi;
#define SYNC() (PROF_ARRIVE(t), barrier_wait(bar, T), PROF_LEAVE(t))
    PROF_START(t);

    /* The images packed by 16-lane groups, the dropout scales transposed by rows, conv2's
     * weights flipped and transposed for its input gradient. */
    share(nch * LANE_GROUPS, t, T, &lo, &hi);
    for (int u = lo; u < hi; u++) {
        const int k = u / LANE_GROUPS, b0 = u % LANE_GROUPS * 16;
        pack_input(&ch[k], A->x, idx, (int64_t)k * BATCH, &X->aug, b0);
    }
    if (A->drop) {
        share(nch * F1, t, T, &lo, &hi);
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
                    ws->w2t[(c * C2 + o) * 25 + 24 - i] = P[P_C2W][(o * C1 + c) * 25 + i];
    SYNC();
    PROF(t, S_PACK);

    /* conv1 by pooling rows (block row py: conv1 rows 2py and 2py + 1 of all maps), conv2 by
     * (register tile of output maps, pooling row): without batch norm each into a1 or a2,
     * activated and pooled in place while in cache (conv1_rows, conv2_rows); with batch norm
     * into z1 or z2, activated and pooled by channels after the statistics. On one thread
     * without batch norm conv2's pooling row runs as soon as conv1 has made the p1 rows under
     * it. */
    if (!bn && T == 1) {
        for (int k = 0; k < nch; k++)
            for (int py = 0; py < Q1; py++) {
                conv1_rows(&ch[k], P, py, relu, maxpool);
                if (py >= 5 && py % 2) /* p1 rows 2 py2 .. 2 py2 + 5 are made: conv2's row py2 */
                    for (int u = (py - 5) / 2; u < C2 / CONV2_OCB * Q2; u += Q2)
                        conv2_rows(&ch[k], P, u, NULL, relu, maxpool);
            }
        PROF(t, S_CONV1);
    } else {
        share(Q1, t, T, &lo, &hi);
        if (bn)
            bn_shift(ch[0].x, 1, XP, 14, C1, P[P_C1W], P[P_C1B], K1); /* conv1's (14, 14), padded */
        for (int k = 0; k < nch; k++)
            for (int py = lo; py < hi; py++) {
                if (bn) {
                    conv1_fwd(ch[k].x, P[P_C1W], P[P_C1B], ch[k].z1, 2 * py, 2 * py + 2, 0, C1);
                    bn_row_sums(&ch[k], ch[k].z1, H1, K1, ch[k].rs + RS1A, ch[k].rs + RS1B, 0, C1, 2 * py,
                                2 * py + 2);
                } else
                    conv1_rows(&ch[k], P, py, relu, maxpool);
            }
        SYNC();
        PROF(t, S_CONV1);
        if (bn) {
            share(C1, t, T, &lo, &hi);
            bn_layer_fwd(ch, nch, 1, H1, P, A->run, A->nbt[0], A->bn_eps, A->bn_momentum,
                         (int64_t)X->B * H1 * H1, K1, X->istd1, relu, maxpool, lo, hi, t == 0);
            SYNC();
            bn_shift(ch[0].p1, C1, Q1, 5, C2, P[P_C2W], P[P_C2B], K2); /* every thread alike: no barrier */
        }
        PROF(t, S_BN1);
        share(C2 / CONV2_OCB * Q2, t, T, &lo, &hi);
        for (int k = 0; k < nch; k++)
            for (int u = lo; u < hi; u++)
                conv2_rows(&ch[k], P, u, bn ? K2 : NULL, relu, maxpool);
    }
    SYNC();
    PROF(t, S_CONV2);
    if (bn) {
        share(C2, t, T, &lo, &hi);
        bn_layer_fwd(ch, nch, 2, H2, P, A->run, A->nbt[1], A->bn_eps, A->bn_momentum, (int64_t)X->B * H2 * H2,
                     K2, X->istd2, relu, maxpool, lo, hi, t == 0);
        SYNC();
    }
    PROF(t, S_BN2);

    /* The classifier, chunk by chunk (its weight gradients add up over the chunks in order),
     * each layer by blocks of its outputs. */
    for (int k = 0; k < nch; k++) {
        chunk *c = &ch[k];
        /* fc1 with its dropout and activation; p2 transposed for fc1's weight gradient */
        share(F1 / LIN_OB, t, T, &lo, &hi);
        int r0 = lo * LIN_OB, r1 = hi * LIN_OB;
        linear_fwd(c->p2, P[P_F1W], P[P_F1B], c->a3, r0, r1, FEAT, FEAT, 1);
        if (A->drop)
            for (int i = r0 * BATCH; i < r1 * BATCH; i += VW)
                ST(c->a3 + i, LD(c->a3 + i) * LD(c->drop + i));
        act_inplace(c->a3 + r0 * BATCH, (r1 - r0) * BATCH, relu);
        share(FEAT / 16, t, T, &lo, &hi);
        transpose_rows(c->p2, ws->featT, FEAT, 16 * lo, 16 * hi);
        SYNC();
        share(F2 / LIN_OB, t, T, &lo, &hi);
        r0 = lo * LIN_OB, r1 = hi * LIN_OB;
        linear_fwd(c->a3, P[P_F2W], P[P_F2B], c->a4, r0, r1, F1, F1, 1);
        act_inplace(c->a4 + r0 * BATCH, (r1 - r0) * BATCH, relu);
#if F1_FITS_VECTORS
        share(F1 / 8, t, T, &lo, &hi);
        transpose_rows(c->a3, ws->a3T, F1, 8 * lo, 8 * hi);
#endif
        SYNC();
        if (t == 0) { /* fc3, the loss and fc3's gradients */
            int64_t labels[BATCH];
            linear_fwd10(c->a4, P[P_F3W], P[P_F3B], c->lg, 0, F3, F2, F2, 1);
            for (int b = 0; b < c->n; b++)
                labels[b] = A->y[idx ? idx[k * BATCH + b] : k * BATCH + b];
            loss_fwd_bwd(c, labels, 1.0 / X->B, A->smoothing, A->totals);
            linear_wgrad10(c->dlg, c->a4, grad + goff(P_F3W), 0, F3, F2);
            bias_grad(c->dlg, grad + goff(P_F3B), F3);
        }
        SYNC();
        PROF(t, S_CLSF);
        /* by blocks of 4 of fc2's outputs: their gradient, through the activation, and fc2's
         * weight and bias gradients for them */
        share(F2 / 4, t, T, &lo, &hi);
        r0 = 4 * lo, r1 = 4 * hi;
        linear_bwd_input84(c->dlg, P[P_F3W], NULL, c->da4, r0, r1, F3, 1, F2);
        act_bwd(c->da4 + r0 * BATCH, c->a4 + r0 * BATCH, NULL, (r1 - r0) * BATCH, relu);
#if F1_FITS_VECTORS
        fc2_wgrad(c->da4, ws->a3T, grad + goff(P_F2W), c->n, r0, r1);
#else
        linear_wgrad(c->da4, c->a3, grad + goff(P_F2W), r0, r1, F1);
#endif
        bias_grad(c->da4 + r0 * BATCH, grad + goff(P_F2B) + r0, r1 - r0);
        SYNC();
        /* likewise fc1's outputs, through the activation and dropout */
        share(F1 / DA3_ROWS, t, T, &lo, &hi);
        r0 = DA3_ROWS * lo, r1 = DA3_ROWS * hi;
        linear_bwd_input(c->da4, P[P_F2W], NULL, c->da3, r0, r1, F2, 1, F1);
        act_bwd(c->da3 + r0 * BATCH, c->a3 + r0 * BATCH, A->drop ? c->drop + r0 * BATCH : NULL,
                (r1 - r0) * BATCH, relu);
        fc1_wgrad(c->da3, ws->featT, grad + goff(P_F1W), c->n, r0, r1);
        bias_grad(c->da3 + r0 * BATCH, grad + goff(P_F1B) + r0, r1 - r0);
        SYNC();
        /* the gradient w.r.t. the pooled conv2 maps */
        share(FEAT / LINI_OB, t, T, &lo, &hi);
        linear_bwd_input(c->da3, P[P_F1W], NULL, c->dp2, lo * LINI_OB, hi * LINI_OB, F1, 1, FEAT);
        SYNC();
        PROF(t, S_CLSB);
    }

    /* act2 backward by pooling rows, its gradient into a2 in place; with batch norm then its
     * backward by channels. conv2's weight gradient by register tiles of weights; conv2's
     * input gradient and act1's backward by rows (conv2_bwd_band); without batch norm conv1's
     * weight gradient by register tiles, after a barrier (each tile reads every row). On one
     * thread without batch norm all of them run row by row (conv_backward_rows). */
    if (!bn && T == 1) {
        for (int k = 0; k < nch; k++)
            conv_backward_rows(&ch[k], ws, relu, maxpool);
        conv2_wgrad_finish(ws->pw2, grad + goff(P_C2W), 0, conv2_wgrad_UNITS);
        for (int c = 0; c < C2; c++)
            grad[goff(P_C2B) + c] += (float)sum_rows(ch, nch, RS2A, c, H2, maxpool ? Q2 : H2);
        lo = 0, hi = conv1_wgrad_UNITS;
        PROF(t, S_BACK2);
    } else {
        share(C2 * Q2, t, T, &lo, &hi);
        for (int k = 0; k < nch; k++)
            act_pool_bwd(ch[k].dp2, ch[k].a2, ch[k].a2, H2, H2, 0, bn ? ch[k].z2 : NULL, ch[k].rs + RS2A,
                         ch[k].rs + RS2B, lo, hi, relu, maxpool);
        SYNC();
        PROF(t, S_ACT2B);
        if (bn) {
            share(C2, t, T, &lo, &hi);
            bn_layer_bwd(ch, nch, 2, P, grad, X->istd2, (int64_t)X->B * H2 * H2, maxpool, lo, hi);
            SYNC();
        }
        PROF(t, S_BN2B);
        share(conv2_wgrad_UNITS, t, T, &lo, &hi);
        for (int k = 0; k < nch; k++)
            conv2_wgrad(ch[k].p1, ch[k].a2, ws->pw2, lo, hi, 0, H2);
        conv2_wgrad_finish(ws->pw2, grad + goff(P_C2W), lo, hi);
        if (!bn && t == 0)
            for (int c = 0; c < C2; c++)
                grad[goff(P_C2B) + c] += (float)sum_rows(ch, nch, RS2A, c, H2, maxpool ? Q2 : H2);
        share(conv1_wgrad_UNITS, t, T, &lo, &hi);
        for (int k = 0; k < nch; k++) {
            conv2_bwd_band(&ch[k], ws->w2t, 0, Q1, t, T, bn, relu, maxpool);
            if (!bn) {
                SYNC();
                conv1_wgrad(ch[k].x, ch[k].a1, ws->pw1, lo, hi, 0, H1);
            }
        }
        if (!bn)
            PROF(t, S_BACK2);
    }
    if (bn) {
        SYNC();
        PROF(t, S_BACK2);
        share(C1, t, T, &lo, &hi);
        bn_layer_bwd(ch, nch, 1, P, grad, X->istd1, (int64_t)X->B * H1 * H1, maxpool, lo, hi);
        SYNC();
        PROF(t, S_BN1B);
        share(conv1_wgrad_UNITS, t, T, &lo, &hi);
        for (int k = 0; k < nch; k++)
            conv1_wgrad(ch[k].x, ch[k].a1, ws->pw1, lo, hi, 0, H1);
    }
    /* conv1's weight gradient's sums; Adam's step counts advanced */
    conv1_wgrad_finish(ws->pw1, grad + goff(P_C1W), lo, hi);
    if (t == 0) {
        if (!bn)
            for (int c = 0; c < C1; c++)
                grad[goff(P_C1B) + c] += (float)sum_rows(ch, nch, RS1A, c, H1, maxpool ? Q1 : H1);
        if (A->optimizer != OPT_SGD)
            for (int s = 0; s < NPARAM; s++)
                if (P[s])
                    *A->steps[s] += 1.0f;
    }
    SYNC();
    PROF(t, S_WG1);

    /* the update by ranges of 16 elements of the slots laid end to end */
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
    PROF_ARRIVE(t); /* the update's end: the pool's barrier */
    PROF(t, S_UPD);
#undef SYNC
}

/* One training step on a batch of B images: forward, mean cross-entropy, backward, one update,
 * on a->threads threads (see ln_args for the fields). Returns 0, or -1 for an index out of
 * range, -2 for a label out of range, -3 out of memory, -4 for a batch size out of range
 * (nothing is changed then). */
int ln_train_step(ln_ws *ws, const ln_args *a)
{
    if (a->batch < 1 || a->batch > (1 << 24))
        return -4;
    const int B = (int)a->batch;
    for (int b = 0; b < B; b++) {
        const int64_t r = a->idx ? a->idx[b] : b;
        if (r < 0 || r >= a->rows)
            return -1;
        if (a->y[r] < 0 || a->y[r] >= F3)
            return -2;
    }
    const int nch = (B + BATCH - 1) / BATCH;
    if (ws_reserve(ws, nch))
        return -3;
    for (int k = 0; k < nch; k++)
        set_lanes(&ws->ch[k], B - k * BATCH < BATCH ? B - k * BATCH : BATCH);
    step_ctx X = {ws, a, {a->move, a->pad, a->erase_rows, a->erase_cols, (float)a->background}, nch, B,
                  a->params[P_BN1W] != NULL, {0}, {0}};
    pool_run(&ws->pool, a->threads, step_job, &X);
    return 0;
}
