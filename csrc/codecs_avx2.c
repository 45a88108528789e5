/* AVX2 + F16C block quantizers: codecs.c's rules written with intrinsics.
 *
 * Compilers leave the Q4/Q5 quantizers half scalar (the signed-extreme search, the
 * int8 truncation and the nibble packing), so a block is done here in whole vectors:
 * 32 values in four registers, element 8k+i in lane i of register k. The arithmetic
 * is the scalar code's, operation for operation: x*id and + 8.5 stay two roundings
 * (the target has no "fma", so nothing can be fused), conversions truncate like
 * cvttss2si (INT32_MIN for NaN and out-of-range values) before ggml's (int8_t)
 * cast keeps the low byte, and the extremes are searched on the float bits as
 * integers, the first in memory order winning ties. Only the per-block scalars
 * (d, its reciprocal) are computed one at a time, exactly as in codecs.c.
 */
#include "codecs_avx2.h"

#if WANRT_CODECS_AVX2
#include <immintrin.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "float_bits.h"

#define AVX2 __attribute__((target("avx2,f16c")))
#define INLINE_AVX2 static inline __attribute__((always_inline, target("avx2,f16c")))

enum { QK = WANRT_QK };

typedef struct block {
    __m256 v[4]; /* elements 8k .. 8k+7 in v[k] */
} block;

/* WANRT_NO_AVX2 (set, not "0") keeps the portable loops, so that they can be checked on any machine. */
int wanrt_avx2_quantize_usable(void) {
    const char *off = getenv("WANRT_NO_AVX2");
    if (off != NULL && off[0] != '\0' && strcmp(off, "0") != 0) return 0;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

/* ------------------------------------------------------------------ loads */

INLINE_AVX2 __m256i bits(__m256 v) { return _mm256_castps_si256(v); }

INLINE_AVX2 __m256 bf16_to_f32(const uint16_t *s) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)s));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

/* F16C widening is exact but quiets signalling NaNs; clear the quiet bit it set
 * so that every NaN keeps its payload, as the scalar conversion does. */
INLINE_AVX2 __m256 f16_to_f32(const uint16_t *s) {
    const __m128i h = _mm_loadu_si128((const __m128i *)s);
    const __m256i w = _mm256_cvtepu16_epi32(h);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x7fff)), _mm256_set1_epi32(0x7c00));
    const __m256i was_quiet = _mm256_slli_epi32(w, 13); /* fp16 bit 9 -> float32 bit 22 */
    const __m256i flip = _mm256_and_si256(nan, _mm256_andnot_si256(was_quiet, _mm256_set1_epi32(0x00400000)));
    return _mm256_xor_ps(_mm256_cvtph_ps(h), _mm256_castsi256_ps(flip));
}

INLINE_AVX2 block load_block(wanrt_type ftype, const void *src, int64_t b) {
    block x;
    if (ftype == WANRT_TYPE_F32) {
        const float *s = (const float *)src + b * QK;
        for (int k = 0; k < 4; ++k) x.v[k] = _mm256_loadu_ps(s + 8 * k);
    } else {
        const uint16_t *s = (const uint16_t *)src + b * QK;
        for (int k = 0; k < 4; ++k) x.v[k] = ftype == WANRT_TYPE_F16 ? f16_to_f32(s + 8 * k) : bf16_to_f32(s + 8 * k);
    }
    return x;
}

/* ------------------------------------------------------------- reductions */

