/* Conversions between float32 and the 16-bit float formats, written without
 * branches so that loops over them vectorize. All rounding is to nearest, ties
 * to even, as numpy's astype, torch's .to() and ggml's GGML_FP32_TO_FP16. */
#ifndef WANRT_FLOAT_BITS_H
#define WANRT_FLOAT_BITS_H

#include <stdint.h>
#include <string.h>

static inline uint32_t wanrt_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float wanrt_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float wanrt_bf16_to_f32(uint16_t h) {
    return wanrt_f32_from_bits((uint32_t)h << 16);
}

static inline float wanrt_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;
    /* normal: rebias the exponent from 15 to 127 */
    const uint32_t normal = (em << 13) + (112u << 23);
    /* inf and NaN keep their payload */
    const uint32_t special = (em << 13) | 0x7f800000u;
    /* subnormal: mantissa * 2^-24, exact in float32 and never itself subnormal */
    const uint32_t subnormal = wanrt_f32_bits((float)em * 0x1p-24f);
    const uint32_t r = em < 0x0400u ? subnormal : (em >= 0x7c00u ? special : normal);
    return wanrt_f32_from_bits(sign | r);
}

static inline uint16_t wanrt_f32_to_f16(float f) {
    const uint32_t x = wanrt_f32_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    /* normal: round the 13 dropped mantissa bits, carrying into the exponent */
    const uint32_t normal = ((ax + 0x0fffu + ((ax >> 13) & 1u)) >> 13) - (112u << 10);
    /* below 2^-14: adding 0.5 rounds |f| to a multiple of 2^-24, the fp16 subnormal step */
    const uint32_t subnormal = wanrt_f32_bits(wanrt_f32_from_bits(ax) + 0.5f) - 0x3f000000u;
    uint32_t h = ax < 0x38800000u ? subnormal : normal;
    h = ax >= 0x477ff000u ? 0x7c00u : h; /* 65520 and above round to inf */
    h = ax > 0x7f800000u ? (0x7e00u | ((ax >> 13) & 0x03ffu)) : h; /* quiet NaN */
    return (uint16_t)(sign | h);
}

static inline uint16_t wanrt_f32_to_bf16(float f) {
    const uint32_t x = wanrt_f32_bits(f);
    const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const uint32_t nan = ((x >> 16) & 0x8000u) | 0x7fc0u;
    return (uint16_t)((x & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

#endif /* WANRT_FLOAT_BITS_H */
