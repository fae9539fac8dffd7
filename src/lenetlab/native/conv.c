/* conv.c: one concern, the 5x5 convolutions' kernels: forward, input gradient, weight gradient.
 *
 * Each kernel is an always-inline body (conv_rows, conv_wgrad_rows, conv_wgrad_sum) called with
 * a constant shape (CONV_SHAPE, WGRAD_SHAPE) by one named function per layer (conv1_fwd,
 * conv2_fwd, conv2_bwd_input, conv1_wgrad, conv2_wgrad and their _finish): the compiler
 * specialises each body for its shape, as it did for the macros these replaced. */

/* a shape's argument: a constant, not every kernel reads every one */
#define SHAPE_ARG const int __attribute__((unused))
/* A convolution's shape, the trailing arguments of conv_tile and conv_rows, all compile-time
 * constants: input and output maps (ic, oc), input rows and columns (ih, iw), output rows and
 * columns (oh, ow), padding (py, px: 0 valid, 4 the full convolution), the register tile
 * (ocb output maps x vb batch vectors) and the input maps per pass over an output row (cb). */
#define CONV_SHAPE SHAPE_ARG ic, SHAPE_ARG oc, SHAPE_ARG ih, SHAPE_ARG iw, SHAPE_ARG oh, SHAPE_ARG ow, \
                   SHAPE_ARG py, SHAPE_ARG px, SHAPE_ARG ocb, SHAPE_ARG vb, SHAPE_ARG cb
#define CONV_SHAPE_ARGS ic, oc, ih, iw, oh, ow, py, px, ocb, vb, cb

/* conv1 forward: x [1][32][32][64] (padded) -> [6][28][28][64] */
#define CONV1_FWD 1, C1, XP, XP, H1, H1, 0, 0, CONV1_OCB, CONV_VB, 1
/* conv2 forward: p1 [6][14][14][64] -> [16][10][10][64] */
#define CONV2_FWD C1, C2, Q1, Q1, H2, H2, 0, 0, CONV2_OCB, CONV2_VB, CONV2_CB
/* conv2 input gradient: dz2 [16][10][10][64], flipped transposed weights -> dp1 [6][14][14][64] */
#define CONV2_BWD_INPUT C2, C1, H2, H2, Q1, Q1, 4, 4, CONVI_OCB, CONV_VB, CONVI_CB
_Static_assert(C1 % CONV2_CB == 0 && C2 % CONVI_CB == 0,
               "channel blocks must divide the input channels");

/* ------------------------------------------------------------------------------------------
 * Convolutions (5x5, stride 1): out[o][y][x] = bias[o] + sum over c, ky, kx of
 * w[o][c][ky][kx] * in[c][y + ky - py][x + kx - px], input pixels outside [0, ih) x [0, iw)
 * skipped. py = px = 0 is a valid convolution (the forward passes); py = px = 4 with the
 * flipped, transposed weights is the full convolution that gives conv2's input gradient. Tiles
 * with the whole 5-column window inside the input run with constant kx bounds (fully unrolled);
 * only the edge columns run a kx loop over the columns that exist (the zero-padded input that
 * came before did ~1.4x the needed work). Each output row is made in passes of cb input maps
 * (cb = ic: one pass), each tile's sums stored in out between passes and continued in the same
 * order.
 * ------------------------------------------------------------------------------------------ */

/* One register tile: ocb output maps from o0 x vb batch vectors from v0, at output pixel
 * (y, x), over input maps [c0, c0 + cb), kernel rows [k0, k1) and columns [kx0, kx1). */
INLINE void conv_tile(const float *restrict in, const float *w, const float *restrict bias,
                      float *restrict out, int y, int x, int o0, int v0, int k0, int k1,
                      int kx0, int kx1, int c0, CONV_SHAPE)
{
    const float *wp = w + o0 * ic * 25;
    OPAQUE(wp);
    float *op = out + ((size_t)(o0 * oh + y) * ow + x) * BATCH + v0 * VW;
    vf acc[TILE_MAX_O][TILE_MAX_V]; /* ocb x vb of them used */
    UNROLL for (int o = 0; o < ocb; o++) {
        const vf b = splat(bias ? bias[o0 + o] : 0.f);
        UNROLL for (int v = 0; v < vb; v++)
            acc[o][v] = c0 ? LD(op + (size_t)o * oh * ow * BATCH + v * VW) : b;
    }
    for (int c = c0; c < c0 + cb; c++)
        for (int ky = k0; ky < k1; ky++) {
            /* ip: the input pixel under kx = kx0 (never before the buffer) */
            const float *ip = in + ((size_t)(c * ih + y + ky - py) * iw + x + kx0 - px) * BATCH
                              + v0 * VW;
            const float *wk = wp + c * 25 + ky * 5;
            UNROLL for (int kx = kx0; kx < kx1; kx++) {
                vf iv[TILE_MAX_V];
                UNROLL for (int v = 0; v < vb; v++) iv[v] = LD(ip + (kx - kx0) * BATCH + v * VW);
                UNROLL for (int o = 0; o < ocb; o++) {
                    const vf wv = splat(wk[o * ic * 25 + kx]);
                    UNROLL for (int v = 0; v < vb; v++) acc[o][v] += wv * iv[v];
                }
            }
        }
    UNROLL for (int o = 0; o < ocb; o++)
        UNROLL for (int v = 0; v < vb; v++) ST(op + (size_t)o * oh * ow * BATCH + v * VW, acc[o][v]);
}

