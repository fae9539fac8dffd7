/* native_step.c: one concern, the whole LeNet5V1 training step on CPU (forward, cross-entropy
 * with optional label smoothing, backward, optimiser update) and its eval-mode forward,
 * single-threaded, in portable C. Every variant of the model: tanh or ReLU, 2x2 average or max
 * pooling, with or without batch norm and dropout.
 *
 * Layout: every activation and every activation gradient is stored with the batch innermost,
 * [C][H][W][64]: one pixel of one channel is 64 floats (four 512-bit, eight 256-bit or sixteen
 * 128-bit vectors), one image per lane. Then every convolution, both its gradients and the
 * linear layers are vertical FMAs of activation vectors with broadcast weights: no im2col, no
 * transposes, no horizontal work except one reduction per weight gradient. Layer sizes are
 * compile-time constants. A prototype of this layout took 0.85-0.89 ms per batch-64 step on a
 * Zen 5 core with AVX-512 against 4.7-5.9 ms for the PyTorch step; designs that kept PyTorch for
 * part of the step reached only 2.6-4x, which is why everything down to Adam is here. On a
 * Zen 3 core without AVX-512 (256-bit build, FMA peak ~100 GFLOP/s) this file measured
 * 3.1-3.5 ms per step against 13-21 ms for the single-threaded PyTorch step, and after the
 * cheaper tanh, the unpadded conv2 input gradient, fc2's transposed-input weight gradient and
 * the shuffle transpose, 10-12% less than that in A/B runs (benchmarks/step_time.py --baseline,
 * which also prints the per-stage breakdown from a -DLN_PROFILE build).
 *
 * Batches: a batch of B images is split into ceil(B/64) chunks of 64 lanes; the last chunk's
 * unused lanes are zero and masked out of every sum (batch-norm statistics, gradients, loss).
 * Each layer runs over all chunks before the next one, so batch norm sees the whole batch.
 *
 * Vector width comes from the target (GCC/Clang vector extensions; x86 intrinsics only for
 * min/max, with a portable fallback): 64 bytes with AVX-512F, 32 with AVX, 16 otherwise (SSE,
 * NEON). Each width has its own register blocking (see TILES below): a 512-bit-shaped blocking
 * compiled for 16 ymm registers was measured 22x slower (shared/spec/native-notes.md).
 * -DLN_WIDE_TILES builds the 512-bit blocking and code choices at any width, so that a host
 * without AVX-512 runs (slowly) the tile loops an AVX-512 host will run: the tests do.
 *
 * Variants: the activation (tanh or ReLU) and the pooling (average or max) are run-time flags of
 * the entry points. The element-wise stages that depend on them are always-inline bodies taking
 * the flags as constants, instantiated once per combination behind one branch per call: every
 * variant runs its own loops with no per-element test, and tanh with average pooling runs the
 * very code (and arithmetic) it ran before the others existed. On the Zen 3 core ReLU took the
 * forward's element-wise stages from ~320 to ~120 us per batch-64 step (no exp), and max
 * pooling's backward, which finds each block's maximum again, added ~10 us.
 *
 * Alignment: every vector load and store is of the workspace (64-byte aligned). The caller's
 * tensors are read by scalar code or memcpy; native.py still requires the bound ones
 * (parameters, buffers, optimiser state) to start on a vector boundary.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BATCH 64
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
#define VW (VBYTES / 4)   /* floats per vector */
#define NV (BATCH / VW)   /* vectors per pixel */

typedef float vf __attribute__((vector_size(VBYTES)));
typedef int32_t vi __attribute__((vector_size(VBYTES)));

#define LD(p) (*(const vf *)(p))
#define ST(p, v) (*(vf *)(p) = (v))
/* GCC's spelling under both compilers (Clang reads it as "unroll 32"): unroll up to 32 times,
 * which is every trip count here but the edge tiles' kx loops, whose bounds are run-time. Clang's
 * bare "unroll" demands a full unroll and warns (-Wpass-failed) where it cannot do one of them. */
#define UNROLL _Pragma("GCC unroll 32")
/* GCC hoists every loop-invariant weight broadcast out of the pixel loops (150 of them for
 * conv1) and then spills them; hiding the weight pointer from it per tile took conv1 forward
 * from 96 to 220 GFLOP/s in the prototype. */
#define OPAQUE(p) __asm__ volatile("" : "+r"(p))

/* TILES: accumulators per register tile. 32 zmm registers hold 24 accumulators plus operands;
 * 16 ymm/xmm registers hold about 12. -DLN_WIDE_TILES selects the 512-bit blocking at any
 * width (slow there, but it runs every 512-bit tile loop on a host without AVX-512: the tests
 * build it so that the 512-bit blocking is exercised everywhere). */
#if VBYTES == 64 || defined(LN_WIDE_TILES)
#define CONV_VB 4    /* batch vectors per conv tile */
#define CONV1_OCB 6  /* conv1 forward: 6 x 4 = 24 accumulators */
#define CONV2_OCB 4  /* conv2 forward: 16 */
#define CONV2_VB 4
#define CONVI_OCB 6  /* conv2 input gradient (6 output maps): 24 */
#define WG1_OCB 3    /* conv1 weight gradient: 3 x 5 = 15 */
#define WG2_OCB 4    /* conv2 weight gradient: 20 */
#define LIN_VB 4
#define LIN_OB 6     /* linear forward: 24 */
#define LINI_OB 4    /* linear input gradient, 400 and 120 outputs: 16 */
#define LWG_OB 4     /* linear weight gradient: 4 x 4 = 16 */
#define LWT_OB 4     /* fc1 weight gradient, transposed input: 4 x 5 = 20 */
#define LWT2_OB 4    /* fc2's (256 bits and below only): 20 */
#else
#define CONV_VB 2
#define CONV1_OCB 6  /* 12 */
#define CONV2_OCB 8  /* 8 x 1: 8 accumulators, measured 385 us against 4 x 2's 520 */
#define CONV2_VB 1
#define CONVI_OCB 6  /* 12 */
#define WG1_OCB 2    /* 10 */
#define WG2_OCB 2    /* 10 */
#define LIN_VB 2
#define LIN_OB 6     /* 12 */
#define LINI_OB 5    /* 10: measured 82-86 us for fc1's against 4 x 2's 98-115 */
#define LWG_OB 3     /* 12 */
#define LWT_OB 2     /* 10 */
#define LWT2_OB 2    /* 10 */
#endif
#define LWG_IB 4
#define LINI84_OB 4  /* fc3's input gradient (84 outputs) */
/* fc2's input rows (120 floats) in whole 5-vector tiles: 256 bits and below, and not with
 * LN_WIDE_TILES (which takes the 512-bit code path wherever it differs) */
#if defined(LN_WIDE_TILES)
#define F1_FITS_VECTORS 0
#else
#define F1_FITS_VECTORS (120 % (5 * VW) == 0)
#endif

/* Layer sizes. */
enum {
    IMG = 28, IMGPIX = IMG * IMG,
    XP = 32,              /* conv1 input, zero-padded by 2 */
    C1 = 6, H1 = 28, Q1 = 14,
    C2 = 16, H2 = 10, Q2 = 5,
    FEAT = C2 * Q2 * Q2, F1 = 120, F2 = 84, F3 = 10,
};

