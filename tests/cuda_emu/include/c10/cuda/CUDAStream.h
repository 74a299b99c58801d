// Shim for <c10/cuda/CUDAStream.h> (tests/cuda_emu): launches run synchronously, so every stream is
// the null stream.
#pragma once
#include <c10/core/Device.h>

#include "cuda_runtime_api.h"

namespace c10::cuda {

class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return stream(); }
  c10::DeviceIndex device_index() const { return 0; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }

}  // namespace c10::cuda
