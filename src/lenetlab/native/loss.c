/* loss.c: one concern, cross-entropy (with label smoothing, on soft targets) and its gradient. */

/* Cross-entropy, mean over the whole batch of B: its gradient into dlg (0 on padding lanes),
 * the summed loss (in double) and the number of correct argmax predictions into totals. With
 * label smoothing eps, torch's: the target is (1 - eps) onehot + eps / 10, so an image's loss is
 * (1 - eps)(lse - z_y) + eps (lse - mean z) and its gradient softmax - target. eps = 0 runs the
 * plain loss's own arithmetic, not the smoothed formula, whose extra terms round differently.
 * With mixing (lam not NULL), image b's target is the soft lam[b] onehot(labels[b]) + (1 -
 * lam[b]) onehot(partners[b]), smoothed on top; it counts as correct for labels[b]. With
 * targets (not NULL: distillation, (n, 10) from the chunk's first image), image b's target is
 * targets[b] itself, smoothed on top, and lam and partners are not read; as torch's, its gradient
 * is softmax times the target's sum less the target (a sum of 1 is not assumed). */
static void loss_fwd_bwd(chunk *c, const int64_t *labels, const int64_t *partners, const float *lam,
                         const float *targets, double inv_b, double smoothing, double *totals)
{
    float mx[BATCH], sum[BATCH];
    for (int v = 0; v < NV; v++) {
        vf m = LD(c->lg + v * VW);
        for (int k = 1; k < F3; k++)
            m = vmax(m, LD(c->lg + k * BATCH + v * VW));
        vf e[F3], s = splat(0.f);
        for (int k = 0; k < F3; k++)
            e[k] = LD(c->lg + k * BATCH + v * VW) - m;
        vexp_n(e, F3);
        for (int k = 0; k < F3; k++)
            s += e[k];
        const vf r = splat((float)inv_b) / s;
        if (smoothing != 0.0) {
            const vf spread = splat((float)(smoothing / F3 * inv_b)); /* eps / 10 of each image's 1 / B */
            for (int k = 0; k < F3; k++)
                ST(c->dlg + k * BATCH + v * VW, (e[k] * r - spread) * LD(c->mask + v * VW));
        } else
            for (int k = 0; k < F3; k++)
                ST(c->dlg + k * BATCH + v * VW, e[k] * r * LD(c->mask + v * VW));
        for (int l = 0; l < VW; l++) {
            mx[v * VW + l] = m[l];
            sum[v * VW + l] = s[l];
        }
    }
    for (int b = 0; b < c->n; b++) {
        const int y = (int)labels[b];
        if (targets) {
            const double lse = log((double)sum[b]) + mx[b];
            double zsum = 0.0, loss = 0.0, tsum = 0.0;
            for (int k = 0; k < F3; k++)
                tsum += targets[b * F3 + k];
            /* torch's gradient is softmax times the smoothed target's sum, less the target; the
             * loop above took that sum as 1: add softmax times what it differs by */
            const double more = (1.0 - smoothing) * (tsum - 1.0) * inv_b;
            for (int k = 0; k < F3; k++) {
                const double w = (1.0 - smoothing) * targets[b * F3 + k];
                zsum += c->lg[k * BATCH + b];
                loss += w * (lse - c->lg[k * BATCH + b]);
                c->dlg[k * BATCH + b] += (float)(more * exp(c->lg[k * BATCH + b] - lse) - w * inv_b);
            }
            totals[0] += loss + smoothing * (lse - zsum / F3);
        } else if (lam) {
            const int y2 = (int)partners[b];
            const double w = (1.0 - smoothing) * lam[b], w2 = (1.0 - smoothing) * (1.0 - lam[b]);
            const double lse = log((double)sum[b]) + mx[b];
            double zsum = 0.0;
            for (int k = 0; k < F3; k++)
                zsum += c->lg[k * BATCH + b];
            totals[0] += w * (lse - c->lg[y * BATCH + b]) + w2 * (lse - c->lg[y2 * BATCH + b])
                         + smoothing * (lse - zsum / F3);
            c->dlg[y * BATCH + b] -= (float)(w * inv_b);
            c->dlg[y2 * BATCH + b] -= (float)(w2 * inv_b);
        } else if (smoothing != 0.0) {
            const double lse = log((double)sum[b]) + mx[b];
            double zsum = 0.0;
            for (int k = 0; k < F3; k++)
                zsum += c->lg[k * BATCH + b];
            totals[0] += (1.0 - smoothing) * (lse - c->lg[y * BATCH + b]) + smoothing * (lse - zsum / F3);
            c->dlg[y * BATCH + b] -= (float)((1.0 - smoothing) * inv_b);
        } else {
            totals[0] += log((double)sum[b]) + mx[b] - c->lg[y * BATCH + b];
            c->dlg[y * BATCH + b] -= (float)inv_b;
        }
        int best = 0;
        for (int k = 1; k < F3; k++)
            if (c->lg[k * BATCH + b] > c->lg[best * BATCH + b])
                best = k;
        totals[1] += best == y;
    }
}
