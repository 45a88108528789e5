/* The wanrt C ABI: block layouts, status codes and every native export.
 *
 * This header is the single source of truth for the Python binding: setup.py
 * hands the text between each "wanrt-cdef" marker pair to cffi's cdef, so those
 * blocks hold plain C only (no #include, #if or static_assert; sizes are checked
 * in abi_checks.c). Native entries take pointers, counts and a CUDA stream as
 * `void *`, return a wanrt_status, never exit, and never allocate device memory;
 * after a failure, wanrt_last_error() / wanrt_cuda_last_error() describe it.
 */
#ifndef WANRT_H
#define WANRT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* wanrt-cdef begin common */
typedef enum wanrt_status {
    WANRT_OK = 0,
    WANRT_ERR_INVALID_ARGUMENT = 1, /* a null pointer, bad count, misaligned buffer */
    WANRT_ERR_UNSUPPORTED = 2,      /* a type or conversion this library does not implement */
    WANRT_ERR_IO = 3,               /* a failed read; the message carries errno's text */
    WANRT_ERR_SHORT_READ = 4,       /* the file ended before the requested bytes */
    WANRT_ERR_CUDA = 5              /* a CUDA runtime error; the message carries its name */
} wanrt_status;

/* Element and block formats, numbered as ggml's on-disk type ids. */
typedef enum wanrt_type {
    WANRT_TYPE_F32 = 0,
    WANRT_TYPE_F16 = 1,
    WANRT_TYPE_Q4_0 = 2,
    WANRT_TYPE_Q4_1 = 3,
    WANRT_TYPE_Q5_0 = 6,
    WANRT_TYPE_Q5_1 = 7,
    WANRT_TYPE_Q8_0 = 8,
    WANRT_TYPE_BF16 = 30
} wanrt_type;

/* Weights per block of every legacy quant. */
#define WANRT_QK 32

/* Block layouts (ggml-common.h). Scales are IEEE binary16 bits, little-endian.
 * Q4/Q5 nibbles: byte j holds element j (low nibble) and element j+16 (high).
 * Q5 fifth bits: bit j of qh (uint32, little-endian) belongs to element j. */
typedef struct wanrt_block_q8_0 {
    uint16_t d;
    int8_t qs[32];
} wanrt_block_q8_0; /* 34 bytes: x = d*qs */

typedef struct wanrt_block_q4_0 {
    uint16_t d;
    uint8_t qs[16];
} wanrt_block_q4_0; /* 18 bytes: x = d*(q - 8) */

typedef struct wanrt_block_q4_1 {
    uint16_t d;
    uint16_t m;
    uint8_t qs[16];
} wanrt_block_q4_1; /* 20 bytes: x = d*q + m */

typedef struct wanrt_block_q5_0 {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[16];
} wanrt_block_q5_0; /* 22 bytes: x = d*(q - 16) */

typedef struct wanrt_block_q5_1 {
    uint16_t d;
    uint16_t m;
    uint8_t qh[4];
    uint8_t qs[16];
} wanrt_block_q5_1; /* 24 bytes: x = d*q + m */
/* wanrt-cdef end */

/* wanrt-cdef begin core */
/* Text of the last failure on the calling thread ("" if none yet). */
const char *wanrt_last_error(void);

/* Compiler, flags and instruction-set clones of this build, one line. */
const char *wanrt_build_info(void);

/* CPUs this process may run on (the default thread count). */
int wanrt_cpu_count(void);

/* Quantize n_rows rows of n_per_row values (a multiple of 32) of src_type
 * (F32/F16/BF16, aligned to its size) into `type` blocks, rows back to back,
 * byte-identical to ggml's reference quantizers. n_threads <= 0: all CPUs. */
wanrt_status wanrt_quantize(wanrt_type type, wanrt_type src_type, const void *src, void *dst,
                            int64_t n_rows, int64_t n_per_row, int n_threads);

/* Decode `type` blocks to dst_type (F32/F16/BF16): float32 value, then one
 * round-to-nearest-even to the output type. */
