#define _GNU_SOURCE
/*
 * pool.c -- a persistent pool of worker threads for one forward call at a
 * time.  No OpenMP runtime: nothing to fight with NumPy's or PyTorch's.
 *
 * - The calling thread is thread 0; workers 1..n-1 are created on first use.
 * - A call that finds the pool busy (another Python thread is inside a
 *   forward) runs on its own thread alone, so concurrent callers never
 *   oversubscribe the cores.
 * - Idle workers spin briefly (a back-to-back call starts in microseconds),
 *   then sleep on a condition variable (no CPU burnt between calls).
 * - fl_pool_barrier(): each thread raises its own arrival epoch (a cache
 *   line of its own) and waits for the others' (no shared counter), spinning
 *   with pause for ~40 us, then sleeping on a futex (Linux; sched_yield
 *   elsewhere), so a thread whose partner was descheduled on a busy machine
 *   stops burning the core.  The end of a call is the same arrival, with
 *   only the caller waiting.
 * - A job may carry a prefetch hint (fl_pool_run_pf): memory the next job
 *   will likely read, e.g. a stream's state, which the caller rewrites after
 *   each step.  Its workers prefetch it every FL_PF_EVERY idle spins, so the
 *   next step finds those lines in their cache instead of fetching them from
 *   the caller's core on its critical path (hidden 128, two threads: ~2% a
 *   step from Python).  Only prefetch instructions touch it: they cannot
 *   fault, and a line the caller writes again is fetched again.
 * - Congestion: the steps between two barriers are balanced, so a thread
 *   that waits there for more than FL_CONGESTED_NS (0.5 ms: a scheduler time
 *   slice, not noise) means a partner lost its core (other processes busy on
 *   the machine).  Each barrier then costs a scheduler time slice, and a
 *   hidden-split call runs several times slower than on one thread.  After a
 *   call that spent over a third of its time in such waits (two threads win
 *   until the waits reach ~half of the call: a long call that lost one time
 *   slice was still faster split) the pool runs calls on the calling thread
 *   alone for FL_SOLO_NS (10 ms), then tries again.  Measured on a shared
 *   2-core VM: with "any such wait" as the trigger, calls of ~100 ms
 *   (batch 8, hidden 1024) went solo after most calls and ran 0.8x the
 *   peers; short calls (streaming steps, batch 1) trigger either way.
 *   Results do not change: every thread split gives bitwise the same
 *   outputs.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#include "fl_internal.h"
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#define FL_HAVE_FUTEX 1
#endif

#define FL_IDLE_SPINS 4000     /* ~ tens of microseconds before sleeping */
#ifndef FL_PF_EVERY
#define FL_PF_EVERY 32         /* idle spins between two prefetches of the hint (a power of 2) */
#endif
#define FL_BARRIER_SPINS 2000  /* ~40 us (measured), then sleep in the kernel */
#define FL_SOLO_NS 10000000LL  /* single-threaded this long after a congested call */
#define FL_CONGESTED_NS 500000LL /* a barrier wait this long: a partner lost its core */

static pthread_mutex_t g_call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_sleep_cond = PTHREAD_COND_INITIALIZER;
static int g_nworkers = 0; /* guarded by g_call_lock */

/* Cache-line layout.  Between two cores a cache line moves in 70-280 ns on
 * the VMs we measure on (a ping-pong round trip: 140-570 ns), so what one
 * call moves between the cores is what a short call (a streaming step: a few
 * microseconds) pays for.  Every group below has a line of its own:
 *  - the job: written by the caller only, once per call (seq made odd, fn,
 *    arg, nt, base, then seq even); idle workers poll seq, so a call moves
 *    this line once;
 *  - one arrival epoch per thread: written by its thread only, read by the
 *    others in a barrier (a barrier moves each thread's line once, all in
 *    parallel: no shared counter that every arrival must own in turn);
 *  - the sleep counters and the congestion statistics: written rarely, read
 *    by every call from the caller's own cache.
 * (Before, all of these shared one line with the barrier counter: a step's
 * two barriers and the job publication bounced it between the cores several
 * times per call.) */
/* Test hook (tests/c/pool_stress.c): a pause while a job is half written,
 * which a worker must never act on.  0 (no pause) in every real build. */
#ifndef FL_POOL_PUBLISH_PAUSE_US
#define FL_POOL_PUBLISH_PAUSE_US 0
#endif

