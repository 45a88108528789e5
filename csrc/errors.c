/* The calling thread's last error, the build description and the CPU count. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

#include "codecs_avx2.h"
#include "internal.h"

static _Thread_local char last_error[1024];

wanrt_status wanrt_fail(wanrt_status status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}

const char *wanrt_last_error(void) { return last_error; }

#ifndef WANRT_BUILD_FLAGS
#define WANRT_BUILD_FLAGS "unknown"
#endif

const char *wanrt_build_info(void) {
    static _Thread_local char info[512];
    if (!info[0]) {
#if defined(__x86_64__) && WANRT_HAS_CLONES
        const char *simd = wanrt_avx2_quantize_usable()
                               ? "quantizers avx2+f16c intrinsics, decoders avx2 clones"
                               : (__builtin_cpu_supports("avx2") ? "quantizers portable (WANRT_NO_AVX2 or no f16c), decoders avx2 clones"
                                                                 : "baseline (this CPU lacks avx2)");
#elif defined(__x86_64__)
        const char *simd = "baseline (no target_clones)";
#else
        const char *simd = "compiler default";
#endif
#if defined(__clang__)
        const char *cc = "clang " __clang_version__;
#elif defined(__GNUC__)
        const char *cc = "gcc " __VERSION__;
#else
        const char *cc = "unknown compiler";
#endif
        snprintf(info, sizeof info, "%s; flags %s; codec loops: %s", cc, WANRT_BUILD_FLAGS, simd);
    }
    return info;
}

int wanrt_cpu_count(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
