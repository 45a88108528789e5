// CUDA side of the wanrt ABI: device queries, a fill kernel that proves the
// path, and exact decoding of ggml legacy blocks and 16-bit floats.
//
// Every entry works on memory torch allocated and on the caller's stream; none
// allocates, synchronizes or exits. Values are decoded in float32 (d*q is exact
// for every legacy type) and rounded once to the output type, as the torch twin
// does. Block fields are read byte by byte: blocks of 18/20/22 bytes leave the
// fp16 scales 2-aligned at best and the Q5 high bits unaligned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_internal.h"
#include "wanrt.h"

namespace {

thread_local char last_error[1024];

wanrt_status fail(wanrt_status status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}

wanrt_status cuda_fail(cudaError_t err, const char *what) {
    return fail(WANRT_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorName(err), cudaGetErrorString(err));
}

// Makes `device` current for this thread and restores the previous device when
// it goes out of scope: the driver context is shared with torch's runtime.
class DeviceGuard {
  public:
    explicit DeviceGuard(int device) : target_(device) {}
    wanrt_status enter() {
        cudaError_t err = cudaGetDevice(&previous_);
        if (err != cudaSuccess) return cuda_fail(err, "cudaGetDevice");
        if (previous_ != target_) {
            err = cudaSetDevice(target_);
            if (err != cudaSuccess) return cuda_fail(err, "cudaSetDevice");
            switched_ = true;
        }
        return WANRT_OK;
    }
    ~DeviceGuard() {
        if (switched_) cudaSetDevice(previous_);
    }

  private:
    int target_;
    int previous_ = 0;
    bool switched_ = false;
};

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 1 << 20;  // grid-stride loops cover larger tensors

int grid_for(int64_t n) {
    int64_t blocks = (n + kThreads - 1) / kThreads;
    return (int)(blocks < kMaxGrid ? blocks : kMaxGrid);
}

// ------------------------------------------------------------------ fill

__global__ void fill_u8_kernel(uint8_t *dst, uint8_t value, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        dst[i] = value;
    }
}

// ------------------------------------------------------------ conversions

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float fp16_at(const uint8_t *p) {
    return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

__device__ __forceinline__ uint32_t u32_at(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

// Byte j of qs holds element j (low nibble) and element j+16 (high nibble).
__device__ __forceinline__ int nibble(const uint8_t *qs, int j) {
    return j < 16 ? (qs[j] & 0x0f) : (qs[j - 16] >> 4);
}

__device__ __forceinline__ int fifth_bit(const uint8_t *qh, int j) { return (int)((u32_at(qh) >> j) & 1u) << 4; }

// One struct per block format: its size and element j of a block at b.
struct Q8_0 {
    static constexpr int kBytes = sizeof(wanrt_block_q8_0);
    __device__ static float value(const uint8_t *b, int j) {
        return __fmul_rn(fp16_at(b), (float)(int8_t)b[2 + j]);
    }
};

struct Q4_0 {
    static constexpr int kBytes = sizeof(wanrt_block_q4_0);
    __device__ static float value(const uint8_t *b, int j) {
        return __fmul_rn(fp16_at(b), (float)(nibble(b + 2, j) - 8));
    }
};

struct Q4_1 {
    static constexpr int kBytes = sizeof(wanrt_block_q4_1);
    __device__ static float value(const uint8_t *b, int j) {
        return __fadd_rn(__fmul_rn(fp16_at(b), (float)nibble(b + 4, j)), fp16_at(b + 2));
    }
};

struct Q5_0 {
    static constexpr int kBytes = sizeof(wanrt_block_q5_0);
    __device__ static float value(const uint8_t *b, int j) {
        return __fmul_rn(fp16_at(b), (float)((nibble(b + 6, j) | fifth_bit(b + 2, j)) - 16));
    }
};

struct Q5_1 {
    static constexpr int kBytes = sizeof(wanrt_block_q5_1);
    __device__ static float value(const uint8_t *b, int j) {
        return __fadd_rn(__fmul_rn(fp16_at(b), (float)(nibble(b + 8, j) | fifth_bit(b + 4, j))), fp16_at(b + 2));
    }
};

template <typename Q, typename T>
__global__ void dequantize_kernel(const uint8_t *__restrict__ src, T *__restrict__ dst, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        dst[i] = from_f32<T>(Q::value(src + (i / WANRT_QK) * Q::kBytes, (int)(i % WANRT_QK)));
    }
}

template <typename S, typename T>
__global__ void convert_kernel(const S *__restrict__ src, T *__restrict__ dst, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        dst[i] = from_f32<T>(to_f32(src[i]));
    }
}

template <typename T>
wanrt_status launch_for_output(wanrt_type type, const void *src, T *dst, int64_t n, cudaStream_t stream) {
    const int grid = grid_for(n);
    const uint8_t *bytes = static_cast<const uint8_t *>(src);
    switch (type) {
    case WANRT_TYPE_Q8_0: dequantize_kernel<Q8_0, T><<<grid, kThreads, 0, stream>>>(bytes, dst, n); break;
    case WANRT_TYPE_Q4_0: dequantize_kernel<Q4_0, T><<<grid, kThreads, 0, stream>>>(bytes, dst, n); break;
    case WANRT_TYPE_Q4_1: dequantize_kernel<Q4_1, T><<<grid, kThreads, 0, stream>>>(bytes, dst, n); break;
    case WANRT_TYPE_Q5_0: dequantize_kernel<Q5_0, T><<<grid, kThreads, 0, stream>>>(bytes, dst, n); break;
    case WANRT_TYPE_Q5_1: dequantize_kernel<Q5_1, T><<<grid, kThreads, 0, stream>>>(bytes, dst, n); break;
    case WANRT_TYPE_F32:
        convert_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float *>(src), dst, n);
        break;
    case WANRT_TYPE_F16:
        convert_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __half *>(src), dst, n);
        break;
    case WANRT_TYPE_BF16:
        convert_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16 *>(src), dst, n);
        break;
    default:
        return fail(WANRT_ERR_UNSUPPORTED, "wanrt_cuda_dequantize: no kernel for type id %d", (int)type);
    }
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? WANRT_OK : cuda_fail(err, "wanrt_cuda_dequantize launch");
}

