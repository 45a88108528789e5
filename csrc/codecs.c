/* ggml legacy block codecs (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), threaded over blocks.
 *
 * Quantization reproduces ggml's quantize_row_<type>_ref byte for byte: float32
 * arithmetic in the same order, the float32 reciprocal 1/d (not the fp16 d), Q8_0
 * rounding half away from zero, Q4/Q5 truncation of x*id + offset + 0.5. This
 * file must be compiled without FMA contraction (-ffp-contract=off): a fused
 * x*id + 8.5 moves rare ties. Reductions run on the float bit patterns, as
 * integers, so that they vectorize without -ffast-math; where the sign of a zero
 * extreme matters, it is taken from the first zero in memory order, as ggml's
 * loops do.
 *
 * These loops are the portable quantizers; where the CPU has AVX2 and F16C,
 * codecs_avx2.c's intrinsics give the same bytes ~4x faster (compilers leave the
 * Q4/Q5 extreme search, int8 truncation and nibble packing scalar here).
 * WANRT_NO_AVX2=1 in the environment keeps these loops, for checking them.
 */
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "codecs_avx2.h"
#include "float_bits.h"
#include "internal.h"

enum { QK = WANRT_QK };

/* Blocks per thread below which starting another thread costs more than it saves. */
enum { MIN_BLOCKS_PER_THREAD = 4096 };

static inline void store_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, sizeof v); }
static inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static int64_t block_bytes(wanrt_type type) {
    switch (type) {
    case WANRT_TYPE_Q8_0: return sizeof(wanrt_block_q8_0);
    case WANRT_TYPE_Q4_0: return sizeof(wanrt_block_q4_0);
    case WANRT_TYPE_Q4_1: return sizeof(wanrt_block_q4_1);
    case WANRT_TYPE_Q5_0: return sizeof(wanrt_block_q5_0);
    case WANRT_TYPE_Q5_1: return sizeof(wanrt_block_q5_1);
    default: return 0;
    }
}

static int64_t float_bytes(wanrt_type type) {
    switch (type) {
    case WANRT_TYPE_F32: return 4;
    case WANRT_TYPE_F16: return 2;
    case WANRT_TYPE_BF16: return 2;
    default: return 0;
    }
}

/* ---------------------------------------------------------------- float I/O */

/* Block `block` of a float array as float32: the source itself for F32, else
 * converted into buf. */
static inline const float *load_block(wanrt_type ftype, const void *src, int64_t block, float buf[QK]) {
    if (ftype == WANRT_TYPE_F32) return (const float *)src + block * QK;
    const uint16_t *s = (const uint16_t *)src + block * QK;
    if (ftype == WANRT_TYPE_F16) {
        for (int j = 0; j < QK; ++j) buf[j] = wanrt_f16_to_f32(s[j]);
    } else {
        for (int j = 0; j < QK; ++j) buf[j] = wanrt_bf16_to_f32(s[j]);
    }
    return buf;
}

static inline void store_block(wanrt_type ftype, void *dst, int64_t block, const float x[QK]) {
    if (ftype == WANRT_TYPE_F32) {
        memcpy((float *)dst + block * QK, x, QK * sizeof(float));
    } else if (ftype == WANRT_TYPE_F16) {
        uint16_t *d = (uint16_t *)dst + block * QK;
        for (int j = 0; j < QK; ++j) d[j] = wanrt_f32_to_f16(x[j]);
    } else {
        uint16_t *d = (uint16_t *)dst + block * QK;
        for (int j = 0; j < QK; ++j) d[j] = wanrt_f32_to_bf16(x[j]);
    }
}

/* ------------------------------------------------------- rounding helpers */

/* (int32_t)v with C truncation, and INT32_MIN where that conversion is undefined
 * (NaN, inf, out of range): what x86's cvttss2si returns, so non-finite input
 * gives the same bytes as ggml's reference build and numpy. Written with masks
 * instead of branches so the loops around it vectorize. */
