/* batchnorm.c: one concern, batch norm in training mode: statistics, running statistics,
 * normalisation and backward. */

/* Batch-norm backward, second pass, channels [c0, c1): dz = k * (dy - mdy - xhat * mdyx) on the
 * batch's lanes, 0 on the padding lanes; db += sum dz (the gradient of the conv bias under the
 * batch norm). */
static void bn_bwd(float *restrict dz, const float *restrict xhat, int c0, int c1, int H, int DW, int DX,
                   const float *k, const float *mdy, const float *mdyx, const float *mask, float *db)
{
    for (int c = c0; c < c1; c++) {
        const vf kc = splat(k[c]), a = splat(mdy[c]), b = splat(mdyx[c]);
        vf s = splat(0.f);
        for (int y = 0; y < H; y++)
            for (int x = 0; x < H; x++)
                for (int v = 0; v < NV; v++) {
                    float *d = dz + ((size_t)(c * H + y) * DW + DX + x) * BATCH + v * VW;
                    const vf xh = LD(xhat + ((size_t)(c * H + y) * H + x) * BATCH + v * VW);
                    const vf r = kc * (LD(d) - a - xh * b) * LD(mask + v * VW);
                    ST(d, r);
                    s += r;
                }
        db[c] += hsum(s);
    }
}

/* Channel c's sum over the batch of per-row sums (act_pool_bwd's, bn_row_sums') at rs + off:
 * chunk by chunk, row by row (R rows), in double, as the single-threaded step accumulated them. */
static double sum_rows(const chunk *ch, int nch, int off, int c, int H, int R)
{
    double s = 0.0;
    for (int k = 0; k < nch; k++)
        for (int r = 0; r < R; r++)
            s += ch[k].rs[off + c * H + r];
    return s;
}

/* The per-row sums batch norm's statistics come from, taken as a convolution writes its rows:
 * over rows [y0, y1) of maps [m0, m1) of chunk c's output z, the sums of d and d * d, d = z - K
 * on the lanes in use, into s1 and s2 (indexed map * H + row). K, one value of
 * each map, shifts the data so that the variance from these sums does not cancel. Two passes
 * over the whole output after the layer (the mean, then the deviations, one add chain each)
 * cost about ten times these sums (docs/native.md). */
_Static_assert(NV % 4 == 0, "bn_row_sums' four chains");
static void bn_row_sums(const chunk *ch, const float *z, int H, const float *K, float *s1, float *s2,
                        int m0, int m1, int y0, int y1)
{
    const float *mask = ch->n < BATCH ? ch->mask : NULL; /* NULL: every lane in use */
    for (int c = m0; c < m1; c++) {
        const vf k = splat(K[c]);
        for (int y = y0; y < y1; y++) {
            const float *row = z + ((size_t)c * H + y) * H * BATCH;
            vf a[4] = {0}, b[4] = {0}; /* four chains: one add's latency per vector otherwise */
            for (int x = 0; x < H; x++)
                for (int v = 0; v < NV; v += 4)
                    UNROLL for (int q = 0; q < 4; q++) {
                        vf d = LD(row + (size_t)(x * NV + v + q) * VW) - k;
                        if (mask)
                            d *= LD(mask + (v + q) * VW);
                        a[q] += d;
                        b[q] += d * d;
                    }
            s1[c * H + y] = hsum((a[0] + a[1]) + (a[2] + a[3]));
            s2[c * H + y] = hsum((b[0] + b[1]) + (b[2] + b[3]));
        }
    }
}

/* The shifts of bn_row_sums: each of a conv's OC output maps at (at, at) for the batch's first
 * image (lane 0), from its input in (IC maps of W x W pixels, its 5x5 window at rows and columns
 * at..at + 4): any value of a map that every thread computes alike serves, one near the map's
 * mean keeps the most precision. Each thread computes them itself. */
static void bn_shift(const float *in, int IC, int W, int at, int OC, const float *w, const float *bias,
                     float *K)
{
    for (int o = 0; o < OC; o++) {
        double s = bias[o];
        for (int c = 0; c < IC; c++)
            for (int i = 0; i < 25; i++)
                s += (double)w[(o * IC + c) * 25 + i]
                     * in[((size_t)(c * W + at + i / 5) * W + at + i % 5) * BATCH];
        K[o] = (float)s;
    }
}