/* Output rows [y0, y1) of output maps [oc0, oc1) (whole register tiles). */
INLINE void conv_rows(const float *restrict in, const float *restrict w, const float *restrict bias,
                      float *restrict out, int y0, int y1, int oc0, int oc1, CONV_SHAPE)
{
    for (int y = y0; y < y1; y++) {
        const int k0 = y < py ? py - y : 0;
        const int k1 = y + 5 - py > ih ? ih + py - y : 5;
        for (int c0 = 0; c0 < ic; c0 += cb)
            for (int x = 0; x < ow; x++) {
                const int kx0 = x < px ? px - x : 0;
                const int kx1 = x + 5 - px > iw ? iw + px - x : 5;
                for (int o0 = oc0; o0 < oc1; o0 += ocb)
                    for (int v0 = 0; v0 < NV; v0 += vb) {
                        if (kx0 == 0 && kx1 == 5) /* constant bounds: the kx loop unrolls */
                            conv_tile(in, w, bias, out, y, x, o0, v0, k0, k1, 0, 5, c0, CONV_SHAPE_ARGS);
                        else
                            conv_tile(in, w, bias, out, y, x, o0, v0, k0, k1, kx0, kx1, c0, CONV_SHAPE_ARGS);
                    }
            }
    }
}

/* conv1 forward: x [1][32][32][64] -> out [6][28][28][64], rows [y0, y1) of maps [oc0, oc1) */
static void conv1_fwd(const float *restrict in, const float *restrict w, const float *restrict bias,
                      float *restrict out, int y0, int y1, int oc0, int oc1)
{
    conv_rows(in, w, bias, out, y0, y1, oc0, oc1, CONV1_FWD);
}

/* conv2 forward: p1 [6][14][14][64] -> out [16][10][10][64], rows [y0, y1) of maps [oc0, oc1) */
static void conv2_fwd(const float *restrict in, const float *restrict w, const float *restrict bias,
                      float *restrict out, int y0, int y1, int oc0, int oc1)
{
    conv_rows(in, w, bias, out, y0, y1, oc0, oc1, CONV2_FWD);
}

/* conv2 input gradient: dz2 [16][10][10][64] with w2t [6][16][5][5] -> dp1 [6][14][14][64] */
static void conv2_bwd_input(const float *restrict in, const float *restrict w, const float *restrict bias,
                            float *restrict out, int y0, int y1, int oc0, int oc1)
{
    conv_rows(in, w, bias, out, y0, y1, oc0, oc1, CONV2_BWD_INPUT);
}

/* A weight gradient's shape, as CONV_SHAPE: g is [oc][oh][gw][64] with the map at column gx,
 * the register tile is ocb output maps x 5 kernel columns, og output-map blocks per pass. */
#define WGRAD_SHAPE SHAPE_ARG ic, SHAPE_ARG oc, SHAPE_ARG ih, SHAPE_ARG iw, SHAPE_ARG oh, SHAPE_ARG ow, \
                    SHAPE_ARG gw, SHAPE_ARG gx, SHAPE_ARG ocb, SHAPE_ARG og
#define WGRAD_SHAPE_ARGS ic, oc, ih, iw, oh, ow, gw, gx, ocb, og

/* conv1 weight gradient: x [1][32][32][64], dz1 [6][28][28][64] -> [6][1][5][5] */
#define CONV1_WGRAD 1, C1, XP, XP, H1, H1, H1, 0, WG1_OCB, 1
/* conv2 weight gradient: p1 [6][14][14][64], dz2 [16][10][10][64] -> [16][6][5][5] */
#define CONV2_WGRAD C1, C2, Q1, Q1, H2, H2, H2, 0, WG2_OCB, WG2_OG
/* units of work: one register tile's weights each (see conv_wgrad_rows) */
enum { CONV1_WGRAD_UNITS = 1 * 5 * (C1 / WG1_OCB), CONV2_WGRAD_UNITS = C1 * 5 * (C2 / WG2_OCB) };

