// Shim for <c10/cuda/CUDAException.h> (tests/cuda_emu): C10_CUDA_CHECK over the emulated runtime.
#pragma once
#include <c10/util/Exception.h>

#include "cuda_runtime_api.h"

#define C10_CUDA_CHECK(EXPR)                                                                   \
  do {                                                                                         \
    const cudaError_t cuda_emu_err_ = (EXPR);                                                  \
    TORCH_CHECK(cuda_emu_err_ == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorName(cuda_emu_err_), ": ", \
                cudaGetErrorString(cuda_emu_err_));                                            \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