static inline uint32_t in_i32_range_mask(float v) {
    return (uint32_t) - (int32_t)(fabsf(v) < 2147483648.0f);
}

static inline int32_t trunc_to_i32(float v) {
    const uint32_t ok = in_i32_range_mask(v);
    const int32_t t = (int32_t)wanrt_f32_from_bits(wanrt_f32_bits(v) & ok);
    return (int32_t)(((uint32_t)t & ok) | (0x80000000u & ~ok));
}

/* roundf(v) converted to int32: half away from zero. Adding the float just below
 * 0.5 with v's sign and truncating is exact for every float (0.49999997 + 0.5
 * rounds to 1.0 only where v's own rounding says so). */
static inline int32_t round_away_to_i32(float v) {
    const float below_half = 0x1.fffffep-2f;
    return trunc_to_i32(v + copysignf(below_half, v));
}

/* Floats ordered as signed integers (-0 sorts below +0); its own inverse. */
static inline int32_t order_key(float f) {
    const int32_t i = (int32_t)wanrt_f32_bits(f);
    return i ^ ((i >> 31) & 0x7fffffff);
}

static inline float from_order_key(int32_t k) {
    return wanrt_f32_from_bits((uint32_t)(k ^ ((k >> 31) & 0x7fffffff)));
}

static inline uint32_t abs_max_bits(const float x[QK]) {
    uint32_t m = 0;
    for (int j = 0; j < QK; ++j) {
        const uint32_t a = wanrt_f32_bits(x[j]) & 0x7fffffffu;
        m = a > m ? a : m;
    }
    return m;
}

/* The first zero of x in memory order, with its sign. */
static inline float first_zero(const float x[QK]) {
    for (int j = 0; j < QK; ++j) {
        if (x[j] == 0.0f) return x[j];
    }
    return 0.0f;
}

/* ----------------------------------------------------------- quantizers */

static inline void quantize_q8_0(const float x[QK], uint8_t *y) {
    const float d = wanrt_f32_from_bits(abs_max_bits(x)) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, wanrt_f32_to_f16(d));
    int8_t *qs = (int8_t *)(y + offsetof(wanrt_block_q8_0, qs));
    for (int j = 0; j < QK; ++j) qs[j] = (int8_t)round_away_to_i32(x[j] * id);
}

/* Q4_0 / Q5_0: the element of largest magnitude (the first on ties, +0 for an
 * all-zero block) maps to q = 0: d = max / -half, q = min(top, trunc(x/d + half + 0.5)). */
static inline float signed_extreme(const float x[QK]) {
    const uint32_t amax = abs_max_bits(x);
    if (amax == 0) return 0.0f;
    for (int j = 0; j < QK; ++j) { /* a predicted early exit beats a vector index search here */
        if ((wanrt_f32_bits(x[j]) & 0x7fffffffu) == amax) return x[j];
    }
    return 0.0f;
}

/* Q4_1 / Q5_1: d = (max - min) / top, q = min(top, trunc((x - min)/d + 0.5)). */
static inline void min_max(const float x[QK], float *min_out, float *max_out) {
    int32_t kmin = INT32_MAX, kmax = INT32_MIN;
    for (int j = 0; j < QK; ++j) {
        const int32_t k = order_key(x[j]);
        kmin = k < kmin ? k : kmin;
        kmax = k > kmax ? k : kmax;
    }
    float min = from_order_key(kmin), max = from_order_key(kmax);
    if (min == 0.0f) min = first_zero(x);
    if (max == 0.0f) max = first_zero(x);
    *min_out = min;
    *max_out = max;
}

/* ggml's (uint8_t)MIN(top, (int8_t)v): the quant of one already offset value. */
static inline uint32_t clamp_quant(float v, int32_t top) {
    const int32_t t = (int8_t)trunc_to_i32(v);
    return (uint32_t)(uint8_t)(t < top ? t : top);
}

