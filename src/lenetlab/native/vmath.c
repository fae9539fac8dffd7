/* vmath.c: one concern, exp and tanh on vectors (several independent chains at once). */

/* exp with Cody-Waite reduction and Cephes' degree-6 polynomial: relative error < 1e-7 on
 * [-87, 88]; inputs are clamped to the range whose result is a normal float. In place on n
 * vectors at once, stage by stage: one exp is a chain of ~15 dependent operations, and
 * interleaving 4 chains about tripled tanh's rate (docs/native.md: a single chain left the
 * out-of-order window short of independent work). */

INLINE void vexp_n(vf *restrict x, int n)
{
    vf t[n], r[n], p[n];
    vi scale[n];
    UNROLL for (int i = 0; i < n; i++) {
        x[i] = vmax(vmin(x[i], splat(88.3762626647949f)), splat(-87.3365478515625f));
        t[i] = x[i] * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23: rounds to an integer */
    }
    UNROLL for (int i = 0; i < n; i++) {
        const vf k = t[i] - 12582912.0f;
        scale[i] = ((vi)t[i] - 0x4B400000 + 127) << 23;
        r[i] = x[i] - k * 0.693359375f;
        r[i] = r[i] - k * -2.12194440e-4f;
        p[i] = r[i] * 1.9875691500e-4f + 1.3981999507e-3f;
    }
    UNROLL for (int i = 0; i < n; i++) p[i] = p[i] * r[i] + 8.3334519073e-3f;
    UNROLL for (int i = 0; i < n; i++) p[i] = p[i] * r[i] + 4.1665795894e-2f;
    UNROLL for (int i = 0; i < n; i++) p[i] = p[i] * r[i] + 1.6666665459e-1f;
    UNROLL for (int i = 0; i < n; i++) p[i] = p[i] * r[i] + 5.0000001201e-1f;
    UNROLL for (int i = 0; i < n; i++) x[i] = (p[i] * (r[i] * r[i]) + r[i] + 1.0f) * (vf)scale[i];
}

/* tanh(x) = (e - 1) / (e + 1) with e = exp(2x) = 2^k y, y = exp(2r): written as
 * (y - 2^-k) / (y + 2^-k), x clamped to [-9, 9] (tanh(9) rounds to 1). vexp_n's reduction
 * and polynomial folded in: the reduction constants halved (2x = k ln2 + 2r) and Cephes'
 * coefficients scaled by powers of two (both exact), one Horner chain for exp(2r), and 2^-k
 * built in the integer unit: 10 multiply-class operations per vector (the FMA pipes are the
 * limit) against 17 for exp-then-divide, and no second clamp. Max |error| against tanhf:
 * 1.3e-7 (the test's bound is 2e-7). In place on n vectors at once, stage by stage
 * (independent chains for the out-of-order window). */
INLINE void vtanh_n(vf *restrict x, int n)
{
    vf t[n], r[n], p[n], s[n];
    UNROLL for (int i = 0; i < n; i++) {
        x[i] = vmax(vmin(x[i], splat(9.f)), splat(-9.f));
        t[i] = x[i] * 2.88539008177792682f + 12582912.0f; /* 2x / ln2 + 1.5 * 2^23: rounds k */
    }
    UNROLL for (int i = 0; i < n; i++) {
        const vf k = t[i] - 12582912.0f;
        s[i] = (vf)((0x4B400000 - (vi)t[i] + 127) << 23); /* 2^-k */
        r[i] = x[i] - k * 0.3466796875f;                   /* r = x - k ln2 / 2 */
        r[i] = r[i] - k * -1.06097220e-4f;
        p[i] = r[i] * 2.544088512e-2f + 8.94847968448e-2f; /* Cephes' expf coefficients times 2^(j+2) */
    }
    UNROLL for (int i = 0; i < n; i++) p[i] = p[i] * r[i] + 2.666704610336e-1f;
    UNROLL for (int i = 0; i < n; i++) p[i] = p[i] * r[i] + 6.66652734304e-1f;
    UNROLL for (int i = 0; i < n; i++) p[i] = p[i] * r[i] + 1.33333323672f;
    UNROLL for (int i = 0; i < n; i++) p[i] = p[i] * r[i] + 2.00000004804f;
    UNROLL for (int i = 0; i < n; i++) p[i] = p[i] * r[i] + 2.0f;
    UNROLL for (int i = 0; i < n; i++) p[i] = p[i] * r[i] + 1.0f; /* y = exp(2r) */
    UNROLL for (int i = 0; i < n; i++) x[i] = (p[i] - s[i]) / (p[i] + s[i]);
}