/* Parameter slots, in LeNet5V1.parameters() order (batch-norm slots NULL when absent). */
enum { P_C1W, P_C1B, P_BN1W, P_BN1B, P_C2W, P_C2B, P_BN2W, P_BN2B,
       P_F1W, P_F1B, P_F2W, P_F2B, P_F3W, P_F3B, NPARAM };
/* Every register tile divides what it tiles, at every width and blocking (the loops assume it). */
_Static_assert(NV % CONV_VB == 0 && NV % CONV2_VB == 0 && NV % LIN_VB == 0, "batch vector tiles");
_Static_assert(C1 % CONV1_OCB == 0 && C2 % CONV2_OCB == 0 && C1 % CONVI_OCB == 0, "conv channel tiles");
_Static_assert(C1 % WG1_OCB == 0 && C2 % WG2_OCB == 0, "conv weight-gradient tiles");
_Static_assert(F1 % LIN_OB == 0 && F2 % LIN_OB == 0 && F3 % 5 == 0, "linear forward tiles");
_Static_assert(FEAT % LINI_OB == 0 && F1 % LINI_OB == 0 && F2 % LINI84_OB == 0, "linear input-gradient tiles");
_Static_assert(FEAT % 8 == 0 && F1 % 8 == 0, "transpose blocks");
_Static_assert(F2 % LWG_OB == 0 && F1 % LWG_IB == 0 && F3 % 2 == 0 && F2 % LWG_IB == 0, "linear wgrad tiles");
static const int PSIZE[NPARAM] = {150, 6, 6, 6, 2400, 16, 16, 16, 48000, 120, 10080, 84, 840, 10};
enum { R_MEAN1, R_VAR1, R_MEAN2, R_VAR2 };
enum { OPT_ADAM, OPT_ADAMW, OPT_SGD };

/* s - 0 folds to s (it is exact for every s, signed zeros included) where s + 0 does not
 * (-0 + 0 is +0): written as a sum, every broadcast cost an extra scalar add. */
static inline vf splat(float s) { return s - (vf){}; }
static inline vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
/* min/max as minps/maxps define them (a < b ? a : b): GCC compiles the portable select to a
 * compare and a blend, two operations where the x86 instruction is one. */
#if defined(__AVX512F__) && VBYTES == 64
#include <immintrin.h>
static inline vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#elif defined(__AVX__) && VBYTES == 32
#include <immintrin.h>
static inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#elif defined(__SSE__) && VBYTES == 16
#include <immintrin.h>
static inline vf vmin(vf a, vf b) { return (vf)_mm_min_ps((__m128)a, (__m128)b); }
static inline vf vmax(vf a, vf b) { return (vf)_mm_max_ps((__m128)a, (__m128)b); }
#else
static inline vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
#endif
typedef float v4f __attribute__((vector_size(16)));
static inline float hsum(vf v)
{
    v4f s;
    memcpy(&s, &v, sizeof s);
    for (int i = 1; i < VW / 4; i++) {
        v4f q;
        memcpy(&q, (const char *)&v + sizeof q * i, sizeof q);
        s += q;
    }
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* exp with Cody-Waite reduction and Cephes' degree-6 polynomial: relative error < 1e-7 on
 * [-87, 88]; inputs are clamped to the range whose result is a normal float. In place on n
 * vectors at once, stage by stage: one exp is a chain of ~15 dependent operations, and
 * interleaving 4 chains took tanh from 18 to ~6 cycles per 256-bit vector on Zen 3 (a single
 * chain left the out-of-order window short of independent work). */
#define INLINE static inline __attribute__((always_inline))
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
 * built in the integer unit: 10 multiply-class operations per vector (FMA pipes: the limit on
 * Zen 3) against 17 for exp-then-divide, and no second clamp. Max |error| against tanhf:
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

/* ------------------------------------------------------------------------------------------
 * Convolutions (5x5, stride 1). CONV: out[o][y][x] = bias[o] + sum over c, ky, kx of
 * w[o][c][ky][kx] * in[c][y + ky - PY][x + kx - PX], input pixels outside [0, IH) x [0, IW)
 * skipped. PY = PX = 0 is a valid convolution (the forward passes); PY = PX = 4 with the
 * flipped, transposed weights is the full convolution that gives conv2's input gradient. Tiles
 * with the whole 5-column window inside the input run with constant kx bounds (fully unrolled);
 * only the edge columns run a kx loop over the columns that exist (the earlier zero-padded
 * input did ~1.4x the needed work: 712 -> 468 us per step in one A/B profile under load).
 * ------------------------------------------------------------------------------------------ */
#define CONV(NAME, IC, OC, IH, IW, OH, OW, PY, PX, OCB, VB)                                       \
    INLINE void NAME##_tile(const float *restrict in, const float *w, const float *restrict bias,   \
                            float *restrict out, int y, int x, int o0, int v0, int k0, int k1,      \
                            int kx0, int kx1)                                                     \
    {                                                                                             \
        const float *wp = w + o0 * (IC) * 25;                                                     \
        OPAQUE(wp);                                                                               \
        vf acc[OCB][VB];                                                                          \
        UNROLL for (int o = 0; o < OCB; o++) {                                                    \
            const vf b = splat(bias ? bias[o0 + o] : 0.f);                                        \
            UNROLL for (int v = 0; v < VB; v++) acc[o][v] = b;                                    \
        }                                                                                         \
        for (int c = 0; c < IC; c++)                                                              \
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
            UNROLL for (int v = 0; v < VB; v++)                                                   \
                ST(out + ((size_t)((o0 + o) * (OH) + y) * (OW) + x) * BATCH + (v0 + v) * VW, acc[o][v]); \
    }                                                                                             \
    static void NAME(const float *restrict in, const float *restrict w, const float *restrict bias, \
                     float *restrict out)                                                         \
    {                                                                                             \
        for (int y = 0; y < OH; y++) {                                                            \
            const int k0 = y < (PY) ? (PY) - y : 0;                                               \
            const int k1 = y + 5 - (PY) > (IH) ? (IH) + (PY) - y : 5;                             \
            for (int x = 0; x < OW; x++) {                                                        \
                const int kx0 = x < (PX) ? (PX) - x : 0;                                          \
                const int kx1 = x + 5 - (PX) > (IW) ? (IW) + (PX) - x : 5;                        \
                for (int o0 = 0; o0 < OC; o0 += OCB)                                              \
                    for (int v0 = 0; v0 < NV; v0 += VB) {                                         \
                        if (kx0 == 0 && kx1 == 5) /* constant bounds: the kx loop unrolls */      \
                            NAME##_tile(in, w, bias, out, y, x, o0, v0, k0, k1, 0, 5);            \
                        else                                                                      \
                            NAME##_tile(in, w, bias, out, y, x, o0, v0, k0, k1, kx0, kx1);        \
                    }                                                                             \
            }                                                                                     \
        }                                                                                         \
    }