int element_bytes(wanrt_type type) {
    switch (type) {
    case WANRT_TYPE_F32: return 4;
    case WANRT_TYPE_F16:
    case WANRT_TYPE_BF16: return 2;
    default: return 0;
    }
}

bool is_block_type(wanrt_type type) {
    return type == WANRT_TYPE_Q8_0 || type == WANRT_TYPE_Q4_0 || type == WANRT_TYPE_Q4_1 || type == WANRT_TYPE_Q5_0 ||
           type == WANRT_TYPE_Q5_1;
}

}  // namespace

// For the library's other .cu files (cuda_internal.h): one last-error text per thread.
wanrt_status wanrt_cuda_fail(wanrt_status status, const char *message) { return fail(status, "%s", message); }

extern "C" {

const char *wanrt_cuda_last_error(void) { return last_error; }

wanrt_status wanrt_cuda_runtime_version(int *version) {
    if (!version) return fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_cuda_runtime_version: null pointer");
    cudaError_t err = cudaRuntimeGetVersion(version);
    return err == cudaSuccess ? WANRT_OK : cuda_fail(err, "cudaRuntimeGetVersion");
}

wanrt_status wanrt_cuda_driver_version(int *version) {
    if (!version) return fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_cuda_driver_version: null pointer");
    cudaError_t err = cudaDriverGetVersion(version);
    return err == cudaSuccess ? WANRT_OK : cuda_fail(err, "cudaDriverGetVersion");
}

wanrt_status wanrt_cuda_device_count(int *count) {
    if (!count) return fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_cuda_device_count: null pointer");
    cudaError_t err = cudaGetDeviceCount(count);
    return err == cudaSuccess ? WANRT_OK : cuda_fail(err, "cudaGetDeviceCount");
}

wanrt_status wanrt_cuda_kernel_arch(int device, int *binary_version, int *ptx_version) {
    if (!binary_version || !ptx_version) return fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_cuda_kernel_arch: null pointer");
    DeviceGuard guard(device);
    wanrt_status s = guard.enter();
    if (s != WANRT_OK) return s;
    cudaFuncAttributes attr;
    cudaError_t err = cudaFuncGetAttributes(&attr, fill_u8_kernel);
    if (err != cudaSuccess) return cuda_fail(err, "cudaFuncGetAttributes (no kernel image for this GPU?)");
    *binary_version = attr.binaryVersion;
    *ptx_version = attr.ptxVersion;
    return WANRT_OK;
}

wanrt_status wanrt_cuda_fill_u8(int device, void *dst, uint8_t value, uint64_t nbytes, void *stream) {
    if (nbytes == 0) return WANRT_OK;
    if (!dst) return fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_cuda_fill_u8: null pointer");
    DeviceGuard guard(device);
    wanrt_status s = guard.enter();
    if (s != WANRT_OK) return s;
    fill_u8_kernel<<<grid_for((int64_t)(nbytes < (uint64_t)INT64_MAX ? nbytes : INT64_MAX)), kThreads, 0,
                     static_cast<cudaStream_t>(stream)>>>(static_cast<uint8_t *>(dst), value, nbytes);
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? WANRT_OK : cuda_fail(err, "wanrt_cuda_fill_u8 launch");
}

wanrt_status wanrt_cuda_dequantize(int device, wanrt_type type, const void *src, wanrt_type dst_type, void *dst,
                                   int64_t n_elements, void *stream) {
    if (n_elements < 0) return fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_cuda_dequantize: negative count");
    if (n_elements == 0) return WANRT_OK;
    if (!src || !dst) return fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_cuda_dequantize: null pointer");
    const int out_bytes = element_bytes(dst_type);
    if (out_bytes == 0) {
        return fail(WANRT_ERR_UNSUPPORTED, "wanrt_cuda_dequantize: output type id %d is not f32, f16 or bf16",
                    (int)dst_type);
    }
    if (reinterpret_cast<uintptr_t>(dst) % out_bytes != 0) {
        return fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_cuda_dequantize: output at %p is not %d-byte aligned", dst,
                    out_bytes);
    }
    if (is_block_type(type)) {
        if (n_elements % WANRT_QK != 0) {
            return fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_cuda_dequantize: %lld elements are not whole %d-value blocks",
                        (long long)n_elements, WANRT_QK);
        }
    } else {
        const int in_bytes = element_bytes(type);
        if (in_bytes == 0) return fail(WANRT_ERR_UNSUPPORTED, "wanrt_cuda_dequantize: no kernel for type id %d", (int)type);
        if (reinterpret_cast<uintptr_t>(src) % in_bytes != 0) {
            return fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_cuda_dequantize: input at %p is not %d-byte aligned", src,
                        in_bytes);
        }
    }
    DeviceGuard guard(device);
    wanrt_status s = guard.enter();
    if (s != WANRT_OK) return s;
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    switch (dst_type) {
    case WANRT_TYPE_F32: return launch_for_output(type, src, static_cast<float *>(dst), n_elements, st);
    case WANRT_TYPE_F16: return launch_for_output(type, src, static_cast<__half *>(dst), n_elements, st);
    default: return launch_for_output(type, src, static_cast<__nv_bfloat16 *>(dst), n_elements, st);
    }
}

}  // extern "C"