/* Weight gradients: pw[o][c][ky][kx] += g[o][y][x] * in[c][y + ky][x + kx], summed over y and
 * x, lane by lane (pw holds vectors of per-lane partial sums; conv_wgrad_sum reduces them),
 * over the output rows [y0, y1): calls on consecutive row ranges continue each sum in the order
 * of one call over all rows. The work is in units u = o0 / ocb * ic * 5 + c * 5 + ky, each one
 * register tile's weights: a thread takes units [u0, u1), and each weight's sum runs over the
 * same y and x in the same order whoever owns it and in whatever order the units are visited
 * (for each row, og output-map blocks at a time, each input row once per group: see WG2_OG).
 * Output-map blocks first, so that a thread's run reads g of its own maps only, not all of g:
 * a line one thread reads after another wrote it is shared, and the writer's next step must
 * take it back from the reader's cache. */

/* Unit u's register tile (ocb maps x 5 kernel columns) over output row y. */
INLINE void conv_wgrad_unit(const float *restrict in, const float *restrict g, vf *restrict pw, int u, int y,
                            WGRAD_SHAPE)
{
    const int o0 = u / (ic * 5) * ocb, c = u % (ic * 5) / 5, ky = u % 5;
    vf *pp = pw + ((o0 * ic + c) * 5 + ky) * 5;
    vf acc[TILE_MAX_O][5]; /* ocb x 5 of them used */
    UNROLL for (int o = 0; o < ocb; o++)
        UNROLL for (int kx = 0; kx < 5; kx++) acc[o][kx] = pp[o * ic * 25 + kx];
    const float *gp = g + ((size_t)(o0 * oh + y) * gw + gx) * BATCH;
    const float *ip = in + (size_t)(c * ih + y + ky) * iw * BATCH;
    for (int j = 0; j < ow * NV; j++) {
        vf gv[TILE_MAX_O];
        UNROLL for (int o = 0; o < ocb; o++) gv[o] = LD(gp + (size_t)o * oh * gw * BATCH + j * VW);
        UNROLL for (int kx = 0; kx < 5; kx++) {
            const vf iv = LD(ip + kx * BATCH + j * VW);
            UNROLL for (int o = 0; o < ocb; o++) acc[o][kx] += gv[o] * iv;
        }
    }
    UNROLL for (int o = 0; o < ocb; o++)
        UNROLL for (int kx = 0; kx < 5; kx++) pp[o * ic * 25 + kx] = acc[o][kx];
}

/* Units [u0, u1) over output rows [y0, y1). */
INLINE void conv_wgrad_rows(const float *restrict in, const float *restrict g, vf *restrict pw, int u0, int u1,
                            int y0, int y1, WGRAD_SHAPE)
{
    for (int y = y0; y < y1; y++)
        for (int b0 = u0 / (ic * 5); b0 * ic * 5 < u1; b0 += og) /* og map blocks */
            for (int r = 0; r < ic * 5; r++) /* (c, ky): its input row once per group */
                for (int u = b0 * ic * 5 + r; u < (b0 + og) * ic * 5; u += ic * 5)
                    if (u >= u0 && u < u1)
                        conv_wgrad_unit(in, g, pw, u, y, WGRAD_SHAPE_ARGS);
}

/* dw += the lane sums of units [u0, u1)' partials, which are reset to 0 */
INLINE void conv_wgrad_sum(vf *restrict pw, float *restrict dw, int u0, int u1, WGRAD_SHAPE)
{
    for (int u = u0; u < u1; u++) {
        const int o0 = u / (ic * 5) * ocb, c = u % (ic * 5) / 5, ky = u % 5;
        for (int o = o0; o < o0 + ocb; o++)
            for (int kx = 0; kx < 5; kx++) {
                const int i = ((o * ic + c) * 5 + ky) * 5 + kx;
                dw[i] += hsum(pw[i]);
                pw[i] = splat(0.f);
            }
    }
}

/* conv1 weight gradient: partials pw [6][1][5][5] += x [1][32][32][64] . dz1 [6][28][28][64] */
static void conv1_wgrad(const float *restrict in, const float *restrict g, vf *restrict pw, int u0, int u1,
                        int y0, int y1)
{
    conv_wgrad_rows(in, g, pw, u0, u1, y0, y1, CONV1_WGRAD);
}

/* conv1's weight gradient gw [6][1][5][5] += the lane sums of its partials */
static void conv1_wgrad_finish(vf *restrict pw, float *restrict gw, int u0, int u1)
{
    conv_wgrad_sum(pw, gw, u0, u1, CONV1_WGRAD);
}

/* conv2 weight gradient: partials pw [16][6][5][5] += p1 [6][14][14][64] . dz2 [16][10][10][64] */
static void conv2_wgrad(const float *restrict in, const float *restrict g, vf *restrict pw, int u0, int u1,
                        int y0, int y1)
{
    conv_wgrad_rows(in, g, pw, u0, u1, y0, y1, CONV2_WGRAD);
}

/* conv2's weight gradient gw [16][6][5][5] += the lane sums of its partials */
static void conv2_wgrad_finish(vf *restrict pw, float *restrict gw, int u0, int u1)
{
    conv_wgrad_sum(pw, gw, u0, u1, CONV2_WGRAD);
}