wanrt_status wanrt_dequantize(wanrt_type type, const void *src, wanrt_type dst_type, void *dst,
                              int64_t n_rows, int64_t n_per_row, int n_threads);

/* Read nbytes at `offset` of the open file `fd` into dst with parallel preads.
 * *n_read receives the bytes read before the first failure or end of file
 * (nbytes on success); a file too short returns WANRT_ERR_SHORT_READ. */
wanrt_status wanrt_pread(int fd, uint64_t offset, void *dst, uint64_t nbytes, int n_threads,
                         uint64_t *n_read);
/* wanrt-cdef end */

/* wanrt-cdef begin cuda */
/* Text of the last failure of the CUDA library on the calling thread. */
const char *wanrt_cuda_last_error(void);

/* The GPU architectures compiled in (SASS and PTX) and the nvcc version. */
const char *wanrt_cuda_build_info(void);

wanrt_status wanrt_cuda_runtime_version(int *version);
wanrt_status wanrt_cuda_driver_version(int *version);
wanrt_status wanrt_cuda_device_count(int *count);

/* The SASS and PTX versions (e.g. 90) of the kernel image `device` runs. */
wanrt_status wanrt_cuda_kernel_arch(int device, int *binary_version, int *ptx_version);

/* Set nbytes of device memory at dst to `value` on `stream` (asynchronous). */
wanrt_status wanrt_cuda_fill_u8(int device, void *dst, uint8_t value, uint64_t nbytes, void *stream);

/* Decode n_elements of `type` (a legacy quant, or F32/F16/BF16) at src into
 * dst_type (F32/F16/BF16) at dst, both in device memory, on `stream`
 * (asynchronous): float32 value, then one round-to-nearest-even. */
wanrt_status wanrt_cuda_dequantize(int device, wanrt_type type, const void *src, wanrt_type dst_type,
                                   void *dst, int64_t n_elements, void *stream);

/* Fused elementwise stages of the DiT block, on `stream` (asynchronous), over
 * n_rows contiguous rows of `dim` values in device memory; x and out are F32 or
 * BF16, the vectors float32. Math in float32 as runtime/fused.py's torch twins
 * (same operations and roundings). The norms keep a row in one thread block:
 * rows of up to 16,384 values always fit, longer ones may return
 * WANRT_ERR_UNSUPPORTED. */

/* out = LN(x)*mul + add per row: LN without affine, mean and biased variance in
 * float32, eps; when round_norm is set and x is BF16, LN(x) is rounded to bf16
 * first (the official WanLayerNorm on a bf16 input). mul and add are [dim]
 * (row_stride 0) or one row per x row (row_stride values apart). out must not
 * overlap x. */
wanrt_status wanrt_cuda_layer_norm_mul_add(int device, wanrt_type x_type, const void *x, wanrt_type out_type,
                                           void *out, int64_t n_rows, int64_t dim, const void *mul, const void *add,
                                           int64_t row_stride, float eps, int round_norm, void *stream);

/* In place over x: RMSNorm over each whole row (float32, eps) rounded to x's type,
 * times weight ([dim]); then in each of the first n_rot rows the values (2i, 2i+1)
 * of every head of head_dim values are rotated in float64 by (cos, sin) =
 * rot[row][i] (float64 [n_rot][head_dim/2][2]) and rounded to float32, then to
 * x's type. Rows from n_rot on are only normalized. */
wanrt_status wanrt_cuda_rms_norm_rope(int device, wanrt_type type, void *x, int64_t n_rows, int64_t dim,
                                      const void *weight, float eps, const void *rot, int64_t n_rot, int64_t head_dim,
                                      void *stream);

/* x (F32) += y*gate per row, float32; y is F32 or BF16; gate is [dim] (row
 * stride 0), one row per x row (gate_row_stride values apart), or NULL (x += y). */
wanrt_status wanrt_cuda_gated_add(int device, void *x, wanrt_type y_type, const void *y, const void *gate,
                                  int64_t gate_row_stride, int64_t n_rows, int64_t dim, void *stream);
/* wanrt-cdef end */

#ifdef __cplusplus
}
#endif

#endif /* WANRT_H */
