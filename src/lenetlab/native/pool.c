/* pool.c: one concern, the element-wise stages around a convolution: [batch norm's affine map],
 * activation and 2x2 average or max pooling, forward and backward. */

/* ------------------------------------------------------------------------------------------
 * Element-wise stages around the convolutions: [batch norm], tanh or ReLU, 2x2 average or max
 * pooling (conv -> [bn] -> activation -> pool, as in the module).
 * ------------------------------------------------------------------------------------------ */

/* The max of a 2x2 block given in row-major order, as torch's CPU max_pool2d scans it: the
 * running max m becomes t only where t > m (vmax(t, m)), so equal values keep the first. */
static inline vf max4(vf t00, vf t01, vf t10, vf t11) { return vmax(t11, vmax(t10, vmax(t01, t00))); }

/* a = act(((z - mean) * istd) * gamma + beta), p = 2x2 mean or max of a, for the block rows
 * u = c * (H / 2) + py in [u0, u1) (a thread's share: whole block rows, so its pooled outputs
 * and the pixels under them are its own). Without batch norm the caller passes mean 0, istd 1,
 * gamma 1, beta 0, which leave z unchanged bit for bit. With store_xhat the normalised z
 * replaces z (the batch-norm backward needs it); a may be NULL (evaluation), or z itself
 * without store_xhat (each pixel is read before it is written). The block is
 * visited in the order of model._AvgPool2x2's sum (hence the column-major offsets); the max
 * takes it in torch's row-major order (max4). */
INLINE void act_pool_fwd_body(float *z, float *a, float *restrict p, int H,
                              const float *mean, const float *istd, const float *gamma, const float *beta,
                              int store_xhat, int u0, int u1, const int relu, const int maxpool)
{
    const int Q = H / 2;
    for (int u = u0; u < u1; u++) {
        const int c = u / Q, py = u % Q;
        const vf m = splat(mean[c]), s = splat(istd[c]), g = splat(gamma[c]), b = splat(beta[c]);
        for (int px = 0; px < Q; px++)
            for (int v = 0; v < NV; v++) {
                size_t off[4];
                vf t[4];
                UNROLL for (int j = 0; j < 4; j++) { /* (dy, dx) = (0,0), (1,0), (0,1), (1,1) */
                    off[j] = ((size_t)(c * H + 2 * py + j % 2) * H + 2 * px + j / 2) * BATCH + v * VW;
                    const vf xh = (LD(z + off[j]) - m) * s;
                    if (store_xhat)
                        ST(z + off[j], xh);
                    t[j] = xh * g + b;
                }
                if (relu)
                    UNROLL for (int j = 0; j < 4; j++) t[j] = vrelu(t[j]);
                else
                    vtanh_n(t, 4);
                if (a)
                    UNROLL for (int j = 0; j < 4; j++) ST(a + off[j], t[j]);
                ST(p + ((size_t)(c * Q + py) * Q + px) * BATCH + v * VW,
                   maxpool ? max4(t[0], t[2], t[1], t[3]) : (t[0] + t[1] + t[2] + t[3]) * 0.25f);
            }
    }
}

static void act_pool_fwd(float *z, float *a, float *restrict p, int H,
                         const float *mean, const float *istd, const float *gamma, const float *beta,
                         int store_xhat, int u0, int u1, int relu, int maxpool)
{
    if (relu && maxpool)
        act_pool_fwd_body(z, a, p, H, mean, istd, gamma, beta, store_xhat, u0, u1, 1, 1);
    else if (relu)
        act_pool_fwd_body(z, a, p, H, mean, istd, gamma, beta, store_xhat, u0, u1, 1, 0);
    else if (maxpool)
        act_pool_fwd_body(z, a, p, H, mean, istd, gamma, beta, store_xhat, u0, u1, 0, 1);
    else
        act_pool_fwd_body(z, a, p, H, mean, istd, gamma, beta, store_xhat, u0, u1, 0, 0);
}

