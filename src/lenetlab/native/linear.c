/* linear.c: one concern, the linear layers' kernels: forward, input gradient, weight and bias
 * gradients. */

/* ------------------------------------------------------------------------------------------
 * Linear layers. LINEAR: out[o][b] = bias[o] + sum over k < K of w[o*so + k*sk] * in[k][b]
 * for the outputs o in [o0, o1) (a thread's share; whole register tiles): the forward with
 * (so, sk) = (K, 1), and with (1, O_fwd) and no bias the input gradient (the transposed weight
 * read in place). LINEAR_WGRAD: dw[o][i] += sum over b of g[o][b] in[i][b], rows [o0, o1).
 * ------------------------------------------------------------------------------------------ */
#define LINEAR(NAME, OB, VB)                                                                      \
    static void NAME(const float *restrict in, const float *restrict w, const float *restrict bias, \
                     float *restrict out, int o_lo, int o_hi, int K, int so, int sk)               \
    {                                                                                             \
        for (int o0 = o_lo; o0 < o_hi; o0 += OB)                                                  \
            for (int v0 = 0; v0 < NV; v0 += VB) {                                                 \
                const float *wp = w + (size_t)o0 * so;                                            \
                OPAQUE(wp);                                                                       \
                vf acc[OB][VB];                                                                   \
                UNROLL for (int o = 0; o < OB; o++) {                                             \
                    const vf b = splat(bias ? bias[o0 + o] : 0.f);                                \
                    UNROLL for (int v = 0; v < VB; v++) acc[o][v] = b;                            \
                }                                                                                 \
                for (int k = 0; k < K; k++) {                                                     \
                    vf iv[VB];                                                                    \
                    UNROLL for (int v = 0; v < VB; v++) iv[v] = LD(in + (size_t)k * BATCH + (v0 + v) * VW); \
                    UNROLL for (int o = 0; o < OB; o++) {                                         \
                        const vf wv = splat(wp[o * so + k * sk]);                                 \
                        UNROLL for (int v = 0; v < VB; v++) acc[o][v] += wv * iv[v];              \
                    }                                                                             \
                }                                                                                 \
                UNROLL for (int o = 0; o < OB; o++)                                               \
                    UNROLL for (int v = 0; v < VB; v++)                                           \
                        ST(out + (size_t)(o0 + o) * BATCH + (v0 + v) * VW, acc[o][v]);            \
            }                                                                                     \
    }

LINEAR(linear_fwd, LIN_OB, LIN_VB)     /* fc1 (120 outputs), fc2 (84) */
LINEAR(linear_fwd10, 5, LIN_VB)        /* fc3 (10) */
LINEAR(linear_bwd_input, LINI_OB, LIN_VB)       /* 400 and 120 inputs */
LINEAR(linear_bwd_input84, LINI84_OB, LIN_VB) /* 84 */

#define LINEAR_WGRAD(NAME, OB, IB)                                                                \
    static void NAME(const float *restrict g, const float *restrict in, float *restrict dw, int o_lo, int o_hi, \
                     int I)                                                                       \
    {                                                                                             \
        for (int o0 = o_lo; o0 < o_hi; o0 += OB)                                                  \
            for (int i0 = 0; i0 < I; i0 += IB) {                                                  \
                vf acc[OB][IB];                                                                   \
                UNROLL for (int o = 0; o < OB; o++)                                               \
                    UNROLL for (int i = 0; i < IB; i++) acc[o][i] = splat(0.f);                   \
                for (int v = 0; v < NV; v++) {                                                    \
                    vf gv[OB], iv[IB];                                                            \
                    UNROLL for (int o = 0; o < OB; o++) gv[o] = LD(g + (size_t)(o0 + o) * BATCH + v * VW); \
                    UNROLL for (int i = 0; i < IB; i++) iv[i] = LD(in + (size_t)(i0 + i) * BATCH + v * VW); \
                    UNROLL for (int o = 0; o < OB; o++)                                           \
                        UNROLL for (int i = 0; i < IB; i++) acc[o][i] += gv[o] * iv[i];           \
                }                                                                                 \
                UNROLL for (int o = 0; o < OB; o++)                                               \
                    UNROLL for (int i = 0; i < IB; i++) dw[(size_t)(o0 + o) * I + i0 + i] += hsum(acc[o][i]); \
            }                                                                                     \
    }

#if !F1_FITS_VECTORS
LINEAR_WGRAD(linear_wgrad, LWG_OB, LWG_IB) /* fc2 (84 x 120) at 512 bits */
#endif
LINEAR_WGRAD(linear_wgrad10, 2, LWG_IB)    /* fc3 (10 x 84) */

/* fc1's and fc2's weight gradients, dw[o][i] += sum over b < nb of g[o][b] * inT[b][i] (rows
 * [o_lo, o_hi)), with
 * i along the vectors: no horizontal sums, at the price of transposing the input to [64][I]
 * first (classifier backward 367 -> 247 us on Zen 3 for fc1 against LINEAR_WGRAD's per-weight
 * reductions). IV vectors of i per tile: I must be a multiple of IV * VW (400 floats are 25,
 * 50 or 100 vectors; 120 are 15 or 30, so fc2 keeps LINEAR_WGRAD at 512 bits). */
#define LINEAR_WGRAD_T(NAME, O, I, OB, IV)                                                        \
    static void NAME(const float *restrict g, const float *restrict inT, float *restrict dw, int nb, \
                     int o_lo, int o_hi)                                                          \
    {                                                                                             \
        _Static_assert((O) % (OB) == 0 && (I) % ((IV) * VW) == 0, "tile must divide the layer");  \
        for (int i0 = 0; i0 < (I); i0 += (IV) * VW) /* inT's columns i0.. in cache for every o */ \
            for (int o0 = o_lo; o0 < o_hi; o0 += (OB)) {                                          \
                vf acc[OB][IV];                                                                   \
                UNROLL for (int o = 0; o < (OB); o++)                                             \
                    UNROLL for (int j = 0; j < (IV); j++) acc[o][j] = splat(0.f);                 \
                for (int b = 0; b < nb; b++) {                                                    \
                    vf iv[IV];                                                                    \
                    UNROLL for (int j = 0; j < (IV); j++) iv[j] = LD(inT + b * (I) + i0 + j * VW); \
                    UNROLL for (int o = 0; o < (OB); o++) {                                       \
                        const vf gv = splat(g[(o0 + o) * BATCH + b]);                             \
                        UNROLL for (int j = 0; j < (IV); j++) acc[o][j] += gv * iv[j];            \
                    }                                                                             \
                }                                                                                 \
                UNROLL for (int o = 0; o < (OB); o++)                                             \
                    UNROLL for (int j = 0; j < (IV); j++) {                                       \
                        float *d = dw + (o0 + o) * (I) + i0 + j * VW;                             \
                        ST(d, LD(d) + acc[o][j]);                                                 \
                    }                                                                             \
            }                                                                                     \
    }

LINEAR_WGRAD_T(fc1_wgrad, F1, FEAT, LWT_OB, 5)
#if F1_FITS_VECTORS
LINEAR_WGRAD_T(fc2_wgrad, F2, F1, LWT2_OB, 5)
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