/* Element j and element j+16 share byte j: low and high nibble; for Q5 their fifth
 * bits go to bits j and j+16 of qh. */
static inline void quantize_q4_0(const float x[QK], uint8_t *y) {
    const float d = signed_extreme(x) / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, wanrt_f32_to_f16(d));
    uint8_t *qs = y + offsetof(wanrt_block_q4_0, qs);
    for (int j = 0; j < QK / 2; ++j) {
        const uint32_t lo = clamp_quant(x[j] * id + 8.5f, 15), hi = clamp_quant(x[j + QK / 2] * id + 8.5f, 15);
        qs[j] = (uint8_t)((lo & 0x0f) | (hi << 4));
    }
}

static inline void quantize_q5_0(const float x[QK], uint8_t *y) {
    const float d = signed_extreme(x) / -16.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, wanrt_f32_to_f16(d));
    uint8_t *qs = y + offsetof(wanrt_block_q5_0, qs);
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; ++j) {
        const uint32_t lo = clamp_quant(x[j] * id + 16.5f, 31), hi = clamp_quant(x[j + QK / 2] * id + 16.5f, 31);
        qs[j] = (uint8_t)((lo & 0x0f) | (hi << 4));
        qh |= ((lo >> 4) & 1u) << j | ((hi >> 4) & 1u) << (j + QK / 2);
    }
    const uint8_t le[4] = {(uint8_t)qh, (uint8_t)(qh >> 8), (uint8_t)(qh >> 16), (uint8_t)(qh >> 24)};
    memcpy(y + offsetof(wanrt_block_q5_0, qh), le, 4);
}

static inline void quantize_q4_1(const float x[QK], uint8_t *y) {
    float min, max;
    min_max(x, &min, &max);
    const float d = (max - min) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, wanrt_f32_to_f16(d));
    store_u16(y + offsetof(wanrt_block_q4_1, m), wanrt_f32_to_f16(min));
    uint8_t *qs = y + offsetof(wanrt_block_q4_1, qs);
    for (int j = 0; j < QK / 2; ++j) {
        const uint32_t lo = clamp_quant((x[j] - min) * id + 0.5f, 15);
        const uint32_t hi = clamp_quant((x[j + QK / 2] - min) * id + 0.5f, 15);
        qs[j] = (uint8_t)((lo & 0x0f) | (hi << 4));
    }
}

static inline void quantize_q5_1(const float x[QK], uint8_t *y) {
    float min, max;
    min_max(x, &min, &max);
    const float d = (max - min) / 31.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, wanrt_f32_to_f16(d));
    store_u16(y + offsetof(wanrt_block_q5_1, m), wanrt_f32_to_f16(min));
    uint8_t *qs = y + offsetof(wanrt_block_q5_1, qs);
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; ++j) {
        const uint32_t lo = clamp_quant((x[j] - min) * id + 0.5f, 31);
        const uint32_t hi = clamp_quant((x[j + QK / 2] - min) * id + 0.5f, 31);
        qs[j] = (uint8_t)((lo & 0x0f) | (hi << 4));
        qh |= ((lo >> 4) & 1u) << j | ((hi >> 4) & 1u) << (j + QK / 2);
    }
    const uint8_t le[4] = {(uint8_t)qh, (uint8_t)(qh >> 8), (uint8_t)(qh >> 16), (uint8_t)(qh >> 24)};
    memcpy(y + offsetof(wanrt_block_q5_1, qh), le, 4);
}

/* ---------------------------------------------------------- dequantizers */

static inline void unpack_nibbles(const uint8_t *qs, int32_t q[QK]) {
    for (int j = 0; j < QK / 2; ++j) {
        q[j] = qs[j] & 0x0f;
        q[j + QK / 2] = qs[j] >> 4;
    }
}

static inline void add_high_bits(const uint8_t *qh, int32_t q[QK]) {
    const uint32_t bits = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
    for (int j = 0; j < QK; ++j) q[j] |= (int32_t)((bits >> j) & 1u) << 4;
}

