/* activation.c: one concern, tanh or ReLU and their gradients on whole buffers. */

/* ReLU as max(0, t): maxps returns its second operand when either is NaN, so a NaN stays NaN
 * (as in torch's relu) instead of becoming 0. */
static inline vf vrelu(vf t) { return vmax(splat(0.f), t); }

/* The gradient g at an activation whose output is t, through the activation: tanh's 1 - t^2, or
 * ReLU's threshold_backward (0 where t <= 0, g elsewhere; t is ReLU's output). */
INLINE vf act_grad(vf g, vf t, const int relu)
{
    return relu ? vsel(t <= splat(0.f), splat(0.f), g) : g * (1.0f - t * t);
}

/* a = act(a) in place, n a multiple of 4 vectors */
static void act_inplace(float *restrict a, int n, int relu)
{
    if (relu) {
        for (int i = 0; i < n; i += VW)
            ST(a + i, vrelu(LD(a + i)));
        return;
    }
    for (int i = 0; i < n; i += 4 * VW) {
        vf t[4];
        UNROLL for (int j = 0; j < 4; j++) t[j] = LD(a + i + j * VW);
        vtanh_n(t, 4);
        UNROLL for (int j = 0; j < 4; j++) ST(a + i + j * VW, t[j]);
    }
}

/* d = act'(a) d in place over n floats, times scale (the dropout scale) where given. */
INLINE void act_bwd_body(float *restrict d, const float *restrict a, const float *restrict scale, int n,
                         const int relu)
{
    for (int i = 0; i < n; i += VW) {
        vf g = act_grad(LD(d + i), LD(a + i), relu);
        if (scale)
            g *= LD(scale + i);
        ST(d + i, g);
    }
}

static void act_bwd(float *restrict d, const float *restrict a, const float *restrict scale, int n, int relu)
{
    if (relu)
        act_bwd_body(d, a, scale, n, 1);
    else
        act_bwd_body(d, a, scale, n, 0);
}