/* dz = act'(a) * (the pooling's gradient of dp) for the block rows u = c * (H / 2) + py in
 * [u0, u1), dz with rows of DW pixels starting at column DX (dz may be a itself). Average
 * pooling gives each pixel dp[c][y/2][x/2] / 4; max pooling gives all of dp to one pixel of its
 * block, the first maximal one in row-major order (torch's CPU max_pool2d index, ties included:
 * a block of ReLU zeros routes to its top-left), found again from a rather than stored by the
 * forward. Sums over the batch, one per row (average pooling: rs[c * H + y]) or per block row
 * (max pooling: rs[c * H + py]): rs1 of dz, and with xhat rs2 of dz * xhat; sum_rows adds them
 * up per channel in the order the single-threaded step did, whichever thread made each.
 * Padding lanes have dp = 0, so dz = 0. */
INLINE void act_pool_bwd_body(const float *restrict dp, const float *a, float *dz, int H, int DW, int DX,
                              const float *restrict xhat, float *rs1, float *rs2, int u0, int u1,
                              const int relu, const int maxpool)
{
    const int Q = H / 2;
    for (int u = u0; u < u1; u++) {
        const int c = u / Q, py = u % Q;
        if (!maxpool) {
            for (int y = 2 * py; y < 2 * py + 2; y++) {
                vf r1 = splat(0.f), r2 = splat(0.f);
                for (int x = 0; x < H; x++)
                    for (int v = 0; v < NV; v++) {
                        const size_t off = ((size_t)(c * H + y) * H + x) * BATCH + v * VW;
                        const vf d = act_grad(LD(dp + ((size_t)(c * Q + y / 2) * Q + x / 2) * BATCH + v * VW) * 0.25f,
                                              LD(a + off), relu);
                        ST(dz + ((size_t)(c * H + y) * DW + DX + x) * BATCH + v * VW, d);
                        r1 += d;
                        if (xhat)
                            r2 += d * LD(xhat + off);
                    }
                rs1[c * H + y] = hsum(r1);
                if (xhat)
                    rs2[c * H + y] = hsum(r2);
            }
            continue;
        }
        /* block by block: a block's four pixels are all read before any is written (dz may be a) */
        vf r1 = splat(0.f), r2 = splat(0.f);
        for (int px = 0; px < Q; px++)
            for (int v = 0; v < NV; v++) {
                size_t off[4];
                vf t[4];
                UNROLL for (int j = 0; j < 4; j++) { /* row-major: (dy, dx) = (0,0), (0,1), (1,0), (1,1) */
                    off[j] = ((size_t)(c * H + 2 * py + j / 2) * H + 2 * px + j % 2) * BATCH + v * VW;
                    t[j] = LD(a + off[j]);
                }
                const vf m = max4(t[0], t[1], t[2], t[3]);
                const vf g = LD(dp + ((size_t)(c * Q + py) * Q + px) * BATCH + v * VW);
                vi open = ~(vi){}; /* lanes whose gradient is still to place */
                UNROLL for (int j = 0; j < 4; j++) {
                    const vi first = open & (t[j] == m);
                    open &= ~first;
                    const vf d = act_grad(vsel(first, g, splat(0.f)), t[j], relu);
                    ST(dz + ((size_t)(c * H + 2 * py + j / 2) * DW + DX + 2 * px + j % 2) * BATCH + v * VW, d);
                    r1 += d;
                    if (xhat)
                        r2 += d * LD(xhat + off[j]);
                }
            }
        rs1[c * H + py] = hsum(r1);
        if (xhat)
            rs2[c * H + py] = hsum(r2);
    }
}

static void act_pool_bwd(const float *restrict dp, const float *a, float *dz, int H, int DW, int DX,
                         const float *restrict xhat, float *rs1, float *rs2, int u0, int u1, int relu,
                         int maxpool)
{
    if (relu && maxpool)
        act_pool_bwd_body(dp, a, dz, H, DW, DX, xhat, rs1, rs2, u0, u1, 1, 1);
    else if (relu)
        act_pool_bwd_body(dp, a, dz, H, DW, DX, xhat, rs1, rs2, u0, u1, 1, 0);
    else if (maxpool)
        act_pool_bwd_body(dp, a, dz, H, DW, DX, xhat, rs1, rs2, u0, u1, 0, 1);
    else
        act_pool_bwd_body(dp, a, dz, H, DW, DX, xhat, rs1, rs2, u0, u1, 0, 0);
}