static inline void dequantize_q8_0(const uint8_t *y, float x[QK]) {
    const float d = wanrt_f16_to_f32(load_u16(y));
    const int8_t *qs = (const int8_t *)(y + offsetof(wanrt_block_q8_0, qs));
    for (int j = 0; j < QK; ++j) x[j] = d * (float)qs[j];
}

static inline void dequantize_q4_0(const uint8_t *y, float x[QK]) {
    const float d = wanrt_f16_to_f32(load_u16(y));
    int32_t q[QK];
    unpack_nibbles(y + offsetof(wanrt_block_q4_0, qs), q);
    for (int j = 0; j < QK; ++j) x[j] = d * (float)(q[j] - 8);
}

static inline void dequantize_q4_1(const uint8_t *y, float x[QK]) {
    const float d = wanrt_f16_to_f32(load_u16(y));
    const float m = wanrt_f16_to_f32(load_u16(y + offsetof(wanrt_block_q4_1, m)));
    int32_t q[QK];
    unpack_nibbles(y + offsetof(wanrt_block_q4_1, qs), q);
    for (int j = 0; j < QK; ++j) x[j] = d * (float)q[j] + m;
}

static inline void dequantize_q5_0(const uint8_t *y, float x[QK]) {
    const float d = wanrt_f16_to_f32(load_u16(y));
    int32_t q[QK];
    unpack_nibbles(y + offsetof(wanrt_block_q5_0, qs), q);
    add_high_bits(y + offsetof(wanrt_block_q5_0, qh), q);
    for (int j = 0; j < QK; ++j) x[j] = d * (float)(q[j] - 16);
}

static inline void dequantize_q5_1(const uint8_t *y, float x[QK]) {
    const float d = wanrt_f16_to_f32(load_u16(y));
    const float m = wanrt_f16_to_f32(load_u16(y + offsetof(wanrt_block_q5_1, m)));
    int32_t q[QK];
    unpack_nibbles(y + offsetof(wanrt_block_q5_1, qs), q);
    add_high_bits(y + offsetof(wanrt_block_q5_1, qh), q);
    for (int j = 0; j < QK; ++j) x[j] = d * (float)q[j] + m;
}

/* ------------------------------------------------------- threaded loops */

typedef struct codec_job {
    wanrt_type type;  /* block format */
    wanrt_type ftype; /* float side: source of quantize, destination of dequantize */
    const void *src;
    void *dst;
} codec_job;

/* Where the CPU has AVX2 the hand-vectorized quantizers run instead (codecs_avx2.c). */
static void quantize_range(void *arg, int64_t begin, int64_t end) {
    const codec_job *job = arg;
    uint8_t *dst = job->dst;
    const int64_t size = block_bytes(job->type);
    float buf[QK];
    for (int64_t b = begin; b < end; ++b) {
        const float *x = load_block(job->ftype, job->src, b, buf);
        switch (job->type) {
        case WANRT_TYPE_Q8_0: quantize_q8_0(x, dst + b * size); break;
        case WANRT_TYPE_Q4_0: quantize_q4_0(x, dst + b * size); break;
        case WANRT_TYPE_Q4_1: quantize_q4_1(x, dst + b * size); break;
        case WANRT_TYPE_Q5_0: quantize_q5_0(x, dst + b * size); break;
        default: quantize_q5_1(x, dst + b * size); break;
        }
    }
}

#if WANRT_CODECS_AVX2
static void quantize_range_avx2(void *arg, int64_t begin, int64_t end) {
    const codec_job *job = arg;
    wanrt_avx2_quantize_range(job->type, job->ftype, job->src, job->dst, begin, end);
}
#endif

