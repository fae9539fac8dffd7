/* native_step.c: one concern, the whole LeNet5V1 training step on CPU (forward, cross-entropy
 * with optional label smoothing, backward, optimiser update) and its eval-mode forward, in
 * portable C, on one or several threads with the same results. Every variant of the model:
 * tanh or ReLU, 2x2 average or max pooling, with or without batch norm and dropout.
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
 * With batch norm each layer runs over all chunks before the next one, so that it sees the
 * whole batch; without, the convolutions run row by row, each output activated while its rows
 * are in cache, and on one thread the conv layers' forward and backward each run as one
 * pipeline of rows per chunk (step_job).
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
 *
 * Threads: a step (and the eval forward) runs on a->threads threads of a pool kept in the
 * workspace. Each stage's outputs are split between them by ownership, whole register tiles
 * at a time, so every element is computed by one thread with the single-threaded arithmetic;
 * the results are the same bits for any thread count (see step_job). The eval forward gives
 * each thread its own run of 64-image chunks.
 *
 * Arguments: one record (ln_args, generated from LN_ARGS), which native.py mirrors and checks
 * against the layout the library reports (ln_abi, ln_args_size, ln_args_names/offsets).
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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
#define DA3_ROWS 4   /* fc1's outputs per unit of work in its backward: whole LINI_OB and LWT_OB tiles */
#define CONV2_CB C1  /* input maps per pass over an output row: all (see below) */
#define CONVI_CB C2
#define WG2_OG 1     /* conv2 weight gradient's output-map blocks per pass: one */
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
#define DA3_ROWS 10
/* Blocking for the cache as well. At 256 bits and below a tile reads less than a whole pixel
 * (one 64-byte line of its four, or half of one), so the lines one tile reads fall in a quarter
 * of a 32 KB 8-way L1's sets: conv2's 150-pixel window no longer fits, and nearly every input
 * load missed (cachegrind: 227K of conv2 forward's 240K per step; half as many with a 48 KB
 * 12-way L1, as on Zen 5).
 * Hence conv2 and its input gradient pass over an output row CONV2_CB / CONVI_CB input maps at
 * a time (the accumulators stored and reloaded between passes, every sum in its old order),
 * and conv2's weight gradient takes WG2_OG blocks of output maps per pass over the input rows:
 * 1.0M -> 0.54M L1 misses per step, with fc1's weight gradient by input columns first. */
#ifndef CONV2_CB
#define CONV2_CB 2
#endif
#ifndef CONVI_CB
#define CONVI_CB 2
#endif
#ifndef WG2_OG
#define WG2_OG 4
#endif
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
/* the threads' units of work are whole register tiles (step_job) */
_Static_assert(F1 % DA3_ROWS == 0 && DA3_ROWS % LINI_OB == 0 && DA3_ROWS % LWT_OB == 0, "fc1 backward units");
_Static_assert(F2 % 4 == 0 && 4 % LINI84_OB == 0 && 4 % (F1_FITS_VECTORS ? LWT2_OB : LWG_OB) == 0, "fc2 backward units");
_Static_assert(FEAT % 16 == 0 && FEAT % LINI_OB == 0 && F1 % LIN_OB == 0 && F2 % LIN_OB == 0, "classifier units");
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

/* An 8 x 8 block of floats transposed in registers: o[j][i] = r[i][j], with 24 two-input shuffles
 * of 256-bit vectors. Built where AVX gives those registers (the 256- and 512-bit builds). */
