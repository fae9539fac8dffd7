/* cache_driver.c: one concern, running the native library's training step STEPS times in a plain C
 * process, for cachegrind (benchmarks/cache_sim.py): no Python, torch or ctypes in the simulated
 * process, so its misses are the step's own.
 *
 * The step is a batch-64 baseline step (tanh, average pooling, no batch norm or dropout, Adam
 * at torch's defaults) on deterministic pseudo-random images, labels and weights (PyTorch's
 * default init range, U(-1/sqrt(fan_in), 1/sqrt(fan_in))): the same loops as a real baseline
 * step, the values not mattering to which lines it touches. Each step takes the next 64 rows
 * of a shuffled 4096-image set, as an epoch's batches do.
 *
 * Built as one translation unit with the step's source:
 *     cc FLAGS -DSTEP_SOURCE='"src/lenetlab/native/lenet5.c"' [-DLN_LEGACY] cache_driver.c -lm
 * (the root of the split source, whose #includes find its files beside it; or one old file).
 * -DLN_LEGACY calls a source from before the argument record (main e056921 and older) through
 * its own positional entry point. Usage: cache_driver STEPS [THREADS]; prints the summed loss
 * and correct count, so that the work cannot be optimised away and a run can be checked.
 */
#include STEP_SOURCE

#include <stdio.h>

enum { ROWS = 4096 };
static uint64_t rng_state = 0x9E3779B97F4A7C15u;

/* xorshift64*: a uniform float in [0, 1) */
static float urand(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (float)((rng_state * 0x2545F4914F6CDD1Du) >> 40) / (float)(1 << 24);
}

static float *vector_alloc(int n)
{
    float *p = aligned_alloc(64, ((size_t)n * sizeof(float) + 63) & ~(size_t)63);
    if (!p) {
        fprintf(stderr, "cache_driver: out of memory\n");
        exit(1);
    }
    memset(p, 0, (size_t)n * sizeof(float));
    return p;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: cache_driver STEPS [THREADS]\n");
        return 2;
    }
    const int steps = atoi(argv[1]), threads = argc > 2 ? atoi(argv[2]) : 1;
    /* each slot's fan-in (PSIZE order; the batch-norm slots stay NULL) */
    static const int FAN_IN[NPARAM] = {25, 25, 0, 0, 150, 150, 0, 0, 400, 400, 120, 120, 84, 84};
    float *P[NPARAM] = {0}, *s1[NPARAM] = {0}, *s2[NPARAM] = {0}, *count[NPARAM] = {0};
    float *run[4] = {0};
    int64_t *nbt[2] = {0};
    for (int s = 0; s < NPARAM; s++) {
        if (!FAN_IN[s])
            continue;
        P[s] = vector_alloc(PSIZE[s]);
        const float bound = 1.0f / sqrtf((float)FAN_IN[s]);
        for (int i = 0; i < PSIZE[s]; i++)
            P[s][i] = (2.0f * urand() - 1.0f) * bound;
        s1[s] = vector_alloc(PSIZE[s]);
        s2[s] = vector_alloc(PSIZE[s]);
        count[s] = vector_alloc(1);
    }
    float *x = vector_alloc(ROWS * IMGPIX);
    for (int i = 0; i < ROWS * IMGPIX; i++)
        x[i] = urand();
    int64_t *y = malloc(sizeof(int64_t) * ROWS), *order = malloc(sizeof(int64_t) * ROWS);
    for (int i = 0; i < ROWS; i++) {
        y[i] = (int64_t)(urand() * F3);
        order[i] = i;
    }
    for (int i = ROWS - 1; i > 0; i--) { /* Fisher-Yates */
        const int j = (int)(urand() * (float)(i + 1)), t = (int)order[i];
        order[i] = order[j];
        order[j] = t;
    }
    double totals[2] = {0, 0};
    ln_ws *ws = ln_ws_new();
    for (int k = 0; k < steps; k++) {
        const int64_t *idx = order + (size_t)k * BATCH % ROWS;
#ifdef LN_LEGACY
        (void)threads;
        const int rc = ln_train_step(ws, P, run, nbt, s1, s2, count, x, y, idx, ROWS, BATCH, NULL, 0.0, 0.0,
                                     OPT_ADAM, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, totals, 0, 0, 0.0,
                                     NULL, 0, NULL, NULL, 0.0);
#else
        const ln_args a = {.params = P, .run = run, .nbt = nbt, .s1 = s1, .s2 = s2, .steps = count,
                           .x = x, .y = y, .idx = idx, .totals = totals, .rows = ROWS, .batch = BATCH,
                           .lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8,
                           .optimizer = OPT_ADAM, .threads = threads};
        const int rc = ln_train_step(ws, &a);
#endif
        if (rc != 0) {
            fprintf(stderr, "cache_driver: ln_train_step returned %d\n", rc);
            return 1;
        }
    }
    ln_ws_free(ws);
    printf("steps %d loss %.6f correct %.0f\n", steps, totals[0], totals[1]);
    return 0;
}
