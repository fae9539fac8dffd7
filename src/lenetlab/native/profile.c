/* profile.c: one concern, per-stage times of a step in a -DLN_PROFILE build. */

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