#define FL_LINE 64
static struct {
    _Alignas(FL_LINE) atomic_uint seq; /* job counter: +2 a job; odd while one is written */
    _Atomic(fl_task_fn) fn;
    void *_Atomic arg;
    atomic_int nt;
    atomic_ullong base; /* the participants' arrival epoch when the job starts */
    const void *_Atomic pf; /* a hint: memory the next job will likely read (fl_pool_run_pf) */
    atomic_size_t pfbytes;
} g_job;

/* Arrival epochs, 64 bits (never wrap).  Thread tid's epoch counts the
 * barriers it has arrived at; at a job's start every participant sets its own
 * to the job's base, so within a job all participants count alike.  wake is
 * the futex word a waiter sleeps on (futexes are 32 bits): bumped by its
 * thread on arrival when someone sleeps. */
typedef struct {
    _Alignas(FL_LINE) atomic_ullong epoch;
    atomic_uint wake;
} fl_arrival;
static fl_arrival g_arrival[FL_MAX_THREADS];

static struct {
    _Alignas(FL_LINE) atomic_int sleeping; /* idle workers asleep on g_sleep_cond */
    atomic_int bar_sleepers;               /* barrier waiters asleep on a futex */
} g_sleep;

static struct {
    _Alignas(FL_LINE) atomic_llong congested_ns; /* total of between-step barrier waits > FL_CONGESTED_NS */
    atomic_llong solo_until;     /* monotonic ns; calls run alone before it */
    atomic_uint congested_calls; /* calls after which the pool went solo */
} g_stat;

static long long mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* vDSO: ~20-50 ns, on slow paths only */
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

unsigned fl_pool_congested_calls(void) { return atomic_load(&g_stat.congested_calls); }

static void bar_sleep(atomic_uint *word, unsigned val)
{
#if defined(FL_HAVE_FUTEX)
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
#else
    (void)word; (void)val;
    sched_yield();
#endif
}

static void bar_wake(atomic_uint *word)
{
#if defined(FL_HAVE_FUTEX)
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)word;
#endif
}

static atomic_int g_default_threads;
static unsigned g_start_seq[FL_MAX_THREADS];

/* sysconf reads /sys on every call (microseconds): ask once. */
static atomic_int g_num_cpus;

int fl_num_cpus(void)
{
    int cached = atomic_load(&g_num_cpus);
    if (cached > 0) return cached;
    int n = 1;
#if defined(_SC_NPROCESSORS_ONLN)
    long v = sysconf(_SC_NPROCESSORS_ONLN);
    if (v >= 1) n = v > FL_MAX_THREADS ? FL_MAX_THREADS : (int)v;
#endif
    atomic_store(&g_num_cpus, n);
    return n;
}

int fl_num_threads_get(void)
{
    int n = atomic_load(&g_default_threads);
    return n > 0 ? n : fl_num_cpus();
}

void fl_num_threads_set(int n)
{
    if (n > FL_MAX_THREADS) n = FL_MAX_THREADS;
    atomic_store(&g_default_threads, n > 0 ? n : 0);
}

/* Arrive at the next barrier: raise this thread's epoch (seq_cst: ordered
 * before the read of the sleeper count, against a waiter's raise of that
 * count before its re-check; see wait_arrivals) and wake sleepers. */
static unsigned long long arrive_(int tid)
{
    unsigned long long e = atomic_load_explicit(&g_arrival[tid].epoch, memory_order_relaxed) + 1;
    atomic_store(&g_arrival[tid].epoch, e); /* release: this thread's writes before it */
    if (atomic_load(&g_sleep.bar_sleepers) > 0) {
        atomic_fetch_add(&g_arrival[tid].wake, 1);
        bar_wake(&g_arrival[tid].wake);
    }
    return e;
}

static int arrived_(int j, unsigned long long e)
{
    return (long long)(atomic_load_explicit(&g_arrival[j].epoch, memory_order_acquire) - e) >= 0;
}

/* Wait until threads 0..nthreads-1 (but tid) have arrived at epoch e: spin
 * with pause for ~40 us, then sleep on the futex of the one awaited (a
 * partner descheduled on a busy machine: stop burning the core). */
