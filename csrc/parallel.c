/* A fork-join loop over contiguous index ranges with pthreads. */
#include <pthread.h>
#include <stdlib.h>

#include "internal.h"

#define MAX_THREADS 256

typedef struct range_job {
    wanrt_range_fn fn;
    void *ctx;
    int64_t begin, end;
} range_job;

static void *run_range(void *arg) {
    range_job *job = arg;
    job->fn(job->ctx, job->begin, job->end);
    return NULL;
}

void wanrt_parallel_for(int64_t n, int64_t min_per_thread, int n_threads, wanrt_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (n_threads <= 0) n_threads = wanrt_cpu_count();
    if (min_per_thread < 1) min_per_thread = 1;
    int64_t useful = (n + min_per_thread - 1) / min_per_thread;
    int k = n_threads;
    if (k > useful) k = (int)useful;
    if (k > MAX_THREADS) k = MAX_THREADS;
    if (k <= 1) {
        fn(ctx, 0, n);
        return;
    }
    range_job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < k; ++i) {
        jobs[i] = (range_job){fn, ctx, n * i / k, n * (i + 1) / k};
    }
    for (int i = 1; i < k; ++i) {
        started[i] = pthread_create(&ids[i], NULL, run_range, &jobs[i]) == 0;
    }
    run_range(&jobs[0]);
    for (int i = 1; i < k; ++i) {
        if (started[i]) {
            pthread_join(ids[i], NULL);
        } else {
            run_range(&jobs[i]);
        }
    }
}
