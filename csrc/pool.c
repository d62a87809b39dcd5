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
 * - fl_pool_barrier(): counter + generation, spin with pause for ~40 us,
 *   then sleep on a futex (Linux; sched_yield elsewhere), so a thread whose
 *   partner was descheduled on a busy machine stops burning the core.
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
#if defined(FL_X86)
#include <immintrin.h>
#define FL_PAUSE() _mm_pause()
#else
#define FL_PAUSE() ((void)0)
#endif

#define FL_IDLE_SPINS 4000     /* ~ tens of microseconds before sleeping */
#define FL_BARRIER_SPINS 2000  /* ~40 us (measured), then sleep in the kernel */
#define FL_SOLO_NS 10000000LL  /* single-threaded this long after a congested call */
#define FL_CONGESTED_NS 500000LL /* a barrier wait this long: a partner lost its core */

static pthread_mutex_t g_call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_sleep_cond = PTHREAD_COND_INITIALIZER;
static int g_nworkers = 0; /* guarded by g_call_lock */

static fl_task_fn g_fn;
static void *g_arg;
static int g_nt;
static atomic_uint g_seq;
static atomic_int g_sleeping;

static atomic_int g_bar_count;
static atomic_uint g_bar_gen;
static atomic_int g_bar_sleepers;
static atomic_llong g_congested_ns;   /* total of between-step barrier waits > FL_CONGESTED_NS */
static atomic_llong g_solo_until;     /* monotonic ns; calls run alone before it */
static atomic_uint g_congested_calls; /* calls after which the pool went solo */

static long long mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* vDSO: ~20-50 ns, on slow paths only */
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

unsigned fl_pool_congested_calls(void) { return atomic_load(&g_congested_calls); }

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

static void barrier_(int nthreads, int between_steps);

static void *worker_main(void *p)
{
    int tid = (int)(intptr_t)p;
    /* The job counter as it was when this worker was created (under the
     * call lock, before the job that created it was published). */
    unsigned seen = g_start_seq[tid];
    for (;;) {
        unsigned s;
        int spins = 0;
        while ((s = atomic_load_explicit(&g_seq, memory_order_acquire)) == seen) {
            if (spins < FL_IDLE_SPINS) {
                spins++;
                FL_PAUSE();
                continue;
            }
            pthread_mutex_lock(&g_sleep_lock);
            atomic_fetch_add(&g_sleeping, 1);
            while (atomic_load(&g_seq) == seen) pthread_cond_wait(&g_sleep_cond, &g_sleep_lock);
            atomic_fetch_sub(&g_sleeping, 1);
            pthread_mutex_unlock(&g_sleep_lock);
        }
        seen = s;
        if (tid < g_nt) {
            int nt = g_nt;
            g_fn(g_arg, tid, nt);
            barrier_(nt, 0); /* the caller returns once everyone is here */
        }
    }
    return NULL;
}

static void barrier_(int nthreads, int between_steps)
{
    if (nthreads <= 1) return;
    unsigned gen = atomic_load(&g_bar_gen);
    if (atomic_fetch_add(&g_bar_count, 1) == nthreads - 1) {
        atomic_store(&g_bar_count, 0);
        atomic_fetch_add(&g_bar_gen, 1);
        if (atomic_load(&g_bar_sleepers) > 0) bar_wake(&g_bar_gen);
        return;
    }
    int spins = 0;
    long long t_sleep = 0;
    while (atomic_load(&g_bar_gen) == gen) {
        if (spins < FL_BARRIER_SPINS) {
            spins++;
            FL_PAUSE();
        } else {
            if (!t_sleep) t_sleep = mono_ns();
            /* sleepers is raised before the generation is re-read (inside the
             * futex call, atomically), so the last arriver either sees it and
             * wakes us, or we see the new generation and do not sleep. */
            atomic_fetch_add(&g_bar_sleepers, 1);
            bar_sleep(&g_bar_gen, gen);
            atomic_fetch_sub(&g_bar_sleepers, 1);
        }
    }
    /* Steps are balanced: a wait of a scheduler time slice means the partner
     * was descheduled (ordinary imbalance and noise stay far below 0.5 ms). */
    if (t_sleep && between_steps) {
        long long w = mono_ns() - t_sleep;
        if (w >= FL_CONGESTED_NS) atomic_fetch_add(&g_congested_ns, w);
    }
}

/* The barrier between steps (tasks call this one). */
void fl_pool_barrier(int nthreads) { barrier_(nthreads, 1); }

/* After fork() only the forking thread exists in the child: forget the
 * workers (they are recreated on demand) and reset the locks. */
static void pool_atfork_child(void)
{
    pthread_mutex_init(&g_call_lock, NULL);
    pthread_mutex_init(&g_sleep_lock, NULL);
    pthread_cond_init(&g_sleep_cond, NULL);
    g_nworkers = 0;
    atomic_store(&g_sleeping, 0);
}

static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;
static void pool_register_atfork(void) { pthread_atfork(NULL, NULL, pool_atfork_child); }

int fl_pool_run(fl_task_fn fn, void *arg, int nthreads)
{
    if (nthreads > FL_MAX_THREADS) nthreads = FL_MAX_THREADS;
    pthread_once(&g_atfork_once, pool_register_atfork);
    if (nthreads > 1 && atomic_load_explicit(&g_solo_until, memory_order_relaxed) != 0) {
        if (mono_ns() < atomic_load(&g_solo_until)) nthreads = 1; /* congested: alone */
        else atomic_store(&g_solo_until, 0);
    }
    if (nthreads <= 1 || pthread_mutex_trylock(&g_call_lock) != 0) {
        fn(arg, 0, 1);
        return 1;
    }
    while (g_nworkers < nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        g_start_seq[g_nworkers + 1] = atomic_load(&g_seq);
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
    g_fn = fn;
    g_arg = arg;
    g_nt = nthreads;
    atomic_store(&g_bar_count, 0);
    atomic_fetch_add_explicit(&g_seq, 1, memory_order_seq_cst);
    if (atomic_load(&g_sleeping) > 0) {
        pthread_mutex_lock(&g_sleep_lock);
        pthread_cond_broadcast(&g_sleep_cond);
        pthread_mutex_unlock(&g_sleep_lock);
    }
    long long waits0 = atomic_load(&g_congested_ns), t0 = mono_ns();
    fn(arg, 0, nthreads);
    /* Wait for the workers (this wait may be long when the split is uneven:
     * it does not count as congestion). */
    barrier_(nthreads, 0);
    long long waited = atomic_load(&g_congested_ns) - waits0;
    if (waited > 0) {
        long long t1 = mono_ns();
        if (3 * waited > t1 - t0) { /* several threads' waits can add up */
            atomic_store(&g_solo_until, t1 + FL_SOLO_NS);
            atomic_fetch_add(&g_congested_calls, 1);
        }
    }
    pthread_mutex_unlock(&g_call_lock);
    return nthreads;
}