static void wait_arrivals_(int tid, int nthreads, unsigned long long e, int between_steps)
{
    long long t_sleep = 0;
    for (int j = 0; j < nthreads; j++) {
        if (j == tid) continue;
        int spins = 0;
        while (!arrived_(j, e)) {
            if (spins < FL_BARRIER_SPINS) {
                spins++;
                FL_PAUSE();
                continue;
            }
            if (!t_sleep) t_sleep = mono_ns();
            /* The sleeper count is raised before the epoch is re-read, and
             * the arriver raises its epoch before reading the count (both
             * seq_cst): either the arriver sees a sleeper and bumps wake
             * (the futex call then returns at once or is woken), or the
             * re-read below sees the arrival and we do not sleep. */
            unsigned w = atomic_load(&g_arrival[j].wake);
            atomic_fetch_add(&g_sleep.bar_sleepers, 1);
            if (!arrived_(j, e)) bar_sleep(&g_arrival[j].wake, w);
            atomic_fetch_sub(&g_sleep.bar_sleepers, 1);
        }
    }
    /* Steps are balanced: a wait of a scheduler time slice means the partner
     * was descheduled (ordinary imbalance and noise stay far below 0.5 ms). */
    if (t_sleep && between_steps) {
        long long w = mono_ns() - t_sleep;
        if (w >= FL_CONGESTED_NS) atomic_fetch_add(&g_stat.congested_ns, w);
    }
}

static void *worker_main(void *p)
{
    int tid = (int)(intptr_t)p;
    /* The job counter as it was when this worker was created (under the
     * call lock, before the job that created it was published). */
    unsigned seen = g_start_seq[tid];
    const char *pf = NULL; /* the last job's hint (see fl_pool_run_pf) */
    size_t pfbytes = 0;
    for (;;) {
        unsigned s;
        int spins = 0;
        while ((s = atomic_load_explicit(&g_job.seq, memory_order_acquire)) == seen || (s & 1u)) {
            if (spins < FL_IDLE_SPINS) {
                /* Idle: now and then fetch the hinted lines (a stream's state,
                 * rewritten by the caller after the job): a prefetch moves
                 * nothing the coherence protocol would not, so a line the
                 * caller writes again is simply fetched again later. */
                if (pf && (spins & (FL_PF_EVERY - 1)) == FL_PF_EVERY / 2)
                    for (size_t o = 0; o < pfbytes; o += 64) __builtin_prefetch(pf + o, 0, 3);
                spins++;
                FL_PAUSE();
                continue;
            }
            pthread_mutex_lock(&g_sleep_lock);
            atomic_fetch_add(&g_sleep.sleeping, 1);
            while (atomic_load(&g_job.seq) == seen) pthread_cond_wait(&g_sleep_cond, &g_sleep_lock);
            atomic_fetch_sub(&g_sleep.sleeping, 1);
            pthread_mutex_unlock(&g_sleep_lock);
        }
        /* Read the job, then check it is still job s (a seqlock): a worker
         * that is not in job s (tid >= nt) does not hold the caller back, so
         * the caller may already be writing the next job.  The caller makes
         * seq odd before it writes any field (release stores, ordered after
         * the odd seq) and even again after the last: a field of the next
         * job read here (acquire) makes the re-read below see seq changed,
         * so a job is run only with fields that are all its own.  (Before,
         * seq changed once, after the fields: a worker could read the next
         * job's fields with the old seq, run that job as job s, then run it
         * again as the next one; tests/c/pool_stress.c reproduced it.) */
        fl_task_fn fn = atomic_load_explicit(&g_job.fn, memory_order_acquire);
        void *arg = atomic_load_explicit(&g_job.arg, memory_order_acquire);
        int nt = atomic_load_explicit(&g_job.nt, memory_order_acquire);
        unsigned long long base = atomic_load_explicit(&g_job.base, memory_order_acquire);
        const char *jpf = (const char *)atomic_load_explicit(&g_job.pf, memory_order_acquire);
        size_t jpfbytes = atomic_load_explicit(&g_job.pfbytes, memory_order_acquire);
        if (atomic_load_explicit(&g_job.seq, memory_order_relaxed) != s) continue; /* seen unchanged: reread */
        seen = s;
        if (tid < nt) {
            /* Nobody reads this thread's epoch before it arrives in job s
             * (the caller waits for an epoch above base). */
            atomic_store_explicit(&g_arrival[tid].epoch, base, memory_order_relaxed);
            fn(arg, tid, nt);
            arrive_(tid); /* the caller returns once every participant is here */
            pf = jpf;
            pfbytes = jpfbytes;
        } else {
            pf = NULL;
        }
    }
    return NULL;
}

/* The barrier between steps (tasks call this one). */
void fl_pool_barrier(int tid, int nthreads)
{
    if (nthreads <= 1) return;
    unsigned long long e = arrive_(tid);
    wait_arrivals_(tid, nthreads, e, 1);
}

/* After fork() only the forking thread exists in the child: forget the
 * workers (they are recreated on demand) and reset the locks. */