CONV(conv1_fwd, 1, C1, XP, XP, H1, H1, 0, 0, CONV1_OCB, CONV_VB)
CONV(conv2_fwd, C1, C2, Q1, Q1, H2, H2, 0, 0, CONV2_OCB, CONV2_VB)
CONV(conv2_bwd_input, C2, C1, H2, H2, Q1, Q1, 4, 4, CONVI_OCB, CONV_VB)

/* CONV_WGRAD: pw[o][c][ky][kx] += g[o][y][x] * in[c][y + ky][x + kx], summed over y and x,
 * lane by lane (pw holds vectors of per-lane partial sums; conv_wgrad_finish reduces them).
 * g is [OC][OH][GW][64] with the map starting at column GX. */
#define CONV_WGRAD(NAME, IC, OC, IH, IW, OH, OW, GW, GX, OCB)                                      \
    static void NAME(const float *restrict in, const float *restrict g, vf *restrict pw)           \
    {                                                                                             \
        for (int y = 0; y < OH; y++)                                                              \
            for (int c = 0; c < IC; c++)                                                          \
                for (int ky = 0; ky < 5; ky++)                                                    \
                    for (int o0 = 0; o0 < OC; o0 += OCB) {                                        \
                        vf *pp = pw + ((o0 * (IC) + c) * 5 + ky) * 5;                             \
                        vf acc[OCB][5];                                                           \
                        UNROLL for (int o = 0; o < OCB; o++)                                      \
                            UNROLL for (int kx = 0; kx < 5; kx++) acc[o][kx] = pp[o * (IC) * 25 + kx]; \
                        const float *gp = g + ((size_t)(o0 * (OH) + y) * (GW) + (GX)) * BATCH;    \
                        const float *ip = in + (size_t)(c * (IH) + y + ky) * (IW) * BATCH;        \
                        for (int j = 0; j < (OW) * NV; j++) {                                     \
                            vf gv[OCB];                                                           \
                            UNROLL for (int o = 0; o < OCB; o++)                                  \
                                gv[o] = LD(gp + (size_t)o * (OH) * (GW) * BATCH + j * VW);        \
                            UNROLL for (int kx = 0; kx < 5; kx++) {                               \
                                const vf iv = LD(ip + kx * BATCH + j * VW);                       \
                                UNROLL for (int o = 0; o < OCB; o++) acc[o][kx] += gv[o] * iv;    \
                            }                                                                     \
                        }                                                                         \
                        UNROLL for (int o = 0; o < OCB; o++)                                      \
                            UNROLL for (int kx = 0; kx < 5; kx++) pp[o * (IC) * 25 + kx] = acc[o][kx]; \
                    }                                                                             \
    }

CONV_WGRAD(conv1_wgrad, 1, C1, XP, XP, H1, H1, H1, 0, WG1_OCB)
CONV_WGRAD(conv2_wgrad, C1, C2, Q1, Q1, H2, H2, H2, 0, WG2_OCB)

static void conv_wgrad_finish(vf *restrict pw, float *restrict gw, int n)
{
    for (int i = 0; i < n; i++) {
        gw[i] += hsum(pw[i]);
        pw[i] = splat(0.f);
    }
}

/* ------------------------------------------------------------------------------------------
 * Linear layers. LINEAR: out[o][b] = bias[o] + sum over k < K of w[o*so + k*sk] * in[k][b]:
 * the forward with (so, sk) = (K, 1), and with (1, O_fwd) and no bias the input gradient
 * (the transposed weight read in place). LINEAR_WGRAD: dw[o][i] += sum over b of g[o][b] in[i][b].
 * ------------------------------------------------------------------------------------------ */