WANRT_HOT static void dequantize_range(void *arg, int64_t begin, int64_t end) {
    const codec_job *job = arg;
    const uint8_t *src = job->src;
    const int64_t size = block_bytes(job->type);
    float x[QK];
    for (int64_t b = begin; b < end; ++b) {
        switch (job->type) {
        case WANRT_TYPE_Q8_0: dequantize_q8_0(src + b * size, x); break;
        case WANRT_TYPE_Q4_0: dequantize_q4_0(src + b * size, x); break;
        case WANRT_TYPE_Q4_1: dequantize_q4_1(src + b * size, x); break;
        case WANRT_TYPE_Q5_0: dequantize_q5_0(src + b * size, x); break;
        default: dequantize_q5_1(src + b * size, x); break;
        }
        store_block(job->ftype, job->dst, b, x);
    }
}

/* ------------------------------------------------------------- exports */

static wanrt_status check_args(const char *what, wanrt_type type, wanrt_type ftype, const void *floats,
                               const void *blocks, int64_t n_rows, int64_t n_per_row) {
    if (block_bytes(type) == 0) {
        return wanrt_fail(WANRT_ERR_UNSUPPORTED, "%s: type id %d is not a legacy block quant (q8_0, q4_0, q4_1, q5_0, q5_1)",
                          what, (int)type);
    }
    const int64_t fsize = float_bytes(ftype);
    if (fsize == 0) {
        return wanrt_fail(WANRT_ERR_UNSUPPORTED, "%s: float type id %d is not f32, f16 or bf16", what, (int)ftype);
    }
    if (n_rows < 0 || n_per_row < 0 || n_per_row % QK != 0) {
        return wanrt_fail(WANRT_ERR_INVALID_ARGUMENT,
                          "%s: %lld rows of %lld values; rows must hold a whole number of %d-value blocks", what,
                          (long long)n_rows, (long long)n_per_row, QK);
    }
    if (n_rows > 0 && n_per_row > 0 && n_rows > INT64_MAX / n_per_row / fsize) {
        return wanrt_fail(WANRT_ERR_INVALID_ARGUMENT, "%s: %lld x %lld values overflow a 64-bit size", what,
                          (long long)n_rows, (long long)n_per_row);
    }
    if (n_rows * n_per_row > 0 && (floats == NULL || blocks == NULL)) {
        return wanrt_fail(WANRT_ERR_INVALID_ARGUMENT, "%s: null buffer", what);
    }
    if ((uintptr_t)floats % (uintptr_t)fsize != 0) {
        return wanrt_fail(WANRT_ERR_INVALID_ARGUMENT, "%s: float buffer at %p is not aligned to %lld bytes", what,
                          floats, (long long)fsize);
    }
    return WANRT_OK;
}

wanrt_status wanrt_quantize(wanrt_type type, wanrt_type src_type, const void *src, void *dst, int64_t n_rows,
                            int64_t n_per_row, int n_threads) {
    wanrt_status s = check_args("wanrt_quantize", type, src_type, src, dst, n_rows, n_per_row);
    if (s != WANRT_OK) return s;
    codec_job job = {type, src_type, src, dst};
    wanrt_range_fn range = quantize_range;
#if WANRT_CODECS_AVX2
    if (wanrt_avx2_quantize_usable()) range = quantize_range_avx2;
#endif
    wanrt_parallel_for(n_rows * (n_per_row / QK), MIN_BLOCKS_PER_THREAD, n_threads, range, &job);
    return WANRT_OK;
}

wanrt_status wanrt_dequantize(wanrt_type type, const void *src, wanrt_type dst_type, void *dst, int64_t n_rows,
                              int64_t n_per_row, int n_threads) {
    wanrt_status s = check_args("wanrt_dequantize", type, dst_type, dst, src, n_rows, n_per_row);
    if (s != WANRT_OK) return s;
    codec_job job = {type, dst_type, src, dst};
    wanrt_parallel_for(n_rows * (n_per_row / QK), MIN_BLOCKS_PER_THREAD, n_threads, dequantize_range, &job);
    return WANRT_OK;
}
