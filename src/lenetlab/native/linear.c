/* linear.c: one concern, the linear layers' kernels: forward, input gradient, weight and bias
 * gradients.
 *
 * Each kernel is an always-inline body (linear_rows, linear_wgrad_rows, linear_wgrad_t_rows)
 * called with its register tile as constants by one named function per use: the compiler
 * specialises each body for its tile, as it did for the macros these replaced. */

/* ------------------------------------------------------------------------------------------
 * linear_rows: out[o][b] = bias[o] + sum over k < K of w[o*so + k*sk] * in[k][b] for the
 * outputs o in [o_lo, o_hi) (a thread's share; whole register tiles of ob outputs x vb batch
 * vectors): the forward with (so, sk) = (K, 1), and with (1, O_fwd) and no bias the input
 * gradient (the transposed weight read in place).
 * ------------------------------------------------------------------------------------------ */
INLINE void linear_rows(const float *restrict in, const float *restrict w, const float *restrict bias,
                        float *restrict out, int o_lo, int o_hi, int K, int so, int sk, const int ob, const int vb)
{
    for (int o0 = o_lo; o0 < o_hi; o0 += ob)
        for (int v0 = 0; v0 < NV; v0 += vb) {
            const float *wp = w + (size_t)o0 * so;
            OPAQUE(wp);
            vf acc[TILE_MAX_O][TILE_MAX_V]; /* ob x vb of them used */
            UNROLL for (int o = 0; o < ob; o++) {
                const vf b = splat(bias ? bias[o0 + o] : 0.f);
                UNROLL for (int v = 0; v < vb; v++) acc[o][v] = b;
            }
            for (int k = 0; k < K; k++) {
                vf iv[TILE_MAX_V];
                UNROLL for (int v = 0; v < vb; v++) iv[v] = LD(in + (size_t)k * BATCH + (v0 + v) * VW);
                UNROLL for (int o = 0; o < ob; o++) {
                    const vf wv = splat(wp[o * so + k * sk]);
                    UNROLL for (int v = 0; v < vb; v++) acc[o][v] += wv * iv[v];
                }
            }
            UNROLL for (int o = 0; o < ob; o++)
                UNROLL for (int v = 0; v < vb; v++)
                    ST(out + (size_t)(o0 + o) * BATCH + (v0 + v) * VW, acc[o][v]);
        }
}

/* fc1 and fc2 forward: in [K][64] -> out [120 or 84][64], outputs [o_lo, o_hi) */
static void linear_fwd(const float *restrict in, const float *restrict w, const float *restrict bias,
                       float *restrict out, int o_lo, int o_hi, int K, int so, int sk)
{
    linear_rows(in, w, bias, out, o_lo, o_hi, K, so, sk, LIN_OB, LIN_VB);
}

/* fc3 forward: a4 [84][64] -> logits [10][64] */
static void linear_fwd10(const float *restrict in, const float *restrict w, const float *restrict bias,
                         float *restrict out, int o_lo, int o_hi, int K, int so, int sk)
{
    linear_rows(in, w, bias, out, o_lo, o_hi, K, so, sk, 5, LIN_VB);
}

/* fc1's and fc2's input gradients: g [120 or 84][64] -> [400 or 120][64] (transposed weights) */
static void linear_bwd_input(const float *restrict in, const float *restrict w, const float *restrict bias,
                             float *restrict out, int o_lo, int o_hi, int K, int so, int sk)
{
    linear_rows(in, w, bias, out, o_lo, o_hi, K, so, sk, LINI_OB, LIN_VB);
}

/* fc3's input gradient: dlogits [10][64] -> da4 [84][64] (transposed weights) */
static void linear_bwd_input84(const float *restrict in, const float *restrict w, const float *restrict bias,
                               float *restrict out, int o_lo, int o_hi, int K, int so, int sk)
{
    linear_rows(in, w, bias, out, o_lo, o_hi, K, so, sk, LINI84_OB, LIN_VB);
}

/* linear_wgrad_rows: dw[o][i] += sum over b of g[o][b] in[i][b], rows [o_lo, o_hi), in register
 * tiles of ob rows x ib inputs, each weight's sum reduced across the lanes at the end. */
INLINE void linear_wgrad_rows(const float *restrict g, const float *restrict in, float *restrict dw, int o_lo,
                              int o_hi, int I, const int ob, const int ib)
{
    for (int o0 = o_lo; o0 < o_hi; o0 += ob)
        for (int i0 = 0; i0 < I; i0 += ib) {
            vf acc[TILE_MAX_O][TILE_MAX_V]; /* ob x ib of them used */
            UNROLL for (int o = 0; o < ob; o++)
                UNROLL for (int i = 0; i < ib; i++) acc[o][i] = splat(0.f);
            for (int v = 0; v < NV; v++) {
                vf gv[TILE_MAX_O], iv[TILE_MAX_V];
                UNROLL for (int o = 0; o < ob; o++) gv[o] = LD(g + (size_t)(o0 + o) * BATCH + v * VW);
                UNROLL for (int i = 0; i < ib; i++) iv[i] = LD(in + (size_t)(i0 + i) * BATCH + v * VW);
                UNROLL for (int o = 0; o < ob; o++)
                    UNROLL for (int i = 0; i < ib; i++) acc[o][i] += gv[o] * iv[i];
            }
            UNROLL for (int o = 0; o < ob; o++)
                UNROLL for (int i = 0; i < ib; i++) dw[(size_t)(o0 + o) * I + i0 + i] += hsum(acc[o][i]);
        }
}