static void pool_atfork_child(void)
{
    pthread_mutex_init(&g_call_lock, NULL);
    pthread_mutex_init(&g_sleep_lock, NULL);
    pthread_cond_init(&g_sleep_cond, NULL);
    g_nworkers = 0;
    atomic_store(&g_sleep.sleeping, 0);
    /* A fork while another thread was publishing a job leaves seq odd: the
     * child's workers would wait for it to turn even, and the next job's
     * +1 / +2 would swap the parity.  Round it up (no job is running here). */
    unsigned seq = atomic_load(&g_job.seq);
    atomic_store(&g_job.seq, seq + (seq & 1u));
}

static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;
static void pool_register_atfork(void) { pthread_atfork(NULL, NULL, pool_atfork_child); }

int fl_pool_run(fl_task_fn fn, void *arg, int nthreads) { return fl_pool_run_pf(fn, arg, nthreads, NULL, 0); }

int fl_pool_run_pf(fl_task_fn fn, void *arg, int nthreads, const void *pf, size_t pfbytes)
{
    if (nthreads > FL_MAX_THREADS) nthreads = FL_MAX_THREADS;
    pthread_once(&g_atfork_once, pool_register_atfork);
    if (nthreads > 1 && atomic_load_explicit(&g_stat.solo_until, memory_order_relaxed) != 0) {
        if (mono_ns() < atomic_load(&g_stat.solo_until)) nthreads = 1; /* congested: alone */
        else atomic_store(&g_stat.solo_until, 0);
    }
    if (nthreads <= 1 || pthread_mutex_trylock(&g_call_lock) != 0) {
        fn(arg, 0, 1);
        return 1;
    }
    while (g_nworkers < nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        g_start_seq[g_nworkers + 1] = atomic_load(&g_job.seq);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)(g_nworkers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        g_nworkers++;
    }
    if (nthreads > g_nworkers + 1) nthreads = g_nworkers + 1;
    if (nthreads <= 1) {
        pthread_mutex_unlock(&g_call_lock);
        fn(arg, 0, 1);
        return 1;
    }
    /* The caller is thread 0 of every job (whichever Python thread it is):
     * its epoch is the pool's, and every participant starts from it. */
    unsigned long long base = atomic_load_explicit(&g_arrival[0].epoch, memory_order_relaxed);
    /* Publish (seqlock, see worker_main): seq odd, the fields, seq even.
     * Only the holder of the call lock writes seq. */
    unsigned seq0 = atomic_load_explicit(&g_job.seq, memory_order_relaxed);
    atomic_store_explicit(&g_job.seq, seq0 + 1u, memory_order_relaxed);
    atomic_store_explicit(&g_job.fn, fn, memory_order_release);
    atomic_store_explicit(&g_job.arg, arg, memory_order_release);
    atomic_store_explicit(&g_job.nt, nthreads, memory_order_release);
    atomic_store_explicit(&g_job.base, base, memory_order_release);
    atomic_store_explicit(&g_job.pf, pf, memory_order_release);
    atomic_store_explicit(&g_job.pfbytes, pf ? pfbytes : 0, memory_order_release);
#if FL_POOL_PUBLISH_PAUSE_US > 0
    usleep(FL_POOL_PUBLISH_PAUSE_US); /* test builds only: widen the window */
#endif
    atomic_store_explicit(&g_job.seq, seq0 + 2u, memory_order_seq_cst); /* publishes the fields */
    if (atomic_load(&g_sleep.sleeping) > 0) {
        pthread_mutex_lock(&g_sleep_lock);
        pthread_cond_broadcast(&g_sleep_cond);
        pthread_mutex_unlock(&g_sleep_lock);
    }
    long long waits0 = atomic_load_explicit(&g_stat.congested_ns, memory_order_relaxed), t0 = mono_ns();
    fn(arg, 0, nthreads);
    /* Wait for the workers (this wait may be long when the split is uneven:
     * it does not count as congestion).  The workers do not wait for us. */
    unsigned long long e = arrive_(0);
    wait_arrivals_(0, nthreads, e, 0);
    long long waited = atomic_load(&g_stat.congested_ns) - waits0;
    if (waited > 0) {
        long long t1 = mono_ns();
        if (3 * waited > t1 - t0) { /* several threads' waits can add up */
            atomic_store(&g_stat.solo_until, t1 + FL_SOLO_NS);
            atomic_fetch_add(&g_stat.congested_calls, 1);
        }
    }
    pthread_mutex_unlock(&g_call_lock);
    return nthreads;
}
