/* conv.c: one concern, the 5x5 convolutions' kernels: forward, input gradient, weight gradient. */

/* ------------------------------------------------------------------------------------------
 * Convolutions (5x5, stride 1). CONV: out[o][y][x] = bias[o] + sum over c, ky, kx of
 * w[o][c][ky][kx] * in[c][y + ky - PY][x + kx - PX], input pixels outside [0, IH) x [0, IW)
 * skipped. PY = PX = 0 is a valid convolution (the forward passes); PY = PX = 4 with the
 * flipped, transposed weights is the full convolution that gives conv2's input gradient. Tiles
 * with the whole 5-column window inside the input run with constant kx bounds (fully unrolled);
 * only the edge columns run a kx loop over the columns that exist (the earlier zero-padded
 * input did ~1.4x the needed work: 712 -> 468 us per step in one A/B profile under load).
 * Each output row is made in passes of CB input maps (CB = IC: one pass), each tile's sums
 * stored in out between passes and continued in the same order.
 * ------------------------------------------------------------------------------------------ */
#define CONV(NAME, IC, OC, IH, IW, OH, OW, PY, PX, OCB, VB, CB)                                   \
    INLINE void NAME##_tile(const float *restrict in, const float *w, const float *restrict bias,   \
                            float *restrict out, int y, int x, int o0, int v0, int k0, int k1,      \
                            int kx0, int kx1, int c0)                                             \
    {                                                                                             \
        const float *wp = w + o0 * (IC) * 25;                                                     \
        OPAQUE(wp);                                                                               \
        float *op = out + ((size_t)(o0 * (OH) + y) * (OW) + x) * BATCH + v0 * VW;                 \
        vf acc[OCB][VB];                                                                          \
        UNROLL for (int o = 0; o < OCB; o++) {                                                    \
            const vf b = splat(bias ? bias[o0 + o] : 0.f);                                        \
            UNROLL for (int v = 0; v < VB; v++)                                                   \
                acc[o][v] = c0 ? LD(op + (size_t)o * (OH) * (OW) * BATCH + v * VW) : b;           \
        }                                                                                         \
        for (int c = c0; c < c0 + (CB); c++)                                                      \
            for (int ky = k0; ky < k1; ky++) {                                                    \
                /* ip: the input pixel under kx = kx0 (never before the buffer) */             \
                const float *ip = in + ((size_t)(c * (IH) + y + ky - (PY)) * (IW) + x + kx0 - (PX)) * BATCH \
                                  + v0 * VW;                                                   \
                const float *wk = wp + c * 25 + ky * 5;                                        \
                UNROLL for (int kx = kx0; kx < kx1; kx++) {                                    \
                    vf iv[VB];                                                                 \
                    UNROLL for (int v = 0; v < VB; v++) iv[v] = LD(ip + (kx - kx0) * BATCH + v * VW); \
                    UNROLL for (int o = 0; o < OCB; o++) {                                        \
                        const vf wv = splat(wk[o * (IC) * 25 + kx]);                              \
                        UNROLL for (int v = 0; v < VB; v++) acc[o][v] += wv * iv[v];              \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        UNROLL for (int o = 0; o < OCB; o++)                                                      \
            UNROLL for (int v = 0; v < VB; v++) ST(op + (size_t)o * (OH) * (OW) * BATCH + v * VW, acc[o][v]); \
    }                                                                                             \
    static void NAME(const float *restrict in, const float *restrict w, const float *restrict bias, \
                     float *restrict out, int y0, int y1, int oc0, int oc1)                       \
    {                                                                                             \
        _Static_assert((IC) % (CB) == 0, "channel blocks must divide the input channels");        \
        for (int y = y0; y < y1; y++) {                                                           \
            const int k0 = y < (PY) ? (PY) - y : 0;                                               \
            const int k1 = y + 5 - (PY) > (IH) ? (IH) + (PY) - y : 5;                             \
            for (int c0 = 0; c0 < (IC); c0 += (CB))                                               \
                for (int x = 0; x < OW; x++) {                                                    \
                    const int kx0 = x < (PX) ? (PX) - x : 0;                                      \
                    const int kx1 = x + 5 - (PX) > (IW) ? (IW) + (PX) - x : 5;                    \
                    for (int o0 = oc0; o0 < oc1; o0 += OCB)                                       \
                        for (int v0 = 0; v0 < NV; v0 += VB) {                                     \
                            if (kx0 == 0 && kx1 == 5) /* constant bounds: the kx loop unrolls */  \
                                NAME##_tile(in, w, bias, out, y, x, o0, v0, k0, k1, 0, 5, c0);    \
                            else                                                                  \
                                NAME##_tile(in, w, bias, out, y, x, o0, v0, k0, k1, kx0, kx1, c0); \
                        }                                                                         \
                }                                                                                 \
        }                                                                                         \
    }

CONV(conv1_fwd, 1, C1, XP, XP, H1, H1, 0, 0, CONV1_OCB, CONV_VB, 1)
CONV(conv2_fwd, C1, C2, Q1, Q1, H2, H2, 0, 0, CONV2_OCB, CONV2_VB, CONV2_CB)
CONV(conv2_bwd_input, C2, C1, H2, H2, Q1, Q1, 4, 4, CONVI_OCB, CONV_VB, CONVI_CB)

/* CONV_WGRAD: pw[o][c][ky][kx] += g[o][y][x] * in[c][y + ky][x + kx], summed over y and x,
 * lane by lane (pw holds vectors of per-lane partial sums; NAME_finish reduces them), over
 * the output rows [y0, y1): calls on consecutive row ranges continue each sum in the order
 * of one call over all rows. g is [OC][OH][GW][64] with the map starting at column GX. The
 * work is in units u = o0 / OCB * IC * 5 + c * 5 + ky, each one register tile's weights: a
 * thread takes units [u0, u1), and each weight's sum runs over the same y and x in the same
 * order whoever owns it and in whatever order the units are visited (for each row, OG
 * output-map blocks at a time, each input row once per group: see WG2_OG). Output-map
 * blocks first, so that a thread's run reads g of its own maps only, not all of g: a line one
 * thread reads after another wrote it is shared, and the writer's next step must take it back
 * from the reader's cache (on 2 threads conv1's forward went from 231 to 175 us per step). */
#define CONV_WGRAD(NAME, IC, OC, IH, IW, OH, OW, GW, GX, OCB, OG)                                  \
    enum { NAME##_UNITS = (IC) * 5 * ((OC) / (OCB)) };                                            \
    INLINE void NAME##_unit(const float *restrict in, const float *restrict g, vf *restrict pw, int u, int y) \
    {                                                                                             \
        const int o0 = u / ((IC) * 5) * (OCB), c = u % ((IC) * 5) / 5, ky = u % 5;                \
        vf *pp = pw + ((o0 * (IC) + c) * 5 + ky) * 5;                                             \
        vf acc[OCB][5];                                                                           \
        UNROLL for (int o = 0; o < OCB; o++)                                                      \
            UNROLL for (int kx = 0; kx < 5; kx++) acc[o][kx] = pp[o * (IC) * 25 + kx];            \
        const float *gp = g + ((size_t)(o0 * (OH) + y) * (GW) + (GX)) * BATCH;                    \
        const float *ip = in + (size_t)(c * (IH) + y + ky) * (IW) * BATCH;                        \
        for (int j = 0; j < (OW) * NV; j++) {                                                     \
            vf gv[OCB];                                                                           \
            UNROLL for (int o = 0; o < OCB; o++) gv[o] = LD(gp + (size_t)o * (OH) * (GW) * BATCH + j * VW); \
            UNROLL for (int kx = 0; kx < 5; kx++) {                                               \
                const vf iv = LD(ip + kx * BATCH + j * VW);                                       \
                UNROLL for (int o = 0; o < OCB; o++) acc[o][kx] += gv[o] * iv;                    \
            }                                                                                     \
        }                                                                                         \
        UNROLL for (int o = 0; o < OCB; o++)                                                      \
            UNROLL for (int kx = 0; kx < 5; kx++) pp[o * (IC) * 25 + kx] = acc[o][kx];            \
    }                                                                                             \
    static void NAME(const float *restrict in, const float *restrict g, vf *restrict pw, int u0, int u1, \
                     int y0, int y1)                                                              \
    {                                                                                             \
        for (int y = y0; y < y1; y++)                                                             \
            for (int b0 = u0 / ((IC) * 5); b0 * (IC) * 5 < u1; b0 += (OG)) /* OG map blocks */    \
                for (int r = 0; r < (IC) * 5; r++) /* (c, ky): its input row once per group */    \
                    for (int u = b0 * (IC) * 5 + r; u < (b0 + (OG)) * (IC) * 5; u += (IC) * 5)    \
                        if (u >= u0 && u < u1)                                                    \
                            NAME##_unit(in, g, pw, u, y);                                         \
    }                                                                                             \
    /* gw += the lane sums of units [u0, u1)' partials, which are reset to 0 */                  \
    static void NAME##_finish(vf *restrict pw, float *restrict gw, int u0, int u1)                \
    {                                                                                             \
        for (int u = u0; u < u1; u++) {                                                           \
            const int o0 = u / ((IC) * 5) * (OCB), c = u % ((IC) * 5) / 5, ky = u % 5;            \
            for (int o = o0; o < o0 + (OCB); o++)                                                 \
                for (int kx = 0; kx < 5; kx++) {                                                  \
                    const int i = ((o * (IC) + c) * 5 + ky) * 5 + kx;                             \
                    gw[i] += hsum(pw[i]);                                                         \
                    pw[i] = splat(0.f);                                                           \
                }                                                                                 \
        }                                                                                         \
    }

CONV_WGRAD(conv1_wgrad, 1, C1, XP, XP, H1, H1, H1, 0, WG1_OCB, 1)
CONV_WGRAD(conv2_wgrad, C1, C2, Q1, Q1, H2, H2, H2, 0, WG2_OCB, WG2_OG)
