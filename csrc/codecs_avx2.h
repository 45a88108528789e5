/* The AVX2 + F16C block quantizers (codecs_avx2.c), chosen at run time by codecs.c. */
#ifndef WANRT_CODECS_AVX2_H
#define WANRT_CODECS_AVX2_H

#include <stdint.h>

#include "wanrt.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WANRT_CODECS_AVX2 1
#else
#define WANRT_CODECS_AVX2 0
#endif

/* Whether the AVX2 quantizers run: the CPU has AVX2 and F16C, and the environment
 * variable WANRT_NO_AVX2 is unset (or "0"). */
int wanrt_avx2_quantize_usable(void);

/* Blocks [begin, end) of src (ftype: F32/F16/BF16) quantized to `type` at dst (the
 * start of the whole output): the same bytes as codecs.c's scalar quantizers. */
void wanrt_avx2_quantize_range(wanrt_type type, wanrt_type ftype, const void *src, uint8_t *dst, int64_t begin,
                               int64_t end);

#endif /* WANRT_CODECS_AVX2_H */