#if defined(__AVX__)
#define HAVE_TRANSPOSE8 1
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif
INLINE void transpose8(const v8f r[8], v8f o[8])
{
    v8f s[8], u[8];
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
        o[j] = SHUF8(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        o[j + 4] = SHUF8(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}
#else
#define HAVE_TRANSPOSE8 0
#endif

/* in [R][64] -> out [64][R] for the rows [r0, r1) (multiples of 8), in 8 x 8 blocks: with 256-bit vectors eight
 * loads, 24 shuffles and eight stores per block (2.5 us for fc1's 400 rows against 18 us for
 * the element-by-element loop), elsewhere element by element within the block (12 us). */
#if VW == 8
static void transpose_rows(const float *restrict in, float *restrict out, int R, int r0, int r1)
{
    for (int i0 = r0; i0 < r1; i0 += 8)
        for (int b0 = 0; b0 < BATCH; b0 += 8) {
            v8f r[8], o[8];
            UNROLL for (int i = 0; i < 8; i++) r[i] = LD(in + (i0 + i) * BATCH + b0);
            transpose8(r, o);
            UNROLL for (int j = 0; j < 8; j++) ST(out + (b0 + j) * R + i0, o[j]);
        }
}
#else
static void transpose_rows(const float *restrict in, float *restrict out, int R, int r0, int r1)
{
    for (int i0 = r0; i0 < r1; i0 += 8)
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

/* Batch-norm backward, second pass, channels [c0, c1): dz = k * (dy - mdy - xhat * mdyx) on the
 * batch's lanes, 0 on the padding lanes; db += sum dz (the gradient of the conv bias under the
 * batch norm). */
static void bn_bwd(float *restrict dz, const float *restrict xhat, int c0, int c1, int H, int DW, int DX,
                   const float *k, const float *mdy, const float *mdyx, const float *mask, float *db)
{
    for (int c = c0; c < c1; c++) {
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
 * Threads: a small pool kept in the workspace, started on the first call that asks for more
 * than one thread and joined by ln_ws_free. A call is one job: every thread runs the same
 * stage code on its own share of each stage's outputs, and the threads meet at a barrier
 * wherever a stage reads what another thread wrote (see step_job for why the results do not
 * depend on the thread count). pthreads, not OpenMP: torch ships its own OpenMP runtime, which
 * a second one in the process would fight, and clang would need libomp.
 * ------------------------------------------------------------------------------------------ */
#define LN_MAX_THREADS 64
/* How long a barrier spins before it sleeps: well above a stage's imbalance between two
 * running threads (a few us), short enough that a thread whose partner was descheduled on a
 * busy machine soon gives its core back. A worker waiting for the next job spins longer, over
 * the Python between two steps (~0.1-0.2 ms), so that a step does not start by waking it
 * (tens of us); between epochs it sleeps. */
#ifndef LN_SPIN_US
#define LN_SPIN_US 50
#endif
#ifndef LN_IDLE_SPIN_US
#define LN_IDLE_SPIN_US 1000
#endif
/* Past this much of its spin a waiting thread yields the CPU at each poll: on an idle machine
 * sched_yield returns at once, and on a busy one the thread it would otherwise spin against
 * (often the one that will open the barrier, placed on the same CPU) runs. */
#ifndef LN_PAUSE_US
#define LN_PAUSE_US 20
#endif
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define CPU_RELAX() __asm__ volatile("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec * 1e-3;
}

/* A reusable barrier: spin, then sleep on a condition variable. The last thread to arrive
 * opens the round; one that went to sleep registered in sleepers first, and the opener reads
 * sleepers after advancing round (both sequentially consistent), so either the sleeper sees
 * the new round before it waits or the opener sees the sleeper and wakes it under the mutex. */
typedef struct {
    atomic_int count;     /* threads arrived in this round */
    atomic_uint round;    /* rounds opened */
    atomic_int sleepers;  /* threads asleep on cv, or about to be */
    pthread_mutex_t mu;
    pthread_cond_t cv;
} barrier_t;

static void barrier_init(barrier_t *b)
{
    atomic_init(&b->count, 0);
    atomic_init(&b->round, 0);
    atomic_init(&b->sleepers, 0);
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
}

static void barrier_destroy(barrier_t *b)
{
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->cv);
}

/* Returns once all n threads have called it; what any of them wrote before is visible to all
 * after it. A thread that waits spins for spin_us, then sleeps. */
static void barrier_wait_spin(barrier_t *b, int n, double spin_us)
{
    if (n <= 1)
        return;
    const unsigned r = atomic_load(&b->round);
    if (atomic_fetch_add(&b->count, 1) == n - 1) {
        atomic_store(&b->count, 0);
        atomic_store(&b->round, r + 1);
        if (atomic_load(&b->sleepers)) {
            pthread_mutex_lock(&b->mu);
            pthread_cond_broadcast(&b->cv);
            pthread_mutex_unlock(&b->mu);
        }
        return;
    }
    const double start = now_us();
    for (unsigned i = 1, yielding = 0;; i++) {
        if (atomic_load_explicit(&b->round, memory_order_acquire) != r)
            return;
        if (yielding) {
            sched_yield();
            if (now_us() - start > spin_us)
                break;
        } else {
            CPU_RELAX();
            yielding = i % 64 == 0 && now_us() - start > LN_PAUSE_US; /* the clock every 64 pauses */
        }
    }
    pthread_mutex_lock(&b->mu);
    atomic_fetch_add(&b->sleepers, 1);
    while (atomic_load(&b->round) == r)
        pthread_cond_wait(&b->cv, &b->mu);
    atomic_fetch_sub(&b->sleepers, 1);
    pthread_mutex_unlock(&b->mu);
}

static void barrier_wait(barrier_t *b, int n) { barrier_wait_spin(b, n, LN_SPIN_US); }

typedef void (*job_fn)(void *arg, int t, int n);
struct pool;
typedef struct {
    struct pool *pool;
    int t;
} worker_t;
typedef struct pool {
    atomic_int n;   /* threads of a job, the caller's included; 1: no workers */
    int asked;      /* the thread count last asked for (n is less if a thread could not start) */
    pid_t pid;      /* the process the workers belong to (a forked child has none of them) */
    job_fn job;
    void *arg;
    int quit;
    barrier_t bar;  /* the jobs' start and end, and every barrier inside a job */
    pthread_t th[LN_MAX_THREADS];
    worker_t w[LN_MAX_THREADS];
} pool_t;

/* A worker: wait for a job (or the order to quit), run its share, wait for the others. */
static void *worker_main(void *arg)
{
    const worker_t *w = arg;
    pool_t *p = w->pool;
    for (;;) {
        barrier_wait_spin(&p->bar, atomic_load(&p->n), LN_IDLE_SPIN_US);
        if (p->quit)
            return NULL;
        p->job(p->arg, w->t, atomic_load(&p->n));
        barrier_wait(&p->bar, atomic_load(&p->n));
    }
}

static void pool_init(pool_t *p)
{
    memset(p, 0, sizeof *p);
    atomic_init(&p->n, 1);
    p->asked = 1;
    barrier_init(&p->bar);
}

static void pool_stop(pool_t *p)
{
    const int n = atomic_load(&p->n);
    if (n > 1 && p->pid == getpid()) {
        p->quit = 1;
        barrier_wait(&p->bar, n);
        for (int i = 1; i < n; i++)
            pthread_join(p->th[i], NULL);
        p->quit = 0;
    } else if (n > 1) { /* a forked child: the workers stayed in the parent, the barrier may be mid-round */
        barrier_init(&p->bar);
    }
    atomic_store(&p->n, 1);
}

/* Workers 1..want-1. A worker may already wait at the first barrier, counting on want threads,
 * when a later one fails to start: it still waits (its arrival is not the last), and the
 * caller, arriving last with the smaller n, opens the round. Fewer threads give the same
 * results, only later. Workers take no signals: Python's handlers run on its main thread. */
static void pool_start(pool_t *p, int want)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    atomic_store(&p->n, want);
    int made = 1;
    for (; made < want; made++) {
        p->w[made] = (worker_t){p, made};
        if (pthread_create(&p->th[made], NULL, worker_main, &p->w[made]))
            break;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    atomic_store(&p->n, made);
    p->pid = getpid();
}

/* job(arg, t, n) on n threads (want, clamped to 1..LN_MAX_THREADS, or fewer where threads
 * cannot start), the caller being thread 0; returns when all are done. */
static void pool_run(pool_t *p, int want, job_fn job, void *arg)
{
    want = want < 1 ? 1 : want > LN_MAX_THREADS ? LN_MAX_THREADS : want;
    if (want != p->asked || (atomic_load(&p->n) > 1 && p->pid != getpid())) {
        pool_stop(p);
        if (want > 1)
            pool_start(p, want);
        p->asked = want;
    }
    const int n = atomic_load(&p->n);
    if (n == 1) {
        job(arg, 0, 1);
        return;
    }
    p->job = job;
    p->arg = arg;
    barrier_wait(&p->bar, n);
    job(arg, 0, n);
    barrier_wait(&p->bar, n);
}

/* [*lo, *hi): thread t's share of n work units, T contiguous runs whose sizes differ by at
 * most one. Which thread computes a unit never changes how it is computed. */
static void share(int n, int t, int T, int *lo, int *hi)
{
    *lo = (int)((int64_t)n * t / T);
    *hi = (int)((int64_t)n * (t + 1) / T);
}

/* The same, balanced by cost[0..n) instead of by count. */
static void share_weighted(const int *cost, int n, int t, int T, int *lo, int *hi)
{
    int64_t total = 0, sum = 0;
    for (int i = 0; i < n; i++)
        total += cost[i];
    *lo = -1;
    *hi = n;
    for (int i = 0; i <= n; i++) {
        if (*lo < 0 && sum * T >= total * t)
            *lo = i;
        if (sum * T >= total * (t + 1)) {
            *hi = i;
            break;
        }
        if (i < n)
            sum += cost[i];
    }
    if (t == T - 1)
        *hi = n;
}

/* ------------------------------------------------------------------------------------------
 * Workspace: per-chunk activation buffers, gradients, the conv weight-gradient partials and
 * the thread pool.
 * ------------------------------------------------------------------------------------------ */
/* A chunk's per-row sums of the activation backward (act_pool_bwd's rs1, rs2), per layer */
enum { RS1A = 0, RS1B = C1 * H1, RS2A = 2 * C1 * H1, RS2B = 2 * C1 * H1 + C2 * H2,
       RS_FLOATS = 2 * (C1 * H1 + C2 * H2) };
typedef struct {
    float *x;          /* [1][32][32][64] padded input */
    float *z1;         /* [6][28][28][64] with batch norm, conv1 output, normalised in place */
    float *a1;         /* [6][28][28][64] activation (without batch norm conv1's output first, in
                        * place); in the backward, the gradient w.r.t. conv1 output */
    float *p1, *dp1;   /* [6][14][14][64] */
    float *z2, *a2;    /* [16][10][10][64], as z1 and a1 */
    float *p2, *dp2;   /* [400][64] */
    float *drop;       /* [120][64] dropout scale */
    float *a3, *da3;   /* [120][64] */
    float *a4, *da4;   /* [84][64] */
    float *lg, *dlg;   /* [10][64] */
    float *mask;       /* [64]: 1 on lanes in use, 0 on padding */
    float *rs;         /* [RS_FLOATS] */
    int n;             /* lanes in use */
} chunk;

/* each buffer's floats, in BATCH-float rows */
static const size_t CHUNK_ROWS[] = {
    XP * XP, C1 * H1 * H1, C1 * H1 * H1, C1 * Q1 * Q1, C1 * Q1 * Q1, C2 * H2 * H2, C2 * H2 * H2,
    FEAT, FEAT, F1, F1, F1, F2, F2, F3, F3, 1, (RS_FLOATS + BATCH - 1) / BATCH};
#define NBUF (sizeof(CHUNK_ROWS) / sizeof(CHUNK_ROWS[0]))

typedef struct {
    int cap;
    chunk *ch;
    float **mem;       /* one allocation per chunk */
    float *grad;       /* gradients, each slot at goff(slot); zero between steps: the update
                        * zeroes each gradient it reads (while in cache: a memset at the
                        * step's start missed a 512 KB cache, 2,800 misses per step) */
    vf *pw1, *pw2;     /* conv weight-gradient partials */
    float *w2t;        /* conv2 weights flipped and transposed: [6][16][5][5] */
    float *featT;      /* [64][400]: fc1's input transposed, for its weight gradient */
    float *a3T;        /* [64][120]: fc2's, where fc2_wgrad takes it transposed */
    pool_t pool;
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
    pool_stop(&ws->pool);
    barrier_destroy(&ws->pool.bar);
    for (int i = 0; i < ws->cap; i++)
        free(ws->mem[i]);
    free(ws->mem);
    free(ws->ch);
    free(ws->grad);
    free(ws->pw1);
    free(ws->pw2);
    free(ws->w2t);
    free(ws->featT);
    free(ws->a3T);
    free(ws);
}

ln_ws *ln_ws_new(void)
{
    ln_ws *ws = calloc(1, sizeof *ws);
    if (!ws)
        return NULL;
    pool_init(&ws->pool);
    ws->grad = zalloc(sizeof(float) * goff(NPARAM));
    ws->pw1 = zalloc(sizeof(vf) * C1 * 25);
    ws->pw2 = zalloc(sizeof(vf) * C2 * C1 * 25);
    ws->w2t = zalloc(sizeof(float) * C2 * C1 * 25);
    ws->featT = zalloc(sizeof(float) * BATCH * FEAT);
    ws->a3T = zalloc(sizeof(float) * BATCH * F1);
    if (!ws->grad || !ws->pw1 || !ws->pw2 || !ws->w2t || !ws->featT || !ws->a3T) {
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
        total += CHUNK_ROWS[i] * BATCH;
    for (int k = ws->cap; k < chunks; k++) {
        float *m = zalloc(sizeof(float) * total); /* zero: the padding rows and columns stay 0 */
        if (!m)
            return -1;
        ws->mem[k] = m;
        float **dst[] = {&ch[k].x, &ch[k].z1, &ch[k].a1, &ch[k].p1, &ch[k].dp1, &ch[k].z2, &ch[k].a2,
                         &ch[k].p2, &ch[k].dp2, &ch[k].drop, &ch[k].a3, &ch[k].da3,
                         &ch[k].a4, &ch[k].da4, &ch[k].lg, &ch[k].dlg, &ch[k].mask, &ch[k].rs};
        _Static_assert(sizeof dst / sizeof dst[0] == NBUF, "a row count per chunk buffer");
        for (size_t i = 0; i < NBUF; i++) {
            *dst[i] = m;
            m += CHUNK_ROWS[i] * BATCH;
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

#define LANE_GROUPS (BATCH / 16)

/* Lanes [b0, b0 + 16) of the chunk's images into the padded [32][32][64] input: the rows are
 * copied first and then transposed (the prototype measured 123 -> 44 us for this order against
 * transposing while gathering), through a 50 KB stage on the stack, which stays in cache (a
 * 200 KB stage per chunk missed a 512 KB cache on every step: cachegrind, 3,100 misses per
 * step). Padding lanes are zero. A thread packs whole 16-lane groups: one 64-byte line of
 * every pixel. */
static void pack_input(chunk *c, const float *src, const int64_t *idx, int64_t first, const augment_t *aug,
                       int b0)
{
    float stage[16 * IMGPIX] __attribute__((aligned(64)));
    for (int b = b0; b < b0 + 16; b++) {
        float *d = stage + (b - b0) * IMGPIX;
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
#if HAVE_TRANSPOSE8
    /* 8 images x 8 pixels at a time (an image is 98 such runs) in registers: the step's pack
     * stage 58-59 -> 51-52 us at both widths on the Zen 5 VM (step_time.py --baseline, min of
     * 10 blocks); the stores of lanes scattered 256 bytes apart were most of the copy */
    for (int g = 0; g < 16; g += 8)
        for (int p0 = 0; p0 < IMGPIX; p0 += 8) {
            v8f r[8], o[8];
            UNROLL for (int i = 0; i < 8; i++) r[i] = *(const v8f *)(stage + (g + i) * IMGPIX + p0);
            transpose8(r, o);
            UNROLL for (int j = 0; j < 8; j++) {
                const int y = (p0 + j) / IMG, x = (p0 + j) % IMG;
                *(v8f *)(c->x + ((size_t)(y + 2) * XP + x + 2) * BATCH + b0 + g) = o[j];
            }
        }
#else
    for (int y = 0; y < IMG; y++)
        for (int b = b0; b < b0 + 16; b++) {
            const float *s = stage + (b - b0) * IMGPIX + y * IMG;
            float *d = c->x + ((size_t)(y + 2) * XP + 2) * BATCH + b;
            for (int x = 0; x < IMG; x++)
                d[x * BATCH] = s[x];
        }
#endif
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

/* Channel c's sum over the batch of per-row sums (act_pool_bwd's, bn_row_sums') at rs + off:
 * chunk by chunk, row by row (R rows), in double, as the single-threaded step accumulated them. */
static double sum_rows(const chunk *ch, int nch, int off, int c, int H, int R)
{
    double s = 0.0;
    for (int k = 0; k < nch; k++)
        for (int r = 0; r < R; r++)
            s += ch[k].rs[off + c * H + r];
    return s;
}

/* The per-row sums batch norm's statistics come from, taken as a convolution writes its rows:
 * over rows [y0, y1) of maps [m0, m1) of chunk c's output z, the sums of d and d * d, d = z - K
 * on the lanes in use, into s1 and s2 (indexed map * H + row). K, one value of
 * each map, shifts the data so that the variance from these sums does not cancel. Two passes
 * over the whole output after the layer (the mean, then the deviations, one add chain each)
 * cost 116 us of a 2.9 ms batch-norm step on the Zen 3 VM; these sums cost ~10 us there. */
_Static_assert(NV % 4 == 0, "bn_row_sums' four chains");
static void bn_row_sums(const chunk *ch, const float *z, int H, const float *K, float *s1, float *s2,
                        int m0, int m1, int y0, int y1)
{
    const float *mask = ch->n < BATCH ? ch->mask : NULL; /* NULL: every lane in use */
    for (int c = m0; c < m1; c++) {
        const vf k = splat(K[c]);
        for (int y = y0; y < y1; y++) {
            const float *row = z + ((size_t)c * H + y) * H * BATCH;
            vf a[4] = {0}, b[4] = {0}; /* four chains: one add's latency per vector otherwise */
            for (int x = 0; x < H; x++)
                for (int v = 0; v < NV; v += 4)
                    UNROLL for (int q = 0; q < 4; q++) {
                        vf d = LD(row + (size_t)(x * NV + v + q) * VW) - k;
                        if (mask)
                            d *= LD(mask + (v + q) * VW);
                        a[q] += d;
                        b[q] += d * d;
                    }
            s1[c * H + y] = hsum((a[0] + a[1]) + (a[2] + a[3]));
            s2[c * H + y] = hsum((b[0] + b[1]) + (b[2] + b[3]));
        }
    }
}

/* The shifts of bn_row_sums: each of a conv's OC output maps at (at, at) for the batch's first
 * image (lane 0), from its input in (IC maps of W x W pixels, its 5x5 window at rows and columns
 * at..at + 4): any value of a map that every thread computes alike serves, one near the map's
 * mean keeps the most precision. Each thread computes them itself. */
static void bn_shift(const float *in, int IC, int W, int at, int OC, const float *w, const float *bias,
                     float *K)
{
    for (int o = 0; o < OC; o++) {
        double s = bias[o];
        for (int c = 0; c < IC; c++)
            for (int i = 0; i < 25; i++)
                s += (double)w[(o * IC + c) * 25 + i]
                     * in[((size_t)(c * W + at + i / 5) * W + at + i % 5) * BATCH];
        K[o] = (float)s;
    }
}

/* Batch statistics of one conv output, channels [c0, c1), from the chunks' row sums: the mean,
 * and the biased variance from the shifted sums; totals in double. */
static void bn_stats(chunk *ch, int nch, int which, int H, const float *K, double *mean, double *var,
                     int64_t count, int c0, int c1)
{
    const int o1 = which == 1 ? RS1A : RS2A, o2 = which == 1 ? RS1B : RS2B;
    for (int c = c0; c < c1; c++) {
        const double d = sum_rows(ch, nch, o1, c, H, H) / (double)count;
        mean[c] = K[c] + d;
        var[c] = fmax(sum_rows(ch, nch, o2, c, H, H) / (double)count - d * d, 0.0);
    }
}

/* Training-mode batch norm of one layer, channels [c0, c1): statistics, running-statistics
 * update (momentum, the unbiased variance, as torch; num_batches_tracked by the thread with
 * count_batch), then normalise, activate and pool each chunk. */
static void bn_layer_fwd(chunk *ch, int nch, int which, int H, float *const *P, float *const *run,
                         int64_t *nbt, double eps, double momentum, int64_t count, const float *K,
                         float *istd, int relu, int maxpool, int c0, int c1, int count_batch)
{
    double mean[C2], var[C2];
    float fmean[C2];
    bn_stats(ch, nch, which, H, K, mean, var, count, c0, c1);
    float *rm = run[which == 1 ? R_MEAN1 : R_MEAN2], *rv = run[which == 1 ? R_VAR1 : R_VAR2];
    for (int c = c0; c < c1; c++) {
        fmean[c] = (float)mean[c];
        istd[c] = (float)(1.0 / sqrt(var[c] + eps));
        rm[c] = (float)((1.0 - momentum) * rm[c] + momentum * mean[c]);
        rv[c] = (float)((1.0 - momentum) * rv[c] + momentum * var[c] * (double)count / (double)(count - 1));
    }
    if (count_batch)
        *nbt += 1;
    const float *gamma = P[which == 1 ? P_BN1W : P_BN2W], *beta = P[which == 1 ? P_BN1B : P_BN2B];
    const int Q = H / 2;
    for (int k = 0; k < nch; k++) {
        if (which == 1)
            act_pool_fwd(ch[k].z1, ch[k].a1, ch[k].p1, H1, fmean, istd, gamma, beta, 1, c0 * Q, c1 * Q, relu, maxpool);
        else
            act_pool_fwd(ch[k].z2, ch[k].a2, ch[k].p2, H2, fmean, istd, gamma, beta, 1, c0 * Q, c1 * Q, relu, maxpool);
    }
}

static const float ZEROS[C2] = {0}, ONES[C2] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

/* Batch-norm backward of one layer, channels [c0, c1), over all chunks, from the per-channel
 * sums of dy and dy * xhat: parameter gradients, then dz in place. */
static void bn_layer_bwd(chunk *ch, int nch, int which, float *const *P, float *grad, const float *istd,
                         int64_t count, int maxpool, int c0, int c1)
{
    const int H = which == 1 ? H1 : H2, R = maxpool ? H / 2 : H;
    const float *gamma = P[which == 1 ? P_BN1W : P_BN2W];
    float *gg = grad + goff(which == 1 ? P_BN1W : P_BN2W), *gb = grad + goff(which == 1 ? P_BN1B : P_BN2B);
    float k[C2], mdy[C2], mdyx[C2];
    for (int c = c0; c < c1; c++) {
        const double sdy = sum_rows(ch, nch, which == 1 ? RS1A : RS2A, c, H, R);
        const double sdyx = sum_rows(ch, nch, which == 1 ? RS1B : RS2B, c, H, R);
        gg[c] += (float)sdyx;
        gb[c] += (float)sdy;
        k[c] = gamma[c] * istd[c];
        mdy[c] = (float)(sdy / (double)count);
        mdyx[c] = (float)(sdyx / (double)count);
    }
    float *gbias = grad + goff(which == 1 ? P_C1B : P_C2B);
    for (int i = 0; i < nch; i++) {
        if (which == 1)
            bn_bwd(ch[i].a1, ch[i].z1, c0, c1, H1, H1, 0, k, mdy, mdyx, ch[i].mask, gbias);
        else
            bn_bwd(ch[i].a2, ch[i].z2, c0, c1, H2, H2, 0, k, mdy, mdyx, ch[i].mask, gbias);
    }
}

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

/* ------------------------------------------------------------------------------------------
 * The argument record: every argument of ln_train_step and ln_forward in one struct, which
 * native.py mirrors field for field with a ctypes.Structure (StepArgs). LN_ARGS is its only
 * definition: the struct, and the names and offsets that ln_args_names and ln_args_offsets
 * report, are generated from it, so native.py checks the whole layout at load (with LN_ABI for
 * a change of meaning) and refuses a library whose record differs instead of calling it.
 * ------------------------------------------------------------------------------------------ */
#define LN_ABI 1
#define LN_ARGS(X)                                                                                \
    X(float *const *, params)    /* the 14 parameter slots (batch-norm slots NULL without) */     \
    X(float *const *, run)       /* running mean, var of batch norm 1, then of batch norm 2 */    \
    X(int64_t *const *, nbt)     /* their num_batches_tracked */                                  \
    X(float *const *, s1)        /* per slot: exp_avg (Adam, AdamW) or momentum_buffer (SGD) */   \
    X(float *const *, s2)        /* per slot: exp_avg_sq */                                       \
    X(float *const *, steps)     /* per slot: step */                                             \
    X(const float *, x)          /* (rows, 784) images */                                         \
    X(const int64_t *, y)        /* (rows,) labels */                                             \
    X(const int64_t *, idx)      /* (batch,) the batch's rows of x, or NULL: rows 0..batch */     \
    X(const float *, drop)       /* (batch, 120) dropout scales, or NULL */                       \
    X(double *, totals)          /* += (summed loss, correct predictions) */                      \
    X(float *, out)              /* ln_forward: (rows, 10) logits */                              \
    X(const int64_t *, move)     /* augmentation (augment_t), from the batch's first image */     \
    X(const float *, erase_rows)                                                                  \
    X(const float *, erase_cols)                                                                  \
    X(int64_t, rows)             /* rows of x (ln_forward: the images) */                         \
    X(int64_t, batch)            /* images in the batch */                                        \
    X(double, bn_eps)                                                                             \
    X(double, bn_momentum)                                                                        \
    X(double, lr)                                                                                 \
    X(double, beta1)                                                                              \
    X(double, beta2)                                                                              \
    X(double, eps)                                                                                \
    X(double, weight_decay)                                                                       \
    X(double, momentum)                                                                           \
    X(double, smoothing)         /* the loss's label smoothing, in [0, 1] */                      \
    X(double, background)        /* augmentation: the value outside the image */                  \
    X(int32_t, optimizer)        /* OPT_ADAM, OPT_ADAMW or OPT_SGD */                             \
    X(int32_t, relu)             /* ReLU, else tanh */                                            \
    X(int32_t, maxpool)          /* max pooling, else average */                                  \
    X(int32_t, pad)              /* augmentation: the largest shift */                            \
    X(int32_t, threads)          /* threads to run on (the same results for any count) */

#define LN_FIELD(type, name) type name;
typedef struct {
    LN_ARGS(LN_FIELD)
} ln_args;
#define LN_NAME(type, name) #name ","
#define LN_OFFSET(type, name) (int64_t) offsetof(ln_args, name),
static const char ARGS_NAMES[] = LN_ARGS(LN_NAME);
static const int64_t ARGS_OFFSETS[] = {LN_ARGS(LN_OFFSET)};

/* The stamp native.py checks before any other call: the record's version, size, and its
 * fields' names (comma-separated, in order) and byte offsets. */
int ln_abi(void) { return LN_ABI; }
int64_t ln_args_size(void) { return (int64_t)sizeof(ln_args); }
const char *ln_args_names(void) { return ARGS_NAMES; }
/* Copies up to cap offsets into out; returns the number of fields. */
int ln_args_offsets(int64_t *out, int cap)
{
    const int n = (int)(sizeof ARGS_OFFSETS / sizeof ARGS_OFFSETS[0]);
    for (int i = 0; i < n && i < cap; i++)
        out[i] = ARGS_OFFSETS[i];
    return n;
}

/* ------------------------------------------------------------------------------------------
 * Entry points.
 * ------------------------------------------------------------------------------------------ */

/* Per-stage time of ln_train_step, only in a build with -DLN_PROFILE (benchmarks/step_time.py
 * builds one): microseconds accumulated per stage since the last ln_profile call, as thread 0
 * sees them (a stage's time includes its wait for the slowest thread). */
#define PROF_STAGES "pack", "conv1_fwd(+act1)", "bn1_fwd", "conv2_fwd(+act2)", "bn2_fwd",             \
    "classifier_fwd+loss", "classifier_bwd", "act2_bwd", "bn2_bwd",                               \
    "conv2_wgrad+conv2_bwd_input+act1_bwd(+conv1_wgrad without bn)", "bn1_bwd", "conv1_wgrad", "update"
enum { S_PACK, S_CONV1, S_BN1, S_CONV2, S_BN2, S_CLSF, S_CLSB, S_ACT2B, S_BN2B, S_BACK2, S_BN1B, S_WG1,
       S_UPD, NSTAGE };
/* Each thread's busy time per stage too (from the stage's start to its arrival at each
 * barrier, its waits left out), for the first PROF_THREADS threads: ln_profile_busy. */
#define PROF_THREADS 8
#ifdef LN_PROFILE
static double prof_us[NSTAGE], prof_t;
static double prof_busy[PROF_THREADS][NSTAGE], prof_seg[PROF_THREADS], prof_acc[PROF_THREADS];
#define PROF_START(t)                                                                             \
    do {                                                                                          \
        const double t_ = now_us();                                                               \
        if ((t) == 0)                                                                             \
            prof_t = t_;                                                                          \
        if ((t) < PROF_THREADS)                                                                   \
            prof_seg[t] = t_, prof_acc[t] = 0.0;                                                  \
    } while (0)
#define PROF(t, k)                                                                                \
    do {                                                                                          \
        const double t_ = now_us();                                                               \
        if ((t) == 0) {                                                                           \
            prof_us[k] += t_ - prof_t;                                                            \
            prof_t = t_;                                                                          \
        }                                                                                         \
        if ((t) < PROF_THREADS) {                                                                 \
            prof_busy[t][k] += prof_acc[t];                                                       \
            prof_acc[t] = 0.0;                                                                    \
        }                                                                                         \
    } while (0)
#define PROF_ARRIVE(t) ((t) < PROF_THREADS ? (void)(prof_acc[t] += now_us() - prof_seg[t]) : (void)0)
#define PROF_LEAVE(t) ((t) < PROF_THREADS ? (void)(prof_seg[t] = now_us()) : (void)0)
#else
#define PROF_START(t) ((void)0)
#define PROF(t, k) ((void)0)
#define PROF_ARRIVE(t) ((void)0)
#define PROF_LEAVE(t) ((void)0)
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

/* Copies thread t's busy microseconds per stage into out[t * NSTAGE + stage] for t < threads
 * (at most PROF_THREADS) and resets them; returns NSTAGE, or 0 without -DLN_PROFILE. */
int ln_profile_busy(double *out, int threads)
{
#ifdef LN_PROFILE
    for (int t = 0; t < threads && t < PROF_THREADS; t++)
        for (int i = 0; i < NSTAGE; i++) {
            out[t * NSTAGE + i] = prof_busy[t][i];
            prof_busy[t][i] = 0.0;
        }
    return NSTAGE;
#else
    (void)out;
    (void)threads;
    return 0;
#endif
}

/* Bytes per vector in this build (64, 32 or 16). */
int ln_vector_bytes(void) { return VBYTES; }

/* What the threads of one step share: the arguments, and the batch-norm scales between the
 * forward and the backward. */
typedef struct {
    ln_ws *ws;
    const ln_args *a;
    augment_t aug;
    int nch, B, bn;
    float istd1[C1], istd2[C2];
} step_ctx;

/* conv2_bwd_input's output rows cost the kernel rows that overlap the 10-row gradient: 1 to 5 */
static int conv2_bwd_input_cost(int y) { return (y + 1 > H2 ? H2 + 4 - y : 5) - (y < 4 ? 4 - y : 0); }

/* conv1's pooling row py of chunk c (its rows 2py and 2py + 1 of all maps) into a1, activated
 * and pooled in place: without batch norm. Written whole and then read back, conv1's 1.2 MB
 * output went through a 512 KB cache twice (cachegrind: 37,600 misses per step). */
static void conv1_rows(chunk *c, float *const *P, int py, int relu, int maxpool)
{
    conv1_fwd(c->x, P[P_C1W], P[P_C1B], c->a1, 2 * py, 2 * py + 2, 0, C1);
    for (int m = 0; m < C1; m++)
        act_pool_fwd(c->a1, c->a1, c->p1, H1, ZEROS, ONES, ONES, ZEROS, 0, m * Q1 + py, m * Q1 + py + 1, relu,
                     maxpool);
}

/* conv2's unit u of chunk c (register tile of output maps u / Q2, pooling row u % Q2): with
 * batch norm (K2: its shifts) into z2, with its row sums; without, into a2, activated and pooled
 * in place. */
static void conv2_rows(chunk *c, float *const *P, int u, const float *K2, int relu, int maxpool)
{
    const int o0 = u / Q2 * CONV2_OCB, py = u % Q2;
    conv2_fwd(c->p1, P[P_C2W], P[P_C2B], K2 ? c->z2 : c->a2, 2 * py, 2 * py + 2, o0, o0 + CONV2_OCB);
    if (K2)
        bn_row_sums(c, c->z2, H2, K2, c->rs + RS2A, c->rs + RS2B, o0, o0 + CONV2_OCB, 2 * py, 2 * py + 2);
    else
        for (int m = o0; m < o0 + CONV2_OCB; m++)
            act_pool_fwd(c->a2, c->a2, c->p2, H2, ZEROS, ONES, ONES, ZEROS, 0, m * Q2 + py, m * Q2 + py + 1,
                         relu, maxpool);
}

/* conv2's input gradient for chunk c's pooling rows [b0, b1), shared between the threads by
 * the rows' cost, and act1's backward on each thread's rows (its gradient into a1 in place). */
static void conv2_bwd_band(chunk *c, const float *w2t, int b0, int b1, int t, int T, int bn, int relu,
                           int maxpool)
{
    int cost[Q1], lo, hi;
    for (int y = b0; y < b1; y++)
        cost[y - b0] = conv2_bwd_input_cost(y);
    share_weighted(cost, b1 - b0, t, T, &lo, &hi);
    conv2_bwd_input(c->a2, w2t, NULL, c->dp1, b0 + lo, b0 + hi, 0, C1);
    for (int m = 0; m < C1; m++)
        act_pool_bwd(c->dp1, c->a1, c->a1, H1, H1, 0, bn ? c->z1 : NULL, c->rs + RS1A, c->rs + RS1B,
                     m * Q1 + b0 + lo, m * Q1 + b0 + hi, relu, maxpool);
}

/* The backward of chunk c from act2 to conv1's weight gradient on one thread without batch
 * norm, row by row, each gradient read while it is in cache: act2's backward by pooling rows,
 * each followed by conv2's weight gradient over its two rows; then conv2's input gradient
 * and act1's backward by pooling rows, each followed by conv1's weight gradient over its two
 * rows (conv2_bwd_band). Every weight's sum runs over the rows in the order of the
 * stage-by-stage loops. (Interleaving the two passes missed more: conv2's 77 KB of weight
 * partials and the rows of x were evicted between the rows.) */
static void conv_backward_rows(chunk *c, ln_ws *ws, int relu, int maxpool)
{
    for (int py = 0; py < Q2; py++) {
        for (int m = 0; m < C2; m++)
            act_pool_bwd(c->dp2, c->a2, c->a2, H2, H2, 0, NULL, c->rs + RS2A, c->rs + RS2B, m * Q2 + py,
                         m * Q2 + py + 1, relu, maxpool);
        conv2_wgrad(c->p1, c->a2, ws->pw2, 0, conv2_wgrad_UNITS, 2 * py, 2 * py + 2);
    }
    for (int py = 0; py < Q1; py++) {
        conv2_bwd_band(c, ws->w2t, py, py + 1, 0, 1, 0, relu, maxpool);
        conv1_wgrad(c->x, c->a1, ws->pw1, 0, conv1_wgrad_UNITS, 2 * py, 2 * py + 2);
    }
}

/* Every stage's outputs are split between the threads by ownership (share): each activation,
 * gradient, weight-gradient and optimiser-state element is computed by one thread, with the
 * arithmetic and in the order of the single-threaded step (register tiles are never split, a
 * sum over the batch or over pixels stays inside its owner's loop, and the per-row sums of the
 * activation backward are added up in the old order by sum_rows). So the results are the same
 * bits for any thread count, and the same as the single-threaded step's before the threads.
 * A barrier (SYNC) stands wherever a stage reads another thread's outputs: 12 per step of one
 * chunk without batch norm, 7 more per further chunk (6 with batch norm), 4 more with batch
 * norm. Small stages run on one thread: fc3, the loss and fc3's gradients (~10 us), conv2's
 * weight flip. On one thread without batch norm the conv layers run their own row-by-row
 * order (conv1_rows, conv2_rows, conv_backward_rows): the same arithmetic, in a schedule that
 * keeps each activation's rows in cache from the stage that writes them to the one that reads
 * them; on several the stages keep their partition (a row pipeline there would need a barrier
 * per row). */
static void step_job(void *arg, int t, int T)
{
    step_ctx *X = arg;
    ln_ws *ws = X->ws;
    const ln_args *A = X->a;
    float *const *P = A->params;
    float *grad = ws->grad;
    chunk *ch = ws->ch;
    const int nch = X->nch, bn = X->bn, relu = A->relu, maxpool = A->maxpool;
    const int64_t *idx = A->idx;
    barrier_t *bar = &ws->pool.bar;
    float K1[C1], K2[C2]; /* bn_row_sums' shifts of conv1's and conv2's maps */
    int lo, hi;
#define SYNC() (PROF_ARRIVE(t), barrier_wait(bar, T), PROF_LEAVE(t))
    PROF_START(t);

    /* The images packed by 16-lane groups, the dropout scales transposed by rows, conv2's
     * weights flipped and transposed for its input gradient. */
    share(nch * LANE_GROUPS, t, T, &lo, &hi);
    for (int u = lo; u < hi; u++) {
        const int k = u / LANE_GROUPS, b0 = u % LANE_GROUPS * 16;
        pack_input(&ch[k], A->x, idx, (int64_t)k * BATCH, &X->aug, b0);
    }
    if (A->drop) {
        share(nch * F1, t, T, &lo, &hi);
        for (int u = lo; u < hi; u++) {
            chunk *c = &ch[u / F1];
            const int k = u / F1, o = u % F1;
            for (int b = 0; b < BATCH; b++)
                c->drop[o * BATCH + b] = b < c->n ? A->drop[((int64_t)k * BATCH + b) * F1 + o] : 0.f;
        }
    }
    if (t == T - 1)
        for (int o = 0; o < C2; o++)
            for (int c = 0; c < C1; c++)
                for (int i = 0; i < 25; i++)
                    ws->w2t[(c * C2 + o) * 25 + 24 - i] = P[P_C2W][(o * C1 + c) * 25 + i];
    SYNC();
    PROF(t, S_PACK);

    /* conv1 by pooling rows (block row py: conv1 rows 2py and 2py + 1 of all maps), conv2 by
     * (register tile of output maps, pooling row): without batch norm each into a1 or a2,
     * activated and pooled in place while in cache (conv1_rows, conv2_rows); with batch norm
     * into z1 or z2, activated and pooled by channels after the statistics. On one thread
     * without batch norm conv2's pooling row runs as soon as conv1 has made the p1 rows under
     * it. */
    if (!bn && T == 1) {
        for (int k = 0; k < nch; k++)
            for (int py = 0; py < Q1; py++) {
                conv1_rows(&ch[k], P, py, relu, maxpool);
                if (py >= 5 && py % 2) /* p1 rows 2 py2 .. 2 py2 + 5 are made: conv2's row py2 */
                    for (int u = (py - 5) / 2; u < C2 / CONV2_OCB * Q2; u += Q2)
                        conv2_rows(&ch[k], P, u, NULL, relu, maxpool);
            }
        PROF(t, S_CONV1);
    } else {
        share(Q1, t, T, &lo, &hi);
        if (bn)
            bn_shift(ch[0].x, 1, XP, 14, C1, P[P_C1W], P[P_C1B], K1); /* conv1's (14, 14), padded */
        for (int k = 0; k < nch; k++)
            for (int py = lo; py < hi; py++) {
                if (bn) {
                    conv1_fwd(ch[k].x, P[P_C1W], P[P_C1B], ch[k].z1, 2 * py, 2 * py + 2, 0, C1);
                    bn_row_sums(&ch[k], ch[k].z1, H1, K1, ch[k].rs + RS1A, ch[k].rs + RS1B, 0, C1, 2 * py,
                                2 * py + 2);
                } else
                    conv1_rows(&ch[k], P, py, relu, maxpool);
            }
        SYNC();
        PROF(t, S_CONV1);
        if (bn) {
            share(C1, t, T, &lo, &hi);
            bn_layer_fwd(ch, nch, 1, H1, P, A->run, A->nbt[0], A->bn_eps, A->bn_momentum,
                         (int64_t)X->B * H1 * H1, K1, X->istd1, relu, maxpool, lo, hi, t == 0);
            SYNC();
            bn_shift(ch[0].p1, C1, Q1, 5, C2, P[P_C2W], P[P_C2B], K2); /* every thread alike: no barrier */
        }
        PROF(t, S_BN1);
        share(C2 / CONV2_OCB * Q2, t, T, &lo, &hi);
        for (int k = 0; k < nch; k++)
            for (int u = lo; u < hi; u++)
                conv2_rows(&ch[k], P, u, bn ? K2 : NULL, relu, maxpool);
    }
    SYNC();
    PROF(t, S_CONV2);
    if (bn) {
        share(C2, t, T, &lo, &hi);
        bn_layer_fwd(ch, nch, 2, H2, P, A->run, A->nbt[1], A->bn_eps, A->bn_momentum, (int64_t)X->B * H2 * H2,
                     K2, X->istd2, relu, maxpool, lo, hi, t == 0);
        SYNC();
    }
    PROF(t, S_BN2);

    /* The classifier, chunk by chunk (its weight gradients add up over the chunks in order),
     * each layer by blocks of its outputs. */
    for (int k = 0; k < nch; k++) {
        chunk *c = &ch[k];
        /* fc1 with its dropout and activation; p2 transposed for fc1's weight gradient */
        share(F1 / LIN_OB, t, T, &lo, &hi);
        int r0 = lo * LIN_OB, r1 = hi * LIN_OB;
        linear_fwd(c->p2, P[P_F1W], P[P_F1B], c->a3, r0, r1, FEAT, FEAT, 1);
        if (A->drop)
            for (int i = r0 * BATCH; i < r1 * BATCH; i += VW)
                ST(c->a3 + i, LD(c->a3 + i) * LD(c->drop + i));
        act_inplace(c->a3 + r0 * BATCH, (r1 - r0) * BATCH, relu);
        share(FEAT / 16, t, T, &lo, &hi);
        transpose_rows(c->p2, ws->featT, FEAT, 16 * lo, 16 * hi);
        SYNC();
        share(F2 / LIN_OB, t, T, &lo, &hi);
        r0 = lo * LIN_OB, r1 = hi * LIN_OB;
        linear_fwd(c->a3, P[P_F2W], P[P_F2B], c->a4, r0, r1, F1, F1, 1);
        act_inplace(c->a4 + r0 * BATCH, (r1 - r0) * BATCH, relu);
#if F1_FITS_VECTORS
        share(F1 / 8, t, T, &lo, &hi);
        transpose_rows(c->a3, ws->a3T, F1, 8 * lo, 8 * hi);
#endif
        SYNC();
        if (t == 0) { /* fc3, the loss and fc3's gradients */
            int64_t labels[BATCH];
            linear_fwd10(c->a4, P[P_F3W], P[P_F3B], c->lg, 0, F3, F2, F2, 1);
            for (int b = 0; b < c->n; b++)
                labels[b] = A->y[idx ? idx[k * BATCH + b] : k * BATCH + b];
            loss_fwd_bwd(c, labels, 1.0 / X->B, A->smoothing, A->totals);
            linear_wgrad10(c->dlg, c->a4, grad + goff(P_F3W), 0, F3, F2);
            bias_grad(c->dlg, grad + goff(P_F3B), F3);
        }
        SYNC();
        PROF(t, S_CLSF);
        /* by blocks of 4 of fc2's outputs: their gradient, through the activation, and fc2's
         * weight and bias gradients for them */
        share(F2 / 4, t, T, &lo, &hi);
        r0 = 4 * lo, r1 = 4 * hi;
        linear_bwd_input84(c->dlg, P[P_F3W], NULL, c->da4, r0, r1, F3, 1, F2);
        act_bwd(c->da4 + r0 * BATCH, c->a4 + r0 * BATCH, NULL, (r1 - r0) * BATCH, relu);
#if F1_FITS_VECTORS
        fc2_wgrad(c->da4, ws->a3T, grad + goff(P_F2W), c->n, r0, r1);
#else
        linear_wgrad(c->da4, c->a3, grad + goff(P_F2W), r0, r1, F1);
#endif
        bias_grad(c->da4 + r0 * BATCH, grad + goff(P_F2B) + r0, r1 - r0);
        SYNC();
        /* likewise fc1's outputs, through the activation and dropout */
        share(F1 / DA3_ROWS, t, T, &lo, &hi);
        r0 = DA3_ROWS * lo, r1 = DA3_ROWS * hi;
        linear_bwd_input(c->da4, P[P_F2W], NULL, c->da3, r0, r1, F2, 1, F1);
        act_bwd(c->da3 + r0 * BATCH, c->a3 + r0 * BATCH, A->drop ? c->drop + r0 * BATCH : NULL,
                (r1 - r0) * BATCH, relu);
        fc1_wgrad(c->da3, ws->featT, grad + goff(P_F1W), c->n, r0, r1);
        bias_grad(c->da3 + r0 * BATCH, grad + goff(P_F1B) + r0, r1 - r0);
        SYNC();
        /* the gradient w.r.t. the pooled conv2 maps */
        share(FEAT / LINI_OB, t, T, &lo, &hi);
        linear_bwd_input(c->da3, P[P_F1W], NULL, c->dp2, lo * LINI_OB, hi * LINI_OB, F1, 1, FEAT);
        SYNC();
        PROF(t, S_CLSB);
    }

    /* act2 backward by pooling rows, its gradient into a2 in place; with batch norm then its
     * backward by channels. conv2's weight gradient by register tiles of weights; conv2's
     * input gradient and act1's backward by rows (conv2_bwd_band); without batch norm conv1's
     * weight gradient by register tiles, after a barrier (each tile reads every row). On one
     * thread without batch norm all of them run row by row (conv_backward_rows). */
    if (!bn && T == 1) {
        for (int k = 0; k < nch; k++)
            conv_backward_rows(&ch[k], ws, relu, maxpool);
        conv2_wgrad_finish(ws->pw2, grad + goff(P_C2W), 0, conv2_wgrad_UNITS);
        for (int c = 0; c < C2; c++)
            grad[goff(P_C2B) + c] += (float)sum_rows(ch, nch, RS2A, c, H2, maxpool ? Q2 : H2);
        lo = 0, hi = conv1_wgrad_UNITS;
        PROF(t, S_BACK2);
    } else {
        share(C2 * Q2, t, T, &lo, &hi);
        for (int k = 0; k < nch; k++)
            act_pool_bwd(ch[k].dp2, ch[k].a2, ch[k].a2, H2, H2, 0, bn ? ch[k].z2 : NULL, ch[k].rs + RS2A,
                         ch[k].rs + RS2B, lo, hi, relu, maxpool);
        SYNC();
        PROF(t, S_ACT2B);
        if (bn) {
            share(C2, t, T, &lo, &hi);
            bn_layer_bwd(ch, nch, 2, P, grad, X->istd2, (int64_t)X->B * H2 * H2, maxpool, lo, hi);
            SYNC();
        }
        PROF(t, S_BN2B);
        share(conv2_wgrad_UNITS, t, T, &lo, &hi);
        for (int k = 0; k < nch; k++)
            conv2_wgrad(ch[k].p1, ch[k].a2, ws->pw2, lo, hi, 0, H2);
        conv2_wgrad_finish(ws->pw2, grad + goff(P_C2W), lo, hi);
        if (!bn && t == 0)
            for (int c = 0; c < C2; c++)
                grad[goff(P_C2B) + c] += (float)sum_rows(ch, nch, RS2A, c, H2, maxpool ? Q2 : H2);
        share(conv1_wgrad_UNITS, t, T, &lo, &hi);
        for (int k = 0; k < nch; k++) {
            conv2_bwd_band(&ch[k], ws->w2t, 0, Q1, t, T, bn, relu, maxpool);
            if (!bn) {
                SYNC();
                conv1_wgrad(ch[k].x, ch[k].a1, ws->pw1, lo, hi, 0, H1);
            }
        }
        if (!bn)
            PROF(t, S_BACK2);
    }
    if (bn) {
        SYNC();
        PROF(t, S_BACK2);
        share(C1, t, T, &lo, &hi);
        bn_layer_bwd(ch, nch, 1, P, grad, X->istd1, (int64_t)X->B * H1 * H1, maxpool, lo, hi);
        SYNC();
        PROF(t, S_BN1B);
        share(conv1_wgrad_UNITS, t, T, &lo, &hi);
        for (int k = 0; k < nch; k++)
            conv1_wgrad(ch[k].x, ch[k].a1, ws->pw1, lo, hi, 0, H1);
    }
    /* conv1's weight gradient's sums; Adam's step counts advanced */
    conv1_wgrad_finish(ws->pw1, grad + goff(P_C1W), lo, hi);
    if (t == 0) {
        if (!bn)
            for (int c = 0; c < C1; c++)
                grad[goff(P_C1B) + c] += (float)sum_rows(ch, nch, RS1A, c, H1, maxpool ? Q1 : H1);
        if (A->optimizer != OPT_SGD)
            for (int s = 0; s < NPARAM; s++)
                if (P[s])
                    *A->steps[s] += 1.0f;
    }
    SYNC();
    PROF(t, S_WG1);

    /* the update by ranges of 16 elements of the slots laid end to end */
    share(goff(NPARAM) / 16, t, T, &lo, &hi);
    for (int s = 0; s < NPARAM; s++) {
        const int off = goff(s), i0 = 16 * lo > off ? 16 * lo - off : 0;
        const int i1 = 16 * hi - off < PSIZE[s] ? 16 * hi - off : PSIZE[s];
        if (!P[s] || i0 >= i1)
            continue;
        if (A->optimizer == OPT_SGD)
            sgd_update(P[s] + i0, grad + off + i0, A->s1[s] ? A->s1[s] + i0 : NULL, i1 - i0, A->lr, A->momentum,
                       A->weight_decay);
        else
            adam_update(P[s] + i0, grad + off + i0, A->s1[s] + i0, A->s2[s] + i0, i1 - i0, *A->steps[s],
                        A->optimizer == OPT_ADAMW, A->lr, A->beta1, A->beta2, A->eps, A->weight_decay);
    }
    PROF_ARRIVE(t); /* the update's end: the pool's barrier */
    PROF(t, S_UPD);
#undef SYNC
}

/* One training step on a batch of B images: forward, mean cross-entropy, backward, one update,
 * on a->threads threads (see ln_args for the fields). Returns 0, or -1 for an index out of
 * range, -2 for a label out of range, -3 out of memory, -4 for a batch size out of range
 * (nothing is changed then). */
int ln_train_step(ln_ws *ws, const ln_args *a)
{
    if (a->batch < 1 || a->batch > (1 << 24))
        return -4;
    const int B = (int)a->batch;
    for (int b = 0; b < B; b++) {
        const int64_t r = a->idx ? a->idx[b] : b;
        if (r < 0 || r >= a->rows)
            return -1;
        if (a->y[r] < 0 || a->y[r] >= F3)
            return -2;
    }
    const int nch = (B + BATCH - 1) / BATCH;
    if (ws_reserve(ws, nch))
        return -3;
    for (int k = 0; k < nch; k++)
        set_lanes(&ws->ch[k], B - k * BATCH < BATCH ? B - k * BATCH : BATCH);
    step_ctx X = {ws, a, {a->move, a->pad, a->erase_rows, a->erase_cols, (float)a->background}, nch, B,
                  a->params[P_BN1W] != NULL, {0}, {0}};
    pool_run(&ws->pool, a->threads, step_job, &X);
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

typedef struct {
    ln_ws *ws;
    const ln_args *a;
    const float *m1, *s1, *g1, *b1, *m2, *s2, *g2, *b2; /* each batch norm's affine map, or the identity */
} forward_ctx;

/* Thread t's run of 64-image chunks, in its own chunk buffers. */
static void forward_job(void *arg, int t, int T)
{
    const forward_ctx *X = arg;
    const ln_args *A = X->a;
    float *const *P = A->params;
    chunk *c = &X->ws->ch[t];
    const int relu = A->relu, maxpool = A->maxpool;
    const int64_t n = A->rows, chunks = (n + BATCH - 1) / BATCH;
    for (int64_t j = chunks * t / T; j < chunks * (t + 1) / T; j++) {
        const int64_t first = j * BATCH;
        set_lanes(c, n - first < BATCH ? (int)(n - first) : BATCH);
        for (int b0 = 0; b0 < BATCH; b0 += 16)
            pack_input(c, A->x, NULL, first, NULL, b0);
        /* each conv by pooling rows, activated and pooled while they are in cache */
        for (int py = 0; py < Q1; py++) {
            conv1_fwd(c->x, P[P_C1W], P[P_C1B], c->z1, 2 * py, 2 * py + 2, 0, C1);
            for (int m = 0; m < C1; m++)
                act_pool_fwd(c->z1, NULL, c->p1, H1, X->m1, X->s1, X->g1, X->b1, 0, m * Q1 + py, m * Q1 + py + 1,
                             relu, maxpool);
        }
        for (int py = 0; py < Q2; py++) {
            conv2_fwd(c->p1, P[P_C2W], P[P_C2B], c->z2, 2 * py, 2 * py + 2, 0, C2);
            for (int m = 0; m < C2; m++)
                act_pool_fwd(c->z2, NULL, c->p2, H2, X->m2, X->s2, X->g2, X->b2, 0, m * Q2 + py, m * Q2 + py + 1,
                             relu, maxpool);
        }
        linear_fwd(c->p2, P[P_F1W], P[P_F1B], c->a3, 0, F1, FEAT, FEAT, 1);
        act_inplace(c->a3, F1 * BATCH, relu);
        linear_fwd(c->a3, P[P_F2W], P[P_F2B], c->a4, 0, F2, F1, F1, 1);
        act_inplace(c->a4, F2 * BATCH, relu);
        linear_fwd10(c->a4, P[P_F3W], P[P_F3B], c->lg, 0, F3, F2, F2, 1);
        for (int b = 0; b < c->n; b++)
            for (int k = 0; k < F3; k++)
                A->out[(first + b) * F3 + k] = c->lg[k * BATCH + b];
    }
}

/* Eval-mode logits of a->rows images (a->x: (rows, 784)) into a->out (rows, 10): batch norm
 * with the running statistics (a->run, a->bn_eps), no dropout, a->relu and a->maxpool as for
 * the step, a->threads threads each on its own run of 64-image chunks (a row's logits do not
 * depend on the chunking), in workspace ws (its buffers and threads kept for the next call:
 * evaluation calls this per 500 images), or in a temporary one where ws is NULL. Returns 0, or
 * -3 out of memory. */
int ln_forward(ln_ws *ws, const ln_args *a)
{
    const int64_t chunks = (a->rows + BATCH - 1) / BATCH;
    if (chunks < 1)
        return 0;
    int threads = a->threads < 1 ? 1 : a->threads > LN_MAX_THREADS ? LN_MAX_THREADS : a->threads;
    if (threads > chunks)
        threads = (int)chunks;
    ln_ws *own = ws ? NULL : ln_ws_new();
    if (!ws)
        ws = own;
    if (!ws || ws_reserve(ws, threads)) {
        ln_ws_free(own);
        return -3;
    }
    float *const *P = a->params;
    float m1[C1], s1[C1], m2[C2], s2[C2];
    forward_ctx X = {ws, a, ZEROS, ONES, ONES, ZEROS, ZEROS, ONES, ONES, ZEROS};
    if (P[P_BN1W]) {
        for (int i = 0; i < C1; i++) {
            m1[i] = a->run[R_MEAN1][i];
            s1[i] = (float)(1.0 / sqrt((double)a->run[R_VAR1][i] + a->bn_eps));
        }
        for (int i = 0; i < C2; i++) {
            m2[i] = a->run[R_MEAN2][i];
            s2[i] = (float)(1.0 / sqrt((double)a->run[R_VAR2][i] + a->bn_eps));
        }
        X = (forward_ctx){ws, a, m1, s1, P[P_BN1W], P[P_BN1B], m2, s2, P[P_BN2W], P[P_BN2B]};
    }
    pool_run(&ws->pool, threads, forward_job, &X);
    ln_ws_free(own);
    return 0;
}
