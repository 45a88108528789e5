/* Helpers shared by the C sources of the core library (not part of the ABI). */
#ifndef WANRT_INTERNAL_H
#define WANRT_INTERNAL_H

#include <stdint.h>

#include "wanrt.h"

/* Record a printf-style message as the calling thread's last error and return status. */
wanrt_status wanrt_fail(wanrt_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Run fn(ctx, begin, end) over [0, n) in contiguous chunks on up to n_threads
 * threads (<= 0: all CPUs), the calling thread among them; no more threads than
 * there are min_per_thread-long shares of n. Returns when every chunk is done,
 * also when a thread could not be started. */
typedef void (*wanrt_range_fn)(void *ctx, int64_t begin, int64_t end);
void wanrt_parallel_for(int64_t n, int64_t min_per_thread, int n_threads, wanrt_range_fn fn, void *ctx);

/* Vectorize a hot loop for AVX2 and for the baseline, chosen at load time, so a
 * portable build still runs AVX2 code where the CPU has it. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute) /* ifunc */
#if __has_attribute(target_clones)
#define WANRT_HOT __attribute__((target_clones("avx2", "default")))
#define WANRT_HAS_CLONES 1
#endif
#endif
#ifndef WANRT_HOT
#define WANRT_HOT
#define WANRT_HAS_CLONES 0
#endif

#endif /* WANRT_INTERNAL_H */
