/* Helpers shared by the .cu sources of the CUDA library (not part of the ABI). */
#ifndef WANRT_CUDA_INTERNAL_H
#define WANRT_CUDA_INTERNAL_H

#include <cuda_runtime.h>

#include "wanrt.h"

/* Record `message` as the calling thread's last CUDA-library error (the text
 * wanrt_cuda_last_error returns) and return status. */
wanrt_status wanrt_cuda_fail(wanrt_status status, const char *message);

/* Makes `device` current for this thread while in scope and restores the previous
 * device after: the driver context is shared with torch's runtime. */
class WanrtDeviceGuard {
  public:
    explicit WanrtDeviceGuard(int device) : target_(device) {}
    cudaError_t enter() {
        cudaError_t err = cudaGetDevice(&previous_);
        if (err == cudaSuccess && previous_ != target_) {
            err = cudaSetDevice(target_);
            switched_ = err == cudaSuccess;
        }
        return err;
    }
    ~WanrtDeviceGuard() {
        if (switched_) cudaSetDevice(previous_);
    }

  private:
    int target_;
    int previous_ = 0;
    bool switched_ = false;
};

#endif /* WANRT_CUDA_INTERNAL_H */
