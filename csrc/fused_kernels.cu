// Fused elementwise stages of the DiT block, each one pass over memory: the
// modulated or affine LayerNorm, RMSNorm with the 3-axis rope, and the gated
// residual update.
//
// A row (one token, `dim` values) belongs to one thread block, which keeps it in
// registers: read once, reduced over the whole row, written once. The arithmetic
// follows the torch twins in runtime/fused.py operation by operation (float32, the
// rope rotation in float64, the same roundings to bf16, no FMA contraction), so
// results differ from them only where a float32 sum over a row is added up in
// another order and a last bit moves.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_internal.h"
#include "wanrt.h"

namespace {

wanrt_status fail(wanrt_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
wanrt_status fail(wanrt_status status, const char *fmt, ...) {
    char message[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    return wanrt_cuda_fail(status, message);
}

wanrt_status launched(const char *what) {
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) return WANRT_OK;
    return fail(WANRT_ERR_CUDA, "%s launch: %s (%s)", what, cudaGetErrorName(err), cudaGetErrorString(err));
}

// ------------------------------------------------------------------ values

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// v rounded to T and back (the identity for float).
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

// N consecutive elements moved as one access (16 bytes for the wide variants).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

template <typename T, int N> __device__ __forceinline__ void unpack(const Pack<T, N> &pack, float (&out)[N]) {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_f32(pack.v[k]);
}

template <typename T, int N> __device__ __forceinline__ void load(const T *p, float (&out)[N]) {
    unpack(*reinterpret_cast<const Pack<T, N> *>(p), out);
}

template <typename T, int N> __device__ __forceinline__ void store(T *p, const float (&in)[N]) {
    Pack<T, N> pack;
#pragma unroll
    for (int k = 0; k < N; ++k) pack.v[k] = from_f32<T>(in[k]);
    *reinterpret_cast<Pack<T, N> *>(p) = pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum over the thread block (whole warps); every thread receives the total.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    v = warp_sum(v);
    __syncthreads();  // readers of an earlier call are done with `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    return warp_sum(v);
}

// ------------------------------------------------------------------ kernels
// Thread t of a row's block owns vectors t, t + blockDim, ... (kItems of them, kVec
// values each): consecutive threads touch consecutive 16-byte pieces.

// out = LN(x)·mul + add: LN without affine (mean, then the biased variance of the
// centred values, both float32), rounded to TI first when round_norm is set.
template <typename TI, typename TO, int kVec, int kItems>
__global__ void __launch_bounds__(1024) layer_norm_mul_add_kernel(const TI *__restrict__ x, TO *__restrict__ out,
                                                                  int dim, const float *__restrict__ mul,
                                                                  const float *__restrict__ add, int64_t row_stride,
                                                                  float eps, bool round_norm) {
    const int64_t row = blockIdx.x;
    x += row * dim;
    out += row * dim;
    mul += row * row_stride;
    add += row * row_stride;
    float v[kItems][kVec];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
        const int c = (threadIdx.x + i * blockDim.x) * kVec;
        if (c < dim) {
            load(x + c, v[i]);
#pragma unroll
            for (int k = 0; k < kVec; ++k) sum += v[i][k];
        }
    }
    const float mean = block_sum(sum) / (float)dim;
    float squares = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
        const int c = (threadIdx.x + i * blockDim.x) * kVec;
        if (c < dim) {
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
                const float d = v[i][k] - mean;
                squares += d * d;
            }
        }
    }
    const float rstd = rsqrtf(block_sum(squares) / (float)dim + eps);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
        const int c = (threadIdx.x + i * blockDim.x) * kVec;
        if (c < dim) {
            float m[kVec], a[kVec], y[kVec];
            load(mul + c, m);
            load(add + c, a);
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
                float n = (v[i][k] - mean) * rstd;
                if (round_norm) n = round_to<TI>(n);
                y[k] = n * m[k] + a[k];
            }
            store(out + c, y);
        }
    }
}