/* Every lane holds the maximum (minimum) of the eight. */
INLINE_AVX2 __m256i all_max_epi32(__m256i m) {
    m = _mm256_max_epi32(m, _mm256_permute2x128_si256(m, m, 1));
    m = _mm256_max_epi32(m, _mm256_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm256_max_epi32(m, _mm256_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
}

INLINE_AVX2 __m256i all_min_epi32(__m256i m) {
    m = _mm256_min_epi32(m, _mm256_permute2x128_si256(m, m, 1));
    m = _mm256_min_epi32(m, _mm256_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm256_min_epi32(m, _mm256_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
}

INLINE_AVX2 uint32_t lane0(__m256i v) { return (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(v)); }

/* Bit j = the top bit of element j. */
INLINE_AVX2 uint32_t top_bits(__m256 a, __m256 b, __m256 c, __m256 d) {
    return (uint32_t)_mm256_movemask_ps(a) | (uint32_t)_mm256_movemask_ps(b) << 8 |
           (uint32_t)_mm256_movemask_ps(c) << 16 | (uint32_t)_mm256_movemask_ps(d) << 24;
}

INLINE_AVX2 uint32_t sign_bits(const block *x) { return top_bits(x->v[0], x->v[1], x->v[2], x->v[3]); }

INLINE_AVX2 __m256i abs_bits(__m256 v) { return _mm256_and_si256(bits(v), _mm256_set1_epi32(0x7fffffff)); }

/* The largest |x| as float bits, in every lane. */
INLINE_AVX2 __m256i abs_max_bits(const block *x) {
    const __m256i m01 = _mm256_max_epi32(abs_bits(x->v[0]), abs_bits(x->v[1]));
    const __m256i m23 = _mm256_max_epi32(abs_bits(x->v[2]), abs_bits(x->v[3]));
    return all_max_epi32(_mm256_max_epi32(m01, m23));
}

/* Q4_0 / Q5_0: the element of largest magnitude, the first on ties, +0 for an all-zero block. */
INLINE_AVX2 float signed_extreme(const block *x) {
    const __m256i amax = abs_max_bits(x);
    const uint32_t at = top_bits(_mm256_castsi256_ps(_mm256_cmpeq_epi32(abs_bits(x->v[0]), amax)),
                                 _mm256_castsi256_ps(_mm256_cmpeq_epi32(abs_bits(x->v[1]), amax)),
                                 _mm256_castsi256_ps(_mm256_cmpeq_epi32(abs_bits(x->v[2]), amax)),
                                 _mm256_castsi256_ps(_mm256_cmpeq_epi32(abs_bits(x->v[3]), amax)));
    const uint32_t a = lane0(amax), sign = sign_bits(x) >> __builtin_ctz(at) & 1u; /* `at` is never 0 */
    return wanrt_f32_from_bits(a != 0 ? a | sign << 31 : 0u);
}

/* Floats ordered as signed integers (-0 below +0); its own inverse. */
INLINE_AVX2 __m256i order_key(__m256 v) {
    const __m256i i = bits(v);
    return _mm256_xor_si256(i, _mm256_srli_epi32(_mm256_srai_epi32(i, 31), 1));
}

INLINE_AVX2 float from_order_key(uint32_t k) { return wanrt_f32_from_bits(k ^ ((uint32_t)((int32_t)k >> 31) >> 1)); }

/* Q4_1 / Q5_1: min and max; a zero extreme takes the sign of the first zero in memory order. */
INLINE_AVX2 void min_max(const block *x, float *min_out, float *max_out) {
    const __m256i k0 = order_key(x->v[0]), k1 = order_key(x->v[1]), k2 = order_key(x->v[2]), k3 = order_key(x->v[3]);
    const __m256i kmin = all_min_epi32(_mm256_min_epi32(_mm256_min_epi32(k0, k1), _mm256_min_epi32(k2, k3)));
    const __m256i kmax = all_max_epi32(_mm256_max_epi32(_mm256_max_epi32(k0, k1), _mm256_max_epi32(k2, k3)));
    float min = from_order_key(lane0(kmin)), max = from_order_key(lane0(kmax));
    if (min == 0.0f || max == 0.0f) {
        const __m256 zero = _mm256_setzero_ps();
        const uint32_t at = top_bits(_mm256_cmp_ps(x->v[0], zero, _CMP_EQ_OQ), _mm256_cmp_ps(x->v[1], zero, _CMP_EQ_OQ),
                                     _mm256_cmp_ps(x->v[2], zero, _CMP_EQ_OQ), _mm256_cmp_ps(x->v[3], zero, _CMP_EQ_OQ));
        const float first = (sign_bits(x) >> __builtin_ctz(at) & 1u) ? -0.0f : 0.0f; /* a zero extreme is in x */
        if (min == 0.0f) min = first;
        if (max == 0.0f) max = first;
    }
    *min_out = min;
    *max_out = max;
}

/* ------------------------------------------------------------------ stores */

INLINE_AVX2 uint16_t to_f16(float f) {
    return (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT), 0);
}

INLINE_AVX2 void store_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, sizeof v); }

/* The low byte of every int32 (C's cast to int8), elements 0..31 in order. */
INLINE_AVX2 __m256i low_bytes(__m256i q0, __m256i q1, __m256i q2, __m256i q3) {
    const __m256i ff = _mm256_set1_epi32(0xff);
    /* packs work within 128-bit lanes: dwords come out as elements 0-3, 8-11, 16-19,
     * 24-27 | 4-7, 12-15, 20-23, 28-31 */
    const __m256i a = _mm256_packus_epi32(_mm256_and_si256(q0, ff), _mm256_and_si256(q1, ff));
    const __m256i b = _mm256_packus_epi32(_mm256_and_si256(q2, ff), _mm256_and_si256(q3, ff));
    return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* (int8_t)trunc(v) of 32 values, then ggml's MIN(top, .) on the signed byte. */
INLINE_AVX2 __m256i quants(__m256 v0, __m256 v1, __m256 v2, __m256 v3, int8_t top) {
    const __m256i q = low_bytes(_mm256_cvttps_epi32(v0), _mm256_cvttps_epi32(v1), _mm256_cvttps_epi32(v2),
                                _mm256_cvttps_epi32(v3));
    return _mm256_min_epi8(q, _mm256_set1_epi8(top));
}

/* Byte j: element j in the low nibble, element j+16 in the high one. */
INLINE_AVX2 void store_nibbles(__m256i q, uint8_t *qs) {
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(_mm256_castsi256_si128(q), m);
    const __m128i hi = _mm_and_si128(_mm256_extracti128_si256(q, 1), m);
    _mm_storeu_si128((__m128i *)qs, _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
}

/* Bit j of qh = bit 4 of element j: moved to each byte's top bit (a 16-bit shift
 * by 3 carries nothing into it), then gathered. */
INLINE_AVX2 void store_fifth_bits(__m256i q, uint8_t *qh) {
    const uint32_t h = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(q, 3));
    memcpy(qh, &h, sizeof h); /* x86 is little-endian, as the format */
}

/* -------------------------------------------------------------- quantizers */

INLINE_AVX2 void quantize_q8_0(const block *x, uint8_t *y) {
    const float d = wanrt_f32_from_bits(lane0(abs_max_bits(x))) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, to_f16(d));
    /* roundf: add the float just below 0.5 with v's sign, then truncate (see codecs.c) */
    const __m256 vid = _mm256_set1_ps(id), below_half = _mm256_set1_ps(0x1.fffffep-2f), sign = _mm256_set1_ps(-0.0f);
    __m256i q[4];
    for (int k = 0; k < 4; ++k) {
        const __m256 v = _mm256_mul_ps(x->v[k], vid);
        q[k] = _mm256_cvttps_epi32(_mm256_add_ps(v, _mm256_or_ps(_mm256_and_ps(v, sign), below_half)));
    }
    _mm256_storeu_si256((__m256i *)(y + offsetof(wanrt_block_q8_0, qs)), low_bytes(q[0], q[1], q[2], q[3]));
}

/* Q4_0 (half 8, top 15) and Q5_0 (half 16, top 31): d = max / -half, q = min(top, trunc(x*id + half + 0.5)).
 * The divisor is passed negated: `max / -half` may be compiled as `-max * (1/half)`,
 * which flips the sign of a NaN `d` where the division keeps it. */
INLINE_AVX2 __m256i quantize_x_0(const block *x, uint8_t *y, float minus_half, int8_t top) {
    const float d = signed_extreme(x) / minus_half;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, to_f16(d));
    const __m256 vid = _mm256_set1_ps(id), offset = _mm256_set1_ps(0.5f - minus_half);
    __m256 v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_add_ps(_mm256_mul_ps(x->v[k], vid), offset);
    return quants(v[0], v[1], v[2], v[3], top);
}

