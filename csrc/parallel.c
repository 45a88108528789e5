/* A fork-join loop over index ranges with pthreads. Threads claim chunks from a
 * shared counter rather than taking fixed shares, so a thread the OS deschedules
 * (a busy machine) delays the whole call by one chunk, not by its share. */
#include <pthread.h>
#include <stdatomic.h>

#include "internal.h"

#define MAX_THREADS 256
/* Chunks per thread: enough to even out stragglers, few enough to keep claims cheap. */
#define CHUNKS_PER_THREAD 8

typedef struct shared_loop {
    wanrt_range_fn fn;
    void *ctx;
    int64_t n, chunk;
    _Atomic int64_t next;
} shared_loop;

static void *run_chunks(void *arg) {
    shared_loop *loop = arg;
    for (;;) {
        const int64_t begin = atomic_fetch_add(&loop->next, loop->chunk);
        if (begin >= loop->n) break;
        const int64_t end = begin + loop->chunk < loop->n ? begin + loop->chunk : loop->n;
        loop->fn(loop->ctx, begin, end);
    }
    return NULL;
}

void wanrt_parallel_for(int64_t n, int64_t min_per_thread, int n_threads, wanrt_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (n_threads <= 0) n_threads = wanrt_cpu_count();
    if (min_per_thread < 1) min_per_thread = 1;
    const int64_t useful = (n + min_per_thread - 1) / min_per_thread;
    int k = n_threads;
    if (k > useful) k = (int)useful;
    if (k > MAX_THREADS) k = MAX_THREADS;
    if (k <= 1) {
        fn(ctx, 0, n);
        return;
    }
    int64_t chunk = (n + (int64_t)k * CHUNKS_PER_THREAD - 1) / ((int64_t)k * CHUNKS_PER_THREAD);
    const int64_t min_chunk = (min_per_thread + CHUNKS_PER_THREAD - 1) / CHUNKS_PER_THREAD;
    if (chunk < min_chunk) chunk = min_chunk;
    shared_loop loop = {fn, ctx, n, chunk, 0};
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 1; i < k; ++i) started[i] = pthread_create(&ids[i], NULL, run_chunks, &loop) == 0;
    run_chunks(&loop); /* the calling thread works too; it also covers threads that failed to start */
    for (int i = 1; i < k; ++i) {
        if (started[i]) pthread_join(ids[i], NULL);
    }
}