// In place: x = rope(RMSNorm(x) rounded to T, times weight). Rows below n_rot are
// rotated: values (2i, 2i+1) of a head by (cos, sin) = rot[row][i], in float64,
// then rounded to float32 and to T; later rows (padding) only normalized.
template <typename T, int kVec, int kItems>
__global__ void __launch_bounds__(1024) rms_norm_rope_kernel(T *__restrict__ x, int dim,
                                                             const float *__restrict__ weight, float eps,
                                                             const double2 *__restrict__ rot, int64_t n_rot,
                                                             int head_dim) {
    const int64_t row = blockIdx.x;
    x += row * dim;
    Pack<T, kVec> raw[kItems];  // the row as stored: half the registers of floats for bf16
    float squares = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
        const int c = (threadIdx.x + i * blockDim.x) * kVec;
        if (c < dim) {
            float v[kVec];
            raw[i] = *reinterpret_cast<const Pack<T, kVec> *>(x + c);
            unpack(raw[i], v);
#pragma unroll
            for (int k = 0; k < kVec; ++k) squares += v[k] * v[k];
        }
    }
    const float r = rsqrtf(block_sum(squares) * (1.0f / (float)dim) + eps);
    float y[kItems][kVec];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
        const int c = (threadIdx.x + i * blockDim.x) * kVec;
        if (c < dim) {
            float v[kVec], w[kVec];
            unpack(raw[i], v);
            load(weight + c, w);
#pragma unroll
            for (int k = 0; k < kVec; ++k) y[i][k] = round_to<T>(v[k] * r) * w[k];
        }
    }
    if constexpr (kVec >= 2) {
        if (row < n_rot) {
            const double2 *turn = rot + row * (head_dim / 2);
            // When the block's stride is a whole number of heads (the usual case), every
            // vector of a thread sits at the same place in its head: one read of its
            // rotations serves them all.
            const bool same_pairs = (blockDim.x * kVec) % head_dim == 0;
#pragma unroll
            for (int k = 0; k < kVec; k += 2) {
                const double2 shared_cs = same_pairs ? turn[((threadIdx.x * kVec + k) % head_dim) >> 1] : double2{};
#pragma unroll
                for (int i = 0; i < kItems; ++i) {
                    const int c = (threadIdx.x + i * blockDim.x) * kVec;
                    if (c < dim) {
                        const double2 cs = same_pairs ? shared_cs : turn[((c + k) % head_dim) >> 1];
                        const double a = y[i][k], b = y[i][k + 1];
                        y[i][k] = (float)(a * cs.x - b * cs.y);
                        y[i][k + 1] = (float)(a * cs.y + b * cs.x);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
        const int c = (threadIdx.x + i * blockDim.x) * kVec;
        if (c < dim) store(x + c, y[i]);
    }
}

// x += y·gate (gate null: x += y), float32.
template <typename TY, int kVec>
__global__ void gated_add_kernel(float *__restrict__ x, const TY *__restrict__ y, const float *__restrict__ gate,
                                 int64_t gate_stride, int dim) {
    const int64_t row = blockIdx.x;
    x += row * dim;
    y += row * dim;
    if (gate) gate += row * gate_stride;
    for (int c = threadIdx.x * kVec; c < dim; c += blockDim.x * kVec) {
        float a[kVec], b[kVec];
        load(x + c, a);
        load(y + c, b);
        if (gate) {
            float g[kVec];
            load(gate + c, g);
#pragma unroll
            for (int k = 0; k < kVec; ++k) a[k] = a[k] + b[k] * g[k];
        } else {
#pragma unroll
            for (int k = 0; k < kVec; ++k) a[k] = a[k] + b[k];
        }
        store(x + c, a);
    }
}

// ------------------------------------------------------------------ launches

constexpr int kMaxThreads = 1024;
constexpr int kWideItems = 4;     // vectors per thread, 16-byte variants
constexpr int kNarrowItems = 16;  // vectors per thread, 1- or 2-value variants
constexpr int kAddThreads = 256;

bool aligned(const void *p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whole warps covering a row of dim/vec vectors at `items` per thread (0: too wide).
int row_threads(int64_t dim, int vec, int items) {
    const int64_t per_warp = 32LL * vec * items;
    const int64_t threads = (dim + per_warp - 1) / per_warp * 32;
    return threads <= kMaxThreads ? (int)threads : 0;
}

wanrt_status check_rows(const char *fn, int64_t n_rows, int64_t dim) {
    if (n_rows < 0 || dim <= 0) {
        return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: %lld rows of %lld values", fn, (long long)n_rows, (long long)dim);
    }
    if (n_rows > INT32_MAX) {
        return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: %lld rows, more than one launch takes (%d)", fn,
                    (long long)n_rows, INT32_MAX);
    }
    return WANRT_OK;
}

wanrt_status too_wide(const char *fn, int64_t dim, int64_t most) {
    return fail(WANRT_ERR_UNSUPPORTED, "%s: rows of %lld values; at most %lld fit one thread block", fn,
                (long long)dim, (long long)most);
}

template <typename TI, typename TO>
wanrt_status layer_norm_mul_add(const void *x, void *out, int64_t n_rows, int64_t dim, const float *mul,
                                const float *add, int64_t row_stride, float eps, bool round_norm, cudaStream_t stream) {
    const char *fn = "wanrt_cuda_layer_norm_mul_add";
    constexpr int kWide = 16 / sizeof(TI);
    const bool wide = dim % kWide == 0 && row_stride % kWide == 0 && aligned(x, 16) &&
                      aligned(out, kWide * sizeof(TO)) && aligned(mul, 4 * kWide) && aligned(add, 4 * kWide);
    const TI *xi = static_cast<const TI *>(x);
    TO *o = static_cast<TO *>(out);
    if (wide) {
        const int threads = row_threads(dim, kWide, kWideItems);
        if (!threads) return too_wide(fn, dim, (int64_t)kMaxThreads * kWide * kWideItems);
        layer_norm_mul_add_kernel<TI, TO, kWide, kWideItems>
            <<<(unsigned)n_rows, threads, 0, stream>>>(xi, o, (int)dim, mul, add, row_stride, eps, round_norm);
    } else {
        const int threads = row_threads(dim, 1, kNarrowItems);
        if (!threads) return too_wide(fn, dim, (int64_t)kMaxThreads * kNarrowItems);
        layer_norm_mul_add_kernel<TI, TO, 1, kNarrowItems>
            <<<(unsigned)n_rows, threads, 0, stream>>>(xi, o, (int)dim, mul, add, row_stride, eps, round_norm);
    }
    return launched(fn);
}

template <typename TI>
wanrt_status layer_norm_mul_add_to(wanrt_type out_type, const void *x, void *out, int64_t n_rows, int64_t dim,
                                   const float *mul, const float *add, int64_t row_stride, float eps, bool round_norm,
                                   cudaStream_t stream) {
    if (out_type == WANRT_TYPE_F32) {
        return layer_norm_mul_add<TI, float>(x, out, n_rows, dim, mul, add, row_stride, eps, round_norm, stream);
    }
    return layer_norm_mul_add<TI, __nv_bfloat16>(x, out, n_rows, dim, mul, add, row_stride, eps, round_norm, stream);
}

template <typename T>
wanrt_status rms_norm_rope(void *x, int64_t n_rows, int64_t dim, const float *weight, float eps, const double2 *rot,
                           int64_t n_rot, int head_dim, cudaStream_t stream) {
    const char *fn = "wanrt_cuda_rms_norm_rope";
    constexpr int kWide = 16 / sizeof(T);
    T *xt = static_cast<T *>(x);
    // A vector never splits a rotated pair: vectors start at multiples of their even width.
    if (dim % kWide == 0 && aligned(x, 16) && aligned(weight, 4 * kWide)) {
        const int threads = row_threads(dim, kWide, kWideItems);
        if (!threads) return too_wide(fn, dim, (int64_t)kMaxThreads * kWide * kWideItems);
        rms_norm_rope_kernel<T, kWide, kWideItems>
            <<<(unsigned)n_rows, threads, 0, stream>>>(xt, (int)dim, weight, eps, rot, n_rot, head_dim);
    } else if (dim % 2 == 0 && aligned(x, 2 * sizeof(T)) && aligned(weight, 8)) {
        constexpr int kPairItems = kNarrowItems / 2;  // the same row length as one-value vectors
        const int threads = row_threads(dim, 2, kPairItems);
        if (!threads) return too_wide(fn, dim, (int64_t)kMaxThreads * 2 * kPairItems);
        rms_norm_rope_kernel<T, 2, kPairItems>
            <<<(unsigned)n_rows, threads, 0, stream>>>(xt, (int)dim, weight, eps, rot, n_rot, head_dim);
    } else if (n_rot == 0) {
        const int threads = row_threads(dim, 1, kNarrowItems);
        if (!threads) return too_wide(fn, dim, (int64_t)kMaxThreads * kNarrowItems);
        rms_norm_rope_kernel<T, 1, kNarrowItems>
            <<<(unsigned)n_rows, threads, 0, stream>>>(xt, (int)dim, weight, eps, rot, n_rot, head_dim);
    } else {
        return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: rotated rows need value pairs 2-value aligned", fn);
    }
    return launched(fn);
}

template <typename TY>
wanrt_status gated_add(float *x, const void *y, const float *gate, int64_t gate_stride, int64_t n_rows, int64_t dim,
                       cudaStream_t stream) {
    const TY *yt = static_cast<const TY *>(y);
    if (dim % 4 == 0 && gate_stride % 4 == 0 && aligned(x, 16) && aligned(y, 4 * sizeof(TY)) &&
        (!gate || aligned(gate, 16))) {
        gated_add_kernel<TY, 4><<<(unsigned)n_rows, kAddThreads, 0, stream>>>(x, yt, gate, gate_stride, (int)dim);
    } else {
        gated_add_kernel<TY, 1><<<(unsigned)n_rows, kAddThreads, 0, stream>>>(x, yt, gate, gate_stride, (int)dim);
    }
    return launched("wanrt_cuda_gated_add");
}

bool is_compute_type(wanrt_type t) { return t == WANRT_TYPE_F32 || t == WANRT_TYPE_BF16; }

}  // namespace

extern "C" {

wanrt_status wanrt_cuda_layer_norm_mul_add(int device, wanrt_type x_type, const void *x, wanrt_type out_type,
                                           void *out, int64_t n_rows, int64_t dim, const void *mul, const void *add,
                                           int64_t row_stride, float eps, int round_norm, void *stream) {
    const char *fn = "wanrt_cuda_layer_norm_mul_add";
    wanrt_status s = check_rows(fn, n_rows, dim);
    if (s != WANRT_OK) return s;
    if (!is_compute_type(x_type) || !is_compute_type(out_type)) {
        return fail(WANRT_ERR_UNSUPPORTED, "%s: types %d -> %d; expected f32 or bf16 each", fn, (int)x_type,
                    (int)out_type);
    }
    if (row_stride < 0) return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: negative row stride", fn);
    if (n_rows == 0) return WANRT_OK;
    if (!x || !out || !mul || !add) return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: null pointer", fn);
    if (!aligned(x, x_type == WANRT_TYPE_F32 ? 4 : 2) || !aligned(out, out_type == WANRT_TYPE_F32 ? 4 : 2) ||
        !aligned(mul, 4) || !aligned(add, 4)) {
        return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: a buffer is not aligned to its element size", fn);
    }
    WanrtDeviceGuard guard(device);
    cudaError_t err = guard.enter();
    if (err != cudaSuccess) return fail(WANRT_ERR_CUDA, "%s: device %d: %s", fn, device, cudaGetErrorName(err));
    const float *m = static_cast<const float *>(mul), *a = static_cast<const float *>(add);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    if (x_type == WANRT_TYPE_F32) {
        return layer_norm_mul_add_to<float>(out_type, x, out, n_rows, dim, m, a, row_stride, eps, false, st);
    }
    return layer_norm_mul_add_to<__nv_bfloat16>(out_type, x, out, n_rows, dim, m, a, row_stride, eps, round_norm != 0,
                                                 st);
}

wanrt_status wanrt_cuda_rms_norm_rope(int device, wanrt_type type, void *x, int64_t n_rows, int64_t dim,
                                      const void *weight, float eps, const void *rot, int64_t n_rot, int64_t head_dim,
                                      void *stream) {
    const char *fn = "wanrt_cuda_rms_norm_rope";
    wanrt_status s = check_rows(fn, n_rows, dim);
    if (s != WANRT_OK) return s;
    if (!is_compute_type(type)) return fail(WANRT_ERR_UNSUPPORTED, "%s: type %d; expected f32 or bf16", fn, (int)type);
    if (n_rot < 0 || n_rot > n_rows) {
        return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: %lld rotated rows of %lld", fn, (long long)n_rot,
                    (long long)n_rows);
    }
    if (n_rot > 0 && (head_dim <= 0 || head_dim % 2 != 0 || dim % head_dim != 0)) {
        return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: head size %lld does not split rows of %lld into value pairs", fn,
                    (long long)head_dim, (long long)dim);
    }
    if (n_rows == 0) return WANRT_OK;
    if (!x || !weight || (n_rot > 0 && !rot)) return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: null pointer", fn);
    if (!aligned(x, type == WANRT_TYPE_F32 ? 4 : 2) || !aligned(weight, 4) || (n_rot > 0 && !aligned(rot, 16))) {
        return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: a buffer is not aligned to its element size", fn);
    }
    WanrtDeviceGuard guard(device);
    cudaError_t err = guard.enter();
    if (err != cudaSuccess) return fail(WANRT_ERR_CUDA, "%s: device %d: %s", fn, device, cudaGetErrorName(err));
    const float *w = static_cast<const float *>(weight);
    const double2 *r = static_cast<const double2 *>(rot);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    const int hd = n_rot > 0 ? (int)head_dim : 2;
    if (type == WANRT_TYPE_F32) return rms_norm_rope<float>(x, n_rows, dim, w, eps, r, n_rot, hd, st);
    return rms_norm_rope<__nv_bfloat16>(x, n_rows, dim, w, eps, r, n_rot, hd, st);
}

wanrt_status wanrt_cuda_gated_add(int device, void *x, wanrt_type y_type, const void *y, const void *gate,
                                  int64_t gate_row_stride, int64_t n_rows, int64_t dim, void *stream) {
    const char *fn = "wanrt_cuda_gated_add";
    wanrt_status s = check_rows(fn, n_rows, dim);
    if (s != WANRT_OK) return s;
    if (!is_compute_type(y_type)) return fail(WANRT_ERR_UNSUPPORTED, "%s: y type %d; expected f32 or bf16", fn, (int)y_type);
    if (gate_row_stride < 0) return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: negative gate row stride", fn);
    if (n_rows == 0) return WANRT_OK;
    if (!x || !y) return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: null pointer", fn);
    if (!aligned(x, 4) || !aligned(y, y_type == WANRT_TYPE_F32 ? 4 : 2) || (gate && !aligned(gate, 4))) {
        return fail(WANRT_ERR_INVALID_ARGUMENT, "%s: a buffer is not aligned to its element size", fn);
    }
    WanrtDeviceGuard guard(device);
    cudaError_t err = guard.enter();
    if (err != cudaSuccess) return fail(WANRT_ERR_CUDA, "%s: device %d: %s", fn, device, cudaGetErrorName(err));
    float *xf = static_cast<float *>(x);
    const float *g = static_cast<const float *>(gate);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    if (y_type == WANRT_TYPE_F32) return gated_add<float>(xf, y, g, gate_row_stride, n_rows, dim, st);
    return gated_add<__nv_bfloat16>(xf, y, g, gate_row_stride, n_rows, dim, st);
}

}  // extern "C"