/* Batch statistics of one conv output, channels [c0, c1), from the chunks' row sums: the mean,
 * and the biased variance from the shifted sums; totals in double. */
static void bn_stats(chunk *ch, int nch, int which, int H, const float *K, double *mean, double *var,
                     int64_t count, int c0, int c1)
{
    const int o1 = which == 1 ? RS1A : RS2A, o2 = which == 1 ? RS1B : RS2B;
    for (int c = c0; c < c1; c++) {
        const double d = sum_rows(ch, nch, o1, c, H, H) / (double)count;
        mean[c] = K[c] + d;
        var[c] = fmax(sum_rows(ch, nch, o2, c, H, H) / (double)count - d * d, 0.0);
    }
}

/* Training-mode batch norm of one layer, channels [c0, c1): statistics, running-statistics
 * update (momentum, the unbiased variance, as torch; num_batches_tracked by the thread with
 * count_batch), then normalise, activate and pool each chunk. */
static void bn_layer_fwd(chunk *ch, int nch, int which, int H, float *const *P, float *const *run,
                         int64_t *nbt, double eps, double momentum, int64_t count, const float *K,
                         float *istd, int relu, int maxpool, int c0, int c1, int count_batch)
{
    double mean[C2], var[C2];
    float fmean[C2];
    bn_stats(ch, nch, which, H, K, mean, var, count, c0, c1);
    float *rm = run[which == 1 ? R_MEAN1 : R_MEAN2], *rv = run[which == 1 ? R_VAR1 : R_VAR2];
    for (int c = c0; c < c1; c++) {
        fmean[c] = (float)mean[c];
        istd[c] = (float)(1.0 / sqrt(var[c] + eps));
        rm[c] = (float)((1.0 - momentum) * rm[c] + momentum * mean[c]);
        rv[c] = (float)((1.0 - momentum) * rv[c] + momentum * var[c] * (double)count / (double)(count - 1));
    }
    if (count_batch)
        *nbt += 1;
    const float *gamma = P[which == 1 ? P_BN1W : P_BN2W], *beta = P[which == 1 ? P_BN1B : P_BN2B];
    const int Q = H / 2;
    for (int k = 0; k < nch; k++) {
        if (which == 1)
            act_pool_fwd(ch[k].z1, ch[k].a1, ch[k].p1, H1, fmean, istd, gamma, beta, 1, c0 * Q, c1 * Q, relu, maxpool);
        else
            act_pool_fwd(ch[k].z2, ch[k].a2, ch[k].p2, H2, fmean, istd, gamma, beta, 1, c0 * Q, c1 * Q, relu, maxpool);
    }
}

static const float ZEROS[C2] = {0}, ONES[C2] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

/* Batch-norm backward of one layer, channels [c0, c1), over all chunks, from the per-channel
 * sums of dy and dy * xhat: parameter gradients, then dz in place. */
static void bn_layer_bwd(chunk *ch, int nch, int which, float *const *P, float *grad, const float *istd,
                         int64_t count, int maxpool, int c0, int c1)
{
    const int H = which == 1 ? H1 : H2, R = maxpool ? H / 2 : H;
    const float *gamma = P[which == 1 ? P_BN1W : P_BN2W];
    float *gg = grad + goff(which == 1 ? P_BN1W : P_BN2W), *gb = grad + goff(which == 1 ? P_BN1B : P_BN2B);
    float k[C2], mdy[C2], mdyx[C2];
    for (int c = c0; c < c1; c++) {
        const double sdy = sum_rows(ch, nch, which == 1 ? RS1A : RS2A, c, H, R);
        const double sdyx = sum_rows(ch, nch, which == 1 ? RS1B : RS2B, c, H, R);
        gg[c] += (float)sdyx;
        gb[c] += (float)sdy;
        k[c] = gamma[c] * istd[c];
        mdy[c] = (float)(sdy / (double)count);
        mdyx[c] = (float)(sdyx / (double)count);
    }
    float *gbias = grad + goff(which == 1 ? P_C1B : P_C2B);
    for (int i = 0; i < nch; i++) {
        if (which == 1)
            bn_bwd(ch[i].a1, ch[i].z1, c0, c1, H1, H1, 0, k, mdy, mdyx, ch[i].mask, gbias);
        else
            bn_bwd(ch[i].a2, ch[i].z2, c0, c1, H2, H2, 0, k, mdy, mdyx, ch[i].mask, gbias);
    }
}
