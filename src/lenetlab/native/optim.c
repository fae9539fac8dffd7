/* optim.c: one concern, the optimisers' updates with torch's arithmetic. */

/* ------------------------------------------------------------------------------------------
 * Optimisers, with torch's arithmetic (torch.optim.Adam/AdamW fused, SGD single-tensor), on a
 * thread's range of one slot's elements, zeroing the gradient as they read it. Adam's step
 * count is the slot's, already advanced.
 * ------------------------------------------------------------------------------------------ */
/* 0.0f, hidden from the optimiser: GCC moves a loop's stores of a constant zero into a memset
 * after the loop (loop distribution), which then misses the lines the loop had in cache. */
static inline float hidden_zero(void)
{
    int32_t bits = 0;
    float z;
    OPAQUE(bits);
    memcpy(&z, &bits, sizeof z);
    return z;
}

static void adam_update(float *restrict p, float *restrict g, float *restrict m, float *restrict v, int n,
                        float step, int decoupled, double lr, double b1, double b2, double eps, double wd)
{
    const double bc1 = 1.0 - pow(b1, step), bc2_sqrt = sqrt(1.0 - pow(b2, step));
    const float step_size = (float)(lr / bc1), bc2s = (float)bc2_sqrt, fe = (float)eps;
    const float w1 = (float)(1.0 - b1), fb2 = (float)b2, w2 = (float)(1.0 - b2), fwd = (float)wd;
    const float shrink = (float)(1.0 - lr * wd), zero = hidden_zero();
    for (int i = 0; i < n; i++) {
        float gi = g[i], pi = p[i];
        g[i] = zero;
        if (decoupled)
            pi *= shrink;
        else
            gi += pi * fwd;
        const float mi = m[i] + w1 * (gi - m[i]);
        const float vi_ = v[i] * fb2 + w2 * gi * gi;
        m[i] = mi;
        v[i] = vi_;
        p[i] = pi - step_size * mi / (sqrtf(vi_) / bc2s + fe);
    }
}

/* A new momentum buffer is zero: 0 * momentum + d is d exactly, torch's first-step clone. */
static void sgd_update(float *restrict p, float *restrict g, float *restrict buf, int n,
                       double lr, double momentum, double wd)
{
    const float flr = (float)lr, fm = (float)momentum, fwd = (float)wd, zero = hidden_zero();
    for (int i = 0; i < n; i++) {
        float d = g[i] + p[i] * fwd;
        g[i] = zero;
        if (buf) {
            d = buf[i] * fm + d;
            buf[i] = d;
        }
        p[i] -= flr * d;
    }
}