#define LINEAR(NAME, OB, VB)                                                                      \
    static void NAME(const float *restrict in, const float *restrict w, const float *restrict bias, \
                     float *restrict out, int O, int K, int so, int sk)                            \
    {                                                                                             \
        for (int o0 = 0; o0 < O; o0 += OB)                                                        \
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
    static void NAME(const float *restrict g, const float *restrict in, float *restrict dw, int O, int I) \
    {                                                                                             \
        for (int o0 = 0; o0 < O; o0 += OB)                                                        \
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

/* fc1's and fc2's weight gradients, dw[o][i] += sum over b < nb of g[o][b] * inT[b][i], with
 * i along the vectors: no horizontal sums, at the price of transposing the input to [64][I]
 * first (classifier backward 367 -> 247 us on Zen 3 for fc1 against LINEAR_WGRAD's per-weight
 * reductions). IV vectors of i per tile: I must be a multiple of IV * VW (400 floats are 25,
 * 50 or 100 vectors; 120 are 15 or 30, so fc2 keeps LINEAR_WGRAD at 512 bits). */
#define LINEAR_WGRAD_T(NAME, O, I, OB, IV)                                                        \
    static void NAME(const float *restrict g, const float *restrict inT, float *restrict dw, int nb) \
    {                                                                                             \
        _Static_assert((O) % (OB) == 0 && (I) % ((IV) * VW) == 0, "tile must divide the layer");  \
        for (int o0 = 0; o0 < (O); o0 += (OB))                                                    \
            for (int i0 = 0; i0 < (I); i0 += (IV) * VW) {                                        \
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

/* in [R][64] -> out [64][R], R a multiple of 8, in 8 x 8 blocks: with 256-bit vectors eight
 * loads, 24 shuffles and eight stores per block (2.5 us for fc1's 400 rows against 18 us for
 * the element-by-element loop), elsewhere element by element within the block (12 us). */
#if VW == 8
#if defined(__clang__)
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif
static void transpose_rows(const float *restrict in, float *restrict out, int R)
{
    for (int i0 = 0; i0 < R; i0 += 8)
        for (int b0 = 0; b0 < BATCH; b0 += 8) {
            vf r[8], s[8], u[8];
            UNROLL for (int i = 0; i < 8; i++) r[i] = LD(in + (i0 + i) * BATCH + b0);
            UNROLL for (int i = 0; i < 8; i += 2) { /* pairs of rows interleaved, per 128-bit half */
                s[i] = SHUF8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
                s[i + 1] = SHUF8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
            }
            UNROLL for (int i = 0; i < 8; i += 4) /* four rows' column j and j + 4 in u[i + j] */
                UNROLL for (int k = 0; k < 2; k++) {
                    u[i + 2 * k] = SHUF8(s[i + k], s[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
                    u[i + 2 * k + 1] = SHUF8(s[i + k], s[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
                }
            UNROLL for (int j = 0; j < 4; j++) { /* the 128-bit halves of rows 0-3 and 4-7 joined */
                ST(out + (b0 + j) * R + i0, SHUF8(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11));
                ST(out + (b0 + j + 4) * R + i0, SHUF8(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15));
            }
        }
}
#else
static void transpose_rows(const float *restrict in, float *restrict out, int R)
{
    for (int i0 = 0; i0 < R; i0 += 8)
        for (int b0 = 0; b0 < BATCH; b0 += 8) {
            float t[8][8];
            UNROLL for (int i = 0; i < 8; i++)
                UNROLL for (int b = 0; b < 8; b++) t[b][i] = in[(i0 + i) * BATCH + b0 + b];
            UNROLL for (int b = 0; b < 8; b++)
                UNROLL for (int i = 0; i < 8; i++) out[(b0 + b) * R + i0 + i] = t[b][i];
        }
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

/* ------------------------------------------------------------------------------------------
 * Element-wise stages around the convolutions: [batch norm], tanh or ReLU, 2x2 average or max
 * pooling (conv -> [bn] -> activation -> pool, as in the module).
 * ------------------------------------------------------------------------------------------ */

/* The max of a 2x2 block given in row-major order, as torch's CPU max_pool2d scans it: the
 * running max m becomes t only where t > m (vmax(t, m)), so equal values keep the first. */
static inline vf max4(vf t00, vf t01, vf t10, vf t11) { return vmax(t11, vmax(t10, vmax(t01, t00))); }

/* a = act(((z - mean) * istd) * gamma + beta), p = 2x2 mean or max of a. Without batch norm
 * the caller passes mean 0, istd 1, gamma 1, beta 0, which leave z unchanged bit for bit. With
 * store_xhat the normalised z replaces z (the batch-norm backward needs it); a may be NULL
 * (evaluation). The block is visited in the order of model._AvgPool2x2's sum (hence the
 * column-major offsets); the max takes it in torch's row-major order (max4). */
INLINE void act_pool_fwd_body(float *restrict z, float *restrict a, float *restrict p, int C, int H,
                              const float *mean, const float *istd, const float *gamma, const float *beta,
                              int store_xhat, const int relu, const int maxpool)
{
    const int Q = H / 2;
    for (int c = 0; c < C; c++) {
        const vf m = splat(mean[c]), s = splat(istd[c]), g = splat(gamma[c]), b = splat(beta[c]);
        for (int py = 0; py < Q; py++)
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

static void act_pool_fwd(float *restrict z, float *restrict a, float *restrict p, int C, int H,
                         const float *mean, const float *istd, const float *gamma, const float *beta,
                         int store_xhat, int relu, int maxpool)
{
    if (relu && maxpool)
        act_pool_fwd_body(z, a, p, C, H, mean, istd, gamma, beta, store_xhat, 1, 1);
    else if (relu)
        act_pool_fwd_body(z, a, p, C, H, mean, istd, gamma, beta, store_xhat, 1, 0);
    else if (maxpool)
        act_pool_fwd_body(z, a, p, C, H, mean, istd, gamma, beta, store_xhat, 0, 1);
    else
        act_pool_fwd_body(z, a, p, C, H, mean, istd, gamma, beta, store_xhat, 0, 0);
}

/* dz = act'(a) * (the pooling's gradient of dp), dz with rows of DW pixels starting at column
 * DX (dz may be a itself). Average pooling gives each pixel dp[c][y/2][x/2] / 4; max pooling
 * gives all of dp to one pixel of its block, the first maximal one in row-major order (torch's
 * CPU max_pool2d index, ties included: a block of ReLU zeros routes to its top-left), found
 * again from a rather than stored by the forward. Per-channel sums over the batch: s1 += sum dz,
 * and with xhat s2 += sum dz * xhat (the batch-norm backward). Padding lanes have dp = 0, so
 * dz = 0. */
INLINE void act_pool_bwd_body(const float *restrict dp, const float *a, float *dz, int C, int H, int DW, int DX,
                              const float *restrict xhat, double *s1, double *s2, const int relu,
                              const int maxpool)
{
    const int Q = H / 2;
    if (!maxpool) {
        for (int c = 0; c < C; c++)
            for (int y = 0; y < H; y++) {
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
                s1[c] += hsum(r1);
                if (xhat)
                    s2[c] += hsum(r2);
            }
        return;
    }
    /* block by block: a block's four pixels are all read before any is written (dz may be a) */
    for (int c = 0; c < C; c++)
        for (int py = 0; py < Q; py++) {
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
            s1[c] += hsum(r1);
            if (xhat)
                s2[c] += hsum(r2);
        }
}

static void act_pool_bwd(const float *restrict dp, const float *a, float *dz, int C, int H, int DW, int DX,
                         const float *restrict xhat, double *s1, double *s2, int relu, int maxpool)
{
    if (relu && maxpool)
        act_pool_bwd_body(dp, a, dz, C, H, DW, DX, xhat, s1, s2, 1, 1);
    else if (relu)
        act_pool_bwd_body(dp, a, dz, C, H, DW, DX, xhat, s1, s2, 1, 0);
    else if (maxpool)
        act_pool_bwd_body(dp, a, dz, C, H, DW, DX, xhat, s1, s2, 0, 1);
    else
        act_pool_bwd_body(dp, a, dz, C, H, DW, DX, xhat, s1, s2, 0, 0);
}

/* Batch-norm backward, second pass: dz = k * (dy - mdy - xhat * mdyx) on the batch's lanes,
 * 0 on the padding lanes; db += sum dz (the gradient of the conv bias under the batch norm). */
static void bn_bwd(float *restrict dz, const float *restrict xhat, int C, int H, int DW, int DX,
                   const float *k, const float *mdy, const float *mdyx, const float *mask, float *db)
{
    for (int c = 0; c < C; c++) {
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

/* ------------------------------------------------------------------------------------------
 * Workspace: per-chunk activation buffers, gradients, and the conv weight-gradient partials.
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    float *x;          /* [1][32][32][64] padded input */
    float *z1;         /* [6][28][28][64] conv1 output; with batch norm, normalised in place */
    float *a1;         /* [6][28][28][64] activation; in the backward, the gradient w.r.t. conv1 output */
    float *p1, *dp1;   /* [6][14][14][64] */
    float *z2, *a2;    /* [16][10][10][64] */
    float *dz2;        /* [16][10][10][64] gradient w.r.t. conv2 output */
    float *p2, *dp2;   /* [400][64] */
    float *drop;       /* [120][64] dropout scale */
    float *a3, *da3;   /* [120][64] */
    float *a4, *da4;   /* [84][64] */
    float *lg, *dlg;   /* [10][64] */
    float *mask;       /* [64]: 1 on lanes in use, 0 on padding */
    int n;             /* lanes in use */
} chunk;

static const size_t CHUNK_FLOATS[] = {
    XP * XP, C1 * H1 * H1, C1 * H1 * H1, C1 * Q1 * Q1, C1 * Q1 * Q1, C2 * H2 * H2, C2 * H2 * H2,
    C2 * H2 * H2, FEAT, FEAT, F1, F1, F1, F2, F2, F3, F3, 1};
#define NBUF (sizeof(CHUNK_FLOATS) / sizeof(CHUNK_FLOATS[0]))

typedef struct {
    int cap;
    chunk *ch;
    float **mem;       /* one allocation per chunk */
    float *stage;      /* [64][784]: a chunk's rows, copied before the transpose */
    float *grad;       /* gradients, each slot at GOFF */
    vf *pw1, *pw2;     /* conv weight-gradient partials */
    float *w2t;        /* conv2 weights flipped and transposed: [6][16][5][5] */
    float *featT;      /* [64][400]: fc1's (and fc2's) input transposed, for its weight gradient */
} ln_ws;

static void *zalloc(size_t bytes)
{
    bytes = (bytes + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, bytes);
    if (p)
        memset(p, 0, bytes);
    return p;
}

static int goff(int slot)
{
    int off = 0;
    for (int s = 0; s < slot; s++)
        off += (PSIZE[s] + 15) & ~15;
    return off;
}

void ln_ws_free(ln_ws *ws)
{
    if (!ws)
        return;
    for (int i = 0; i < ws->cap; i++)
        free(ws->mem[i]);
    free(ws->mem);
    free(ws->ch);
    free(ws->stage);
    free(ws->grad);
    free(ws->pw1);
    free(ws->pw2);
    free(ws->w2t);
    free(ws->featT);
    free(ws);
}

ln_ws *ln_ws_new(void)
{
    ln_ws *ws = calloc(1, sizeof *ws);
    if (!ws)
        return NULL;
    ws->stage = zalloc(sizeof(float) * BATCH * IMGPIX);
    ws->grad = zalloc(sizeof(float) * goff(NPARAM));
    ws->pw1 = zalloc(sizeof(vf) * C1 * 25);
    ws->pw2 = zalloc(sizeof(vf) * C2 * C1 * 25);
    ws->w2t = zalloc(sizeof(float) * C2 * C1 * 25);
    ws->featT = zalloc(sizeof(float) * BATCH * FEAT);
    if (!ws->stage || !ws->grad || !ws->pw1 || !ws->pw2 || !ws->w2t || !ws->featT) {
        ln_ws_free(ws);
        return NULL;
    }
    return ws;
}

static int ws_reserve(ln_ws *ws, int chunks)
{
    if (chunks <= ws->cap)
        return 0;
    chunk *ch = realloc(ws->ch, sizeof(chunk) * chunks);
    if (!ch)
        return -1;
    ws->ch = ch;
    float **mem = realloc(ws->mem, sizeof(float *) * chunks);
    if (!mem)
        return -1;
    ws->mem = mem;
    size_t total = 0;
    for (size_t i = 0; i < NBUF; i++)
        total += CHUNK_FLOATS[i] * BATCH;
    for (int k = ws->cap; k < chunks; k++) {
        float *m = zalloc(sizeof(float) * total); /* zero: the padding rows and columns stay 0 */
        if (!m)
            return -1;
        ws->mem[k] = m;
        float **dst[] = {&ch[k].x, &ch[k].z1, &ch[k].a1, &ch[k].p1, &ch[k].dp1, &ch[k].z2, &ch[k].a2,
                         &ch[k].dz2, &ch[k].p2, &ch[k].dp2, &ch[k].drop, &ch[k].a3, &ch[k].da3,
                         &ch[k].a4, &ch[k].da4, &ch[k].lg, &ch[k].dlg, &ch[k].mask};
        for (size_t i = 0; i < NBUF; i++) {
            *dst[i] = m;
            m += CHUNK_FLOATS[i] * BATCH;
        }
        ws->cap = k + 1;
    }
    return 0;
}

static void set_lanes(chunk *c, int n)
{
    c->n = n;
    for (int b = 0; b < BATCH; b++)
        c->mask[b] = b < n ? 1.f : 0.f;
}

/* A batch's augmentation, drawn in Python (augment.py): image i of the batch takes move[i], the
 * row of augment._moves' table (shift dy, dx in -pad..pad, then mirrored or not, in that order),
 * filling what comes from outside the image with background; with erasing, it is multiplied by
 * 1 - rows[i][y] cols[i][x]. The same float arithmetic as EpochDraws.apply, so both paths see
 * bit-identical images (a test holds them so). Done row by row while pack_input copies the
 * image anyway: measured per image (gcc 12, Zen 3), 0.3 us this way, 1.1 us gathering through
 * the 784-entry table, 0.13 us for the plain copy; an epoch's 54,000 images add about 10 ms. */
typedef struct {
    const int64_t *move;       /* NULL: no translation or flip */
    int pad;                   /* the largest shift, pixels */
    const float *rows, *cols;  /* NULL: no erasing */
    float background;
} augment_t;

static void fill(float *d, int n, float v)
{
    for (int i = 0; i < n; i++)
        d[i] = v;
}

static void augment_image(const augment_t *aug, int64_t i, const float *s, float *restrict d)
{
    if (aug->move) {
        const int side = 2 * aug->pad + 1;
        const int k = (int)aug->move[i], mirrored = k >= side * side;
        const int dy = k % (side * side) / side - aug->pad, dx = k % side - aug->pad;
        const float bg = aug->background;
        for (int y = 0; y < IMG; y++, d += IMG) {
            if (y + dy < 0 || y + dy >= IMG) {
                fill(d, IMG, bg);
                continue;
            }
            const float *r = s + (y + dy) * IMG;
            if (!mirrored) {  /* d[x] = r[x + dx] where 0 <= x + dx < IMG */
                const int lo = dx < 0 ? -dx : 0, hi = dx > 0 ? IMG - dx : IMG;
                fill(d, lo, bg);
                memcpy(d + lo, r + lo + dx, sizeof(float) * (hi - lo));
                fill(d + hi, IMG - hi, bg);
            } else {  /* d[x] = r[IMG - 1 - x + dx] where that is inside */
                const int lo = dx > 0 ? dx : 0, hi = dx < 0 ? IMG + dx : IMG;
                fill(d, lo, bg);
                for (int x = lo; x < hi; x++)
                    d[x] = r[IMG - 1 - x + dx];
                fill(d + hi, IMG - hi, bg);
            }
        }
        d -= IMGPIX;
    } else {
        memcpy(d, s, sizeof(float) * IMGPIX);
    }
    if (aug->rows) {
        const float *r = aug->rows + i * IMG, *q = aug->cols + i * IMG;
        for (int y = 0; y < IMG; y++)
            if (r[y] != 0.f)  /* else the factor is exactly 1 */
                for (int x = 0; x < IMG; x++)
                    d[y * IMG + x] *= 1.0f - r[y] * q[x];
    }
}

/* The chunk's images into the padded [32][32][64] input: the rows are copied first and then
 * transposed (the prototype measured 123 -> 44 us for this order against transposing while
 * gathering). Padding lanes are zero. */
static void pack_input(chunk *c, float *restrict stage, const float *src, const int64_t *idx, int64_t first,
                       const augment_t *aug)
{
    for (int b = 0; b < BATCH; b++) {
        float *d = stage + b * IMGPIX;
        if (b >= c->n) {
            memset(d, 0, sizeof(float) * IMGPIX);
            continue;
        }
        const float *s = src + (idx ? idx[first + b] : first + b) * IMGPIX;
        if (aug && (aug->move || aug->rows))
            augment_image(aug, first + b, s, d);
        else
            memcpy(d, s, sizeof(float) * IMGPIX);
    }
    for (int y = 0; y < IMG; y++)
        for (int b = 0; b < BATCH; b++) {
            const float *s = stage + b * IMGPIX + y * IMG;
            float *d = c->x + ((size_t)(y + 2) * XP + 2) * BATCH + b;
            for (int x = 0; x < IMG; x++)
                d[x * BATCH] = s[x];
        }
}

/* Forward from the pooled conv2 maps to the logits; the dropout scale (if any) multiplies the
 * fc1 output before its activation, as in fast_forward. */
static void classifier_fwd(chunk *c, float *const *P, int dropout, int relu)
{
    linear_fwd(c->p2, P[P_F1W], P[P_F1B], c->a3, F1, FEAT, FEAT, 1);
    if (dropout)
        for (int i = 0; i < F1 * BATCH; i += VW)
            ST(c->a3 + i, LD(c->a3 + i) * LD(c->drop + i));
    act_inplace(c->a3, F1 * BATCH, relu);
    linear_fwd(c->a3, P[P_F2W], P[P_F2B], c->a4, F2, F1, F1, 1);
    act_inplace(c->a4, F2 * BATCH, relu);
    linear_fwd10(c->a4, P[P_F3W], P[P_F3B], c->lg, F3, F2, F2, 1);
}

/* Cross-entropy, mean over the whole batch of B: its gradient into dlg (0 on padding lanes),
 * the summed loss (in double) and the number of correct argmax predictions into totals. With
 * label smoothing eps, torch's: the target is (1 - eps) onehot + eps / 10, so an image's loss is
 * (1 - eps)(lse - z_y) + eps (lse - mean z) and its gradient softmax - target. eps = 0 runs the
 * plain loss's own arithmetic, not the smoothed formula, whose extra terms round differently. */
static void loss_fwd_bwd(chunk *c, const int64_t *labels, double inv_b, double smoothing, double *totals)
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
        if (smoothing != 0.0) {
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

/* Backward through the classifier, down to the gradient w.r.t. the pooled conv2 maps. */
static void classifier_bwd(chunk *c, float *const *P, float *grad, float *scratch, int dropout, int relu)
{
    linear_wgrad10(c->dlg, c->a4, grad + goff(P_F3W), F3, F2);
    bias_grad(c->dlg, grad + goff(P_F3B), F3);
    linear_bwd_input84(c->dlg, P[P_F3W], NULL, c->da4, F2, F3, 1, F2);
    act_bwd(c->da4, c->a4, NULL, F2 * BATCH, relu);
#if F1_FITS_VECTORS
    transpose_rows(c->a3, scratch, F1);
    fc2_wgrad(c->da4, scratch, grad + goff(P_F2W), c->n);
#else
    linear_wgrad(c->da4, c->a3, grad + goff(P_F2W), F2, F1);
#endif
    bias_grad(c->da4, grad + goff(P_F2B), F2);
    linear_bwd_input(c->da4, P[P_F2W], NULL, c->da3, F1, F2, 1, F1);
    act_bwd(c->da3, c->a3, dropout ? c->drop : NULL, F1 * BATCH, relu);
    transpose_rows(c->p2, scratch, FEAT);
    fc1_wgrad(c->da3, scratch, grad + goff(P_F1W), c->n);
    bias_grad(c->da3, grad + goff(P_F1B), F1);
    linear_bwd_input(c->da3, P[P_F1W], NULL, c->dp2, FEAT, F1, 1, FEAT);
}

/* Batch statistics of one conv output over all chunks' lanes in use: mean, then the biased
 * variance from the deviations (two passes: no cancellation); row sums in float, totals in double. */
static void bn_stats(chunk *ch, int nch, int which, int C, int H, double *mean, double *var, int64_t count)
{
    for (int pass = 0; pass < 2; pass++)
        for (int c = 0; c < C; c++) {
            double total = 0.0;
            const vf m = splat((float)mean[c]);
            for (int k = 0; k < nch; k++) {
                const float *z = (which == 1 ? ch[k].z1 : ch[k].z2) + (size_t)c * H * H * BATCH;
                for (int y = 0; y < H; y++) {
                    vf s = splat(0.f);
                    for (int j = 0; j < H * NV; j++) {
                        const vf d = (LD(z + ((size_t)y * H * NV + j) * VW) - m) * LD(ch[k].mask + (j % NV) * VW);
                        s += pass ? d * d : d;
                    }
                    total += hsum(s);
                }
            }
            if (pass)
                var[c] = total / (double)count;
            else
                mean[c] = total / (double)count;
        }
}

/* Training-mode batch norm of one layer: statistics, running-statistics update (momentum, the
 * unbiased variance, as torch), then normalise, activate and pool each chunk. */
static void bn_layer_fwd(chunk *ch, int nch, int which, int C, int H, float *const *P, float *const *run,
                         int64_t *nbt, double eps, double momentum, int64_t count, float *istd, int relu,
                         int maxpool)
{
    double mean[C2], var[C2];
    for (int c = 0; c < C; c++)
        mean[c] = 0.0;
    bn_stats(ch, nch, which, C, H, mean, var, count);
    float fmean[C2];
    float *rm = run[which == 1 ? R_MEAN1 : R_MEAN2], *rv = run[which == 1 ? R_VAR1 : R_VAR2];
    for (int c = 0; c < C; c++) {
        fmean[c] = (float)mean[c];
        istd[c] = (float)(1.0 / sqrt(var[c] + eps));
        rm[c] = (float)((1.0 - momentum) * rm[c] + momentum * mean[c]);
        rv[c] = (float)((1.0 - momentum) * rv[c] + momentum * var[c] * (double)count / (double)(count - 1));
    }
    *nbt += 1;
    const float *gamma = P[which == 1 ? P_BN1W : P_BN2W], *beta = P[which == 1 ? P_BN1B : P_BN2B];
    for (int k = 0; k < nch; k++) {
        if (which == 1)
            act_pool_fwd(ch[k].z1, ch[k].a1, ch[k].p1, C1, H1, fmean, istd, gamma, beta, 1, relu, maxpool);
        else
            act_pool_fwd(ch[k].z2, ch[k].a2, ch[k].p2, C2, H2, fmean, istd, gamma, beta, 1, relu, maxpool);
    }
}

static const float ZEROS[C2] = {0}, ONES[C2] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

/* Batch-norm backward of one layer over all chunks, given the per-channel sums of dy and
 * dy * xhat: parameter gradients, then dz in place. */
static void bn_layer_bwd(chunk *ch, int nch, int which, int C, float *const *P, float *grad,
                         const float *istd, const double *sdy, const double *sdyx, int64_t count)
{
    const float *gamma = P[which == 1 ? P_BN1W : P_BN2W];
    float *gg = grad + goff(which == 1 ? P_BN1W : P_BN2W), *gb = grad + goff(which == 1 ? P_BN1B : P_BN2B);
    float k[C2], mdy[C2], mdyx[C2];
    for (int c = 0; c < C; c++) {
        gg[c] += (float)sdyx[c];
        gb[c] += (float)sdy[c];
        k[c] = gamma[c] * istd[c];
        mdy[c] = (float)(sdy[c] / (double)count);
        mdyx[c] = (float)(sdyx[c] / (double)count);
    }
    float *gbias = grad + goff(which == 1 ? P_C1B : P_C2B);
    for (int i = 0; i < nch; i++) {
        if (which == 1)
            bn_bwd(ch[i].a1, ch[i].z1, C1, H1, H1, 0, k, mdy, mdyx, ch[i].mask, gbias);
        else
            bn_bwd(ch[i].dz2, ch[i].z2, C2, H2, H2, 0, k, mdy, mdyx, ch[i].mask, gbias);
    }
}

/* ------------------------------------------------------------------------------------------
 * Optimisers, with torch's arithmetic (torch.optim.Adam/AdamW fused, SGD single-tensor).
 * ------------------------------------------------------------------------------------------ */
static void adam_update(float *restrict p, float *restrict g, float *restrict m, float *restrict v, int n,
                        float *step, int decoupled, double lr, double b1, double b2, double eps, double wd)
{
    *step += 1.0f;
    const double bc1 = 1.0 - pow(b1, *step), bc2_sqrt = sqrt(1.0 - pow(b2, *step));
    const float step_size = (float)(lr / bc1), bc2s = (float)bc2_sqrt, fe = (float)eps;
    const float w1 = (float)(1.0 - b1), fb2 = (float)b2, w2 = (float)(1.0 - b2), fwd = (float)wd;
    const float shrink = (float)(1.0 - lr * wd);
    for (int i = 0; i < n; i++) {
        float gi = g[i], pi = p[i];
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
static void sgd_update(float *restrict p, const float *restrict g, float *restrict buf, int n,
                       double lr, double momentum, double wd)
{
    const float flr = (float)lr, fm = (float)momentum, fwd = (float)wd;
    for (int i = 0; i < n; i++) {
        float d = g[i] + p[i] * fwd;
        if (buf) {
            d = buf[i] * fm + d;
            buf[i] = d;
        }
        p[i] -= flr * d;
    }
}

/* ------------------------------------------------------------------------------------------
 * Entry points.
 * ------------------------------------------------------------------------------------------ */

/* Per-stage time of ln_train_step, only in a build with -DLN_PROFILE (benchmarks/step_time.py
 * builds one): microseconds accumulated per stage since the last ln_profile call. */
#define PROF_STAGES "pack+conv1_fwd", "act1_fwd", "conv2_fwd", "act2_fwd", "classifier_fwd+loss", \
    "classifier_bwd", "act2_bwd", "conv2_wgrad", "conv2_bwd_input", "act1_bwd", "conv1_wgrad", "update"
enum { S_CONV1, S_ACT1, S_CONV2, S_ACT2, S_CLSF, S_CLSB, S_ACT2B, S_WG2, S_BI2, S_ACT1B, S_WG1, S_UPD, NSTAGE };
#ifdef LN_PROFILE
#include <time.h>
static double prof_us[NSTAGE], prof_t;
static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec * 1e-3;
}
#define PROF_START() (prof_t = now_us())
#define PROF(k)                                                                                   \
    do {                                                                                          \
        const double t_ = now_us();                                                               \
        prof_us[k] += t_ - prof_t;                                                                \
        prof_t = t_;                                                                              \
    } while (0)
#else
#define PROF_START() ((void)0)
#define PROF(k) ((void)0)
#endif

/* Stage names, comma-separated, in the order ln_profile reports them. */
const char *ln_profile_names(void)
{
    static const char *const names[] = {PROF_STAGES};
    static char joined[512];
    if (!joined[0])
        for (int i = 0; i < NSTAGE; i++) {
            if (i)
                strcat(joined, ",");
            strcat(joined, names[i]);
        }
    return joined;
}

/* Copies the per-stage microseconds into out[NSTAGE] and resets them; returns NSTAGE, or 0 in
 * a build without -DLN_PROFILE. */
int ln_profile(double *out)
{
#ifdef LN_PROFILE
    for (int i = 0; i < NSTAGE; i++) {
        out[i] = prof_us[i];
        prof_us[i] = 0.0;
    }
    return NSTAGE;
#else
    (void)out;
    return 0;
#endif
}

/* Bytes per vector in this build (64, 32 or 16). */
int ln_vector_bytes(void) { return VBYTES; }

/* One training step on a batch of B images: forward, mean cross-entropy, backward, one update.
 * P: the 14 parameter slots (batch-norm slots NULL without batch norm); run: running mean/var
 * of both batch norms; nbt: their num_batches_tracked. x: (rows, 784) images, the batch being
 * rows idx[0..B) (or rows 0..B without idx); y: labels of those rows. drop: (B, 120) dropout
 * scales or NULL. s1/s2/steps: per slot, exp_avg / exp_avg_sq / step (Adam, AdamW) or
 * momentum_buffer (SGD; NULL without momentum). totals += (loss sum, correct). relu: ReLU
 * (else tanh); maxpool: max pooling (else average); smoothing: the loss's label smoothing in
 * [0, 1]. move, pad, erase_rows, erase_cols, background: the batch's augmentation (see
 * augment_t; each per-image array starts at the batch's first image; NULL pointers for none).
 * These come last so that an older build (a benchmark baseline) called this way ignores them
 * and runs tanh, average pooling, the plain loss and no augmentation.
 * Returns 0, or -1 for an index out of range, -2 for a label out of range, -3 out of memory
 * (nothing is changed then). */
int ln_train_step(ln_ws *ws, float *const *P, float *const *run, int64_t *const *nbt,
                  float *const *s1, float *const *s2, float *const *steps,
                  const float *x, const int64_t *y, const int64_t *idx, int64_t rows, int B,
                  const float *drop, double bn_eps, double bn_momentum,
                  int opt, double lr, double beta1, double beta2, double eps, double wd, double momentum,
                  double *totals, int relu, int maxpool, double smoothing,
                  const int64_t *move, int pad, const float *erase_rows, const float *erase_cols,
                  double background)
{
    const augment_t aug = {move, pad, erase_rows, erase_cols, (float)background};
    for (int b = 0; b < B; b++) {
        const int64_t r = idx ? idx[b] : b;
        if (r < 0 || r >= rows)
            return -1;
        if (y[r] < 0 || y[r] >= F3)
            return -2;
    }
    const int nch = (B + BATCH - 1) / BATCH;
    if (ws_reserve(ws, nch))
        return -3;
    chunk *ch = ws->ch;
    const int bn = P[P_BN1W] != NULL;
    memset(ws->grad, 0, sizeof(float) * goff(NPARAM));
    int64_t labels[BATCH];
    float istd1[C1], istd2[C2];
    PROF_START();

    for (int k = 0; k < nch; k++) {
        chunk *c = &ch[k];
        set_lanes(c, B - k * BATCH < BATCH ? B - k * BATCH : BATCH);
        pack_input(c, ws->stage, x, idx, (int64_t)k * BATCH, &aug);
        conv1_fwd(c->x, P[P_C1W], P[P_C1B], c->z1);
        PROF(S_CONV1);
        if (!bn)
            act_pool_fwd(c->z1, c->a1, c->p1, C1, H1, ZEROS, ONES, ONES, ZEROS, 0, relu, maxpool);
        PROF(S_ACT1);
    }
    if (bn)
        bn_layer_fwd(ch, nch, 1, C1, H1, P, run, nbt[0], bn_eps, bn_momentum, (int64_t)B * H1 * H1, istd1,
                     relu, maxpool);
    PROF(S_ACT1);
    for (int k = 0; k < nch; k++) {
        conv2_fwd(ch[k].p1, P[P_C2W], P[P_C2B], ch[k].z2);
        PROF(S_CONV2);
        if (!bn)
            act_pool_fwd(ch[k].z2, ch[k].a2, ch[k].p2, C2, H2, ZEROS, ONES, ONES, ZEROS, 0, relu, maxpool);
        PROF(S_ACT2);
    }
    if (bn)
        bn_layer_fwd(ch, nch, 2, C2, H2, P, run, nbt[1], bn_eps, bn_momentum, (int64_t)B * H2 * H2, istd2,
                     relu, maxpool);
    PROF(S_ACT2);

    double sdy[C2], sdyx[C2];
    memset(sdy, 0, sizeof sdy);
    memset(sdyx, 0, sizeof sdyx);
    for (int k = 0; k < nch; k++) {
        chunk *c = &ch[k];
        if (drop)
            for (int o = 0; o < F1; o++)
                for (int b = 0; b < BATCH; b++)
                    c->drop[o * BATCH + b] = b < c->n ? drop[((int64_t)k * BATCH + b) * F1 + o] : 0.f;
        classifier_fwd(c, P, drop != NULL, relu);
        for (int b = 0; b < c->n; b++)
            labels[b] = y[idx ? idx[k * BATCH + b] : k * BATCH + b];
        loss_fwd_bwd(c, labels, 1.0 / B, smoothing, totals);
        PROF(S_CLSF);
        classifier_bwd(c, P, ws->grad, ws->featT, drop != NULL, relu);
        PROF(S_CLSB);
        act_pool_bwd(c->dp2, c->a2, c->dz2, C2, H2, H2, 0, bn ? c->z2 : NULL, sdy, sdyx, relu, maxpool);
        PROF(S_ACT2B);
    }
    if (bn)
        bn_layer_bwd(ch, nch, 2, C2, P, ws->grad, istd2, sdy, sdyx, (int64_t)B * H2 * H2);
    else
        for (int c = 0; c < C2; c++)
            ws->grad[goff(P_C2B) + c] += (float)sdy[c];
    PROF(S_ACT2B);

    for (int o = 0; o < C2; o++)
        for (int c = 0; c < C1; c++)
            for (int t = 0; t < 25; t++)
                ws->w2t[(c * C2 + o) * 25 + 24 - t] = P[P_C2W][(o * C1 + c) * 25 + t];
    memset(sdy, 0, sizeof sdy);
    memset(sdyx, 0, sizeof sdyx);
    for (int k = 0; k < nch; k++) {
        chunk *c = &ch[k];
        conv2_wgrad(c->p1, c->dz2, ws->pw2);
        PROF(S_WG2);
        conv2_bwd_input(c->dz2, ws->w2t, NULL, c->dp1);
        PROF(S_BI2);
        act_pool_bwd(c->dp1, c->a1, c->a1, C1, H1, H1, 0, bn ? c->z1 : NULL, sdy, sdyx, relu, maxpool);
        PROF(S_ACT1B);
    }
    conv_wgrad_finish(ws->pw2, ws->grad + goff(P_C2W), C2 * C1 * 25);
    PROF(S_WG2);
    if (bn)
        bn_layer_bwd(ch, nch, 1, C1, P, ws->grad, istd1, sdy, sdyx, (int64_t)B * H1 * H1);
    else
        for (int c = 0; c < C1; c++)
            ws->grad[goff(P_C1B) + c] += (float)sdy[c];
    PROF(S_ACT1B);
    for (int k = 0; k < nch; k++)
        conv1_wgrad(ch[k].x, ch[k].a1, ws->pw1);
    conv_wgrad_finish(ws->pw1, ws->grad + goff(P_C1W), C1 * 25);
    PROF(S_WG1);

    for (int s = 0; s < NPARAM; s++) {
        if (!P[s])
            continue;
        float *g = ws->grad + goff(s);
        if (opt == OPT_SGD)
            sgd_update(P[s], g, s1[s], PSIZE[s], lr, momentum, wd);
        else
            adam_update(P[s], g, s1[s], s2[s], PSIZE[s], steps[s], opt == OPT_ADAMW, lr, beta1, beta2, eps, wd);
    }
    PROF(S_UPD);
    return 0;
}

/* y = tanh(x) element-wise as the step computes it (n a multiple of 16; for the accuracy test). */
void ln_tanh(const float *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i += VW) {
        vf v;
        memcpy(&v, x + i, sizeof v);
        vtanh_n(&v, 1);
        memcpy(y + i, &v, sizeof v);
    }
}

/* Eval-mode logits of n images (x: (n, 784)) into out (n, 10): batch norm with the running
 * statistics, no dropout; relu and maxpool as for ln_train_step (last, for the same reason).
 * Returns 0, or -3 out of memory. */
int ln_forward(float *const *P, float *const *run, double bn_eps, const float *x, int64_t n, float *out,
               int relu, int maxpool)
{
    ln_ws *ws = ln_ws_new();
    if (!ws || ws_reserve(ws, 1)) {
        ln_ws_free(ws);
        return -3;
    }
    chunk *c = &ws->ch[0];
    const int bn = P[P_BN1W] != NULL;
    float m1[C1], s1[C1], m2[C2], s2[C2];
    if (bn) {
        for (int i = 0; i < C1; i++) {
            m1[i] = run[R_MEAN1][i];
            s1[i] = (float)(1.0 / sqrt((double)run[R_VAR1][i] + bn_eps));
        }
        for (int i = 0; i < C2; i++) {
            m2[i] = run[R_MEAN2][i];
            s2[i] = (float)(1.0 / sqrt((double)run[R_VAR2][i] + bn_eps));
        }
    }
    for (int64_t first = 0; first < n; first += BATCH) {
        set_lanes(c, n - first < BATCH ? (int)(n - first) : BATCH);
        pack_input(c, ws->stage, x, NULL, first, NULL);
        conv1_fwd(c->x, P[P_C1W], P[P_C1B], c->z1);
        if (bn)
            act_pool_fwd(c->z1, NULL, c->p1, C1, H1, m1, s1, P[P_BN1W], P[P_BN1B], 0, relu, maxpool);
        else
            act_pool_fwd(c->z1, NULL, c->p1, C1, H1, ZEROS, ONES, ONES, ZEROS, 0, relu, maxpool);
        conv2_fwd(c->p1, P[P_C2W], P[P_C2B], c->z2);
        if (bn)
            act_pool_fwd(c->z2, NULL, c->p2, C2, H2, m2, s2, P[P_BN2W], P[P_BN2B], 0, relu, maxpool);
        else
            act_pool_fwd(c->z2, NULL, c->p2, C2, H2, ZEROS, ONES, ONES, ZEROS, 0, relu, maxpool);
        classifier_fwd(c, P, 0, relu);
        for (int b = 0; b < c->n; b++)
            for (int k = 0; k < F3; k++)
                out[(first + b) * F3 + k] = c->lg[k * BATCH + b];
    }
    ln_ws_free(ws);
    return 0;
}