/* Q4_1 / Q5_1: d = (max - min) / top, q = min(top, trunc((x - min)*id + 0.5)). */
INLINE_AVX2 __m256i quantize_x_1(const block *x, uint8_t *y, int8_t top) {
    float min, max;
    min_max(x, &min, &max);
    const float d = (max - min) / (float)top;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, to_f16(d));
    store_u16(y + 2, to_f16(min));
    const __m256 vmin = _mm256_set1_ps(min), vid = _mm256_set1_ps(id), half = _mm256_set1_ps(0.5f);
    __m256 v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(x->v[k], vmin), vid), half);
    return quants(v[0], v[1], v[2], v[3], top);
}

INLINE_AVX2 void quantize_q4_0(const block *x, uint8_t *y) {
    store_nibbles(quantize_x_0(x, y, -8.0f, 15), y + offsetof(wanrt_block_q4_0, qs));
}

INLINE_AVX2 void quantize_q5_0(const block *x, uint8_t *y) {
    const __m256i q = quantize_x_0(x, y, -16.0f, 31);
    store_fifth_bits(q, y + offsetof(wanrt_block_q5_0, qh));
    store_nibbles(q, y + offsetof(wanrt_block_q5_0, qs));
}

INLINE_AVX2 void quantize_q4_1(const block *x, uint8_t *y) {
    store_nibbles(quantize_x_1(x, y, 15), y + offsetof(wanrt_block_q4_1, qs));
}