#if !F1_FITS_VECTORS
/* fc2's weight gradient at 512 bits: dw [84][120] += da4 [84][64] . a3 [120][64] */
static void linear_wgrad(const float *restrict g, const float *restrict in, float *restrict dw, int o_lo, int o_hi,
                         int I)
{
    linear_wgrad_rows(g, in, dw, o_lo, o_hi, I, LWG_OB, LWG_IB);
}
#endif

/* fc3's weight gradient: dw [10][84] += dlogits [10][64] . a4 [84][64] */
static void linear_wgrad10(const float *restrict g, const float *restrict in, float *restrict dw, int o_lo,
                           int o_hi, int I)
{
    linear_wgrad_rows(g, in, dw, o_lo, o_hi, I, 2, LWG_IB);
}

/* linear_wgrad_t_rows: fc1's and fc2's weight gradients, dw[o][i] += sum over b < nb of
 * g[o][b] * inT[b][i] (rows [o_lo, o_hi) of O), with i along the vectors: no horizontal sums,
 * at the price of transposing the input to [64][I] first (cheaper than linear_wgrad_rows'
 * per-weight reductions for fc1: docs/native.md). iv vectors of i per tile: I must be a
 * multiple of iv * VW (400 floats are 25, 50 or 100 vectors; 120 are 15 or 30, so fc2 keeps
 * linear_wgrad_rows at 512 bits). */
INLINE void linear_wgrad_t_rows(const float *restrict g, const float *restrict inT, float *restrict dw, int nb,
                                int o_lo, int o_hi, const int I, const int ob, const int iv)
{
    for (int i0 = 0; i0 < I; i0 += iv * VW) /* inT's columns i0.. in cache for every o */
        for (int o0 = o_lo; o0 < o_hi; o0 += ob) {
            vf acc[TILE_MAX_O][5]; /* ob x iv of them used */
            UNROLL for (int o = 0; o < ob; o++)
                UNROLL for (int j = 0; j < iv; j++) acc[o][j] = splat(0.f);
            for (int b = 0; b < nb; b++) {
                vf in[5];
                UNROLL for (int j = 0; j < iv; j++) in[j] = LD(inT + b * I + i0 + j * VW);
                UNROLL for (int o = 0; o < ob; o++) {
                    const vf gv = splat(g[(o0 + o) * BATCH + b]);
                    UNROLL for (int j = 0; j < iv; j++) acc[o][j] += gv * in[j];
                }
            }
            UNROLL for (int o = 0; o < ob; o++)
                UNROLL for (int j = 0; j < iv; j++) {
                    float *d = dw + (o0 + o) * I + i0 + j * VW;
                    ST(d, LD(d) + acc[o][j]);
                }
        }
}

_Static_assert(F1 % LWT_OB == 0 && FEAT % (5 * VW) == 0, "fc1_wgrad's tile must divide the layer");
/* fc1's weight gradient: dw [120][400] += da3 [120][64] . featT [64][400], rows [o_lo, o_hi) */
static void fc1_wgrad(const float *restrict g, const float *restrict inT, float *restrict dw, int nb, int o_lo,
                      int o_hi)
{
    linear_wgrad_t_rows(g, inT, dw, nb, o_lo, o_hi, FEAT, LWT_OB, 5);
}

#if F1_FITS_VECTORS
_Static_assert(F2 % LWT2_OB == 0 && F1 % (5 * VW) == 0, "fc2_wgrad's tile must divide the layer");
/* fc2's weight gradient at 256 bits and below: dw [84][120] += da4 [84][64] . a3T [64][120] */
static void fc2_wgrad(const float *restrict g, const float *restrict inT, float *restrict dw, int nb, int o_lo,
                      int o_hi)
{
    linear_wgrad_t_rows(g, inT, dw, nb, o_lo, o_hi, F1, LWT2_OB, 5);
}
#endif

/* bias gradient: db[o] += sum over the batch of g[o][b] */
static void bias_grad(const float *restrict g, float *restrict db, int O)
{
    for (int o = 0; o < O; o++) {
        vf s = splat(0.f);
        for (int v = 0; v < NV; v++)
            s += LD(g + (size_t)o * BATCH + v * VW);
        db[o] += hsum(s);
    }
}
