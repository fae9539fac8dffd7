/* transpose.c: one concern, 8x8 float transposes in registers and of [R][64] rows. */

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

/* in [R][64] -> out [64][R] for the rows [r0, r1) (multiples of 8), in 8 x 8 blocks: with
 * 256-bit vectors eight loads, 24 shuffles and eight stores per block, elsewhere element by
 * element within the block (both far faster than the element-by-element loop: docs/native.md). */
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
