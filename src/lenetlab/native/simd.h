/* simd.h: one concern, the vector type of this build and its few helpers (load, store, splat,
 * select, min/max, horizontal sum), chosen from the target's width at compile time. */

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
 * conv1) and then spills them; hiding the weight pointer from it per tile more than doubled
 * conv1 forward's rate (docs/native.md). */
#define OPAQUE(p) __asm__ volatile("" : "+r"(p))

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

#define INLINE static inline __attribute__((always_inline))
