/*
 * The pool's job publication under a widened race window: built with
 * -DFL_POOL_PUBLISH_PAUSE_US=50 (pool.c pauses while a job is half written),
 * natively and under ThreadSanitizer by .ci/tsan.sh.
 *
 * Jobs of 2, 3 and 4 threads in turn, each with an argument of its own that
 * stays allocated to the end, so a worker that runs a job it is not part of,
 * runs one twice (the bug the seqlock fixed: a worker left out of one job
 * read the next job's fields with the old counter, ran it, then ran it again)
 * or sees the wrong thread count leaves a trace that is checked after all
 * jobs, once the workers have gone idle.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "fl_internal.h"

typedef struct {
    atomic_int ran[FL_MAX_THREADS];
    atomic_int wrong_nt;
    int nt;
} job_t;

static void task(void *arg, int tid, int nt)
{
    job_t *j = (job_t *)arg;
    atomic_fetch_add(&j->ran[tid], 1);
    if (nt != j->nt) atomic_fetch_add(&j->wrong_nt, 1);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 4000;
    job_t *jobs = calloc((size_t)n, sizeof *jobs);
    if (!jobs) return 2;
    for (int k = 0; k < n; k++) {
        int want = 2 + k % 3;
        jobs[k].nt = want;
        int used = fl_pool_run(task, &jobs[k], want);
        if (used != want) jobs[k].nt = used; /* ran alone: task saw nt = 1 */
        if (used != want && used != 1) { printf("job %d: %d threads of %d\n", k, used, want); return 1; }
    }
    usleep(100000); /* a late, wrong run would land by now */
    int bad = 0;
    for (int k = 0; k < n; k++) {
        for (int t = 0; t < FL_MAX_THREADS; t++) {
            int r = atomic_load(&jobs[k].ran[t]), want = t < jobs[k].nt ? 1 : 0;
            if (r != want && bad++ < 10) printf("job %d (nt %d): thread %d ran it %d times\n", k, jobs[k].nt, t, r);
        }
        if (atomic_load(&jobs[k].wrong_nt) && bad++ < 10) printf("job %d: a thread saw the wrong nt\n", k);
    }
    printf("pool publication: %d jobs of 2-4 threads, %s\n", n, bad ? "FAILED" : "ok");
    free(jobs);
    return bad != 0;
}