INLINE_AVX2 void quantize_q5_1(const block *x, uint8_t *y) {
    const __m256i q = quantize_x_1(x, y, 31);
    store_fifth_bits(q, y + offsetof(wanrt_block_q5_1, qh));
    store_nibbles(q, y + offsetof(wanrt_block_q5_1, qs));
}

/* ------------------------------------------------------------------- loops */

/* One loop per (type, float type): both are constants once this is inlined. */
INLINE_AVX2 void quantize_blocks(wanrt_type type, wanrt_type ftype, const void *src, uint8_t *dst, int64_t begin,
                                 int64_t end) {
#define WANRT_LOOP(quantize_fn, block_type)                                                                        \
    for (int64_t b = begin; b < end; ++b) {                                                                        \
        const block x = load_block(ftype, src, b);                                                                 \
        quantize_fn(&x, dst + b * (int64_t)sizeof(block_type));                                                    \
    }                                                                                                              \
    break
    switch (type) {
    case WANRT_TYPE_Q8_0: WANRT_LOOP(quantize_q8_0, wanrt_block_q8_0);
    case WANRT_TYPE_Q4_0: WANRT_LOOP(quantize_q4_0, wanrt_block_q4_0);
    case WANRT_TYPE_Q4_1: WANRT_LOOP(quantize_q4_1, wanrt_block_q4_1);
    case WANRT_TYPE_Q5_0: WANRT_LOOP(quantize_q5_0, wanrt_block_q5_0);
    default: WANRT_LOOP(quantize_q5_1, wanrt_block_q5_1);
    }
#undef WANRT_LOOP
}

AVX2 void wanrt_avx2_quantize_range(wanrt_type type, wanrt_type ftype, const void *src, uint8_t *dst, int64_t begin,
                                    int64_t end) {
    switch (ftype) {
    case WANRT_TYPE_F32: quantize_blocks(type, WANRT_TYPE_F32, src, dst, begin, end); break;
    case WANRT_TYPE_F16: quantize_blocks(type, WANRT_TYPE_F16, src, dst, begin, end); break;
    default: quantize_blocks(type, WANRT_TYPE_BF16, src, dst, begin, end); break;
    }
}

#endif /* WANRT_CODECS_AVX2 */
