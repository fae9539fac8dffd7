/* threadpool.c: one concern, the pool of threads a call runs on, its barrier and the split of
 * work between threads. */

/* ------------------------------------------------------------------------------------------
 * Threads: a small pool kept in the workspace, started on the first call that asks for more
 * than one thread and joined by ln_ws_free. A call is one job: every thread runs the same
 * stage code on its own share of each stage's outputs, and the threads meet at a barrier
 * wherever a stage reads what another thread wrote (see step_job for why the results do not
 * depend on the thread count). pthreads, not OpenMP: torch ships its own OpenMP runtime, which
 * a second one in the process would fight, and clang would need libomp.
 * ------------------------------------------------------------------------------------------ */
/* How long a barrier spins before it sleeps: well above a stage's imbalance between two
 * running threads (a few us), short enough that a thread whose partner was descheduled on a
 * busy machine soon gives its core back. A worker waiting for the next job spins longer, over
 * the Python between two steps (a fraction of a millisecond), so that a step does not start
 * by waking it (tens of microseconds); between epochs it sleeps. */
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
