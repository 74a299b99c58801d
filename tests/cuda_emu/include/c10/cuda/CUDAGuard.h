// Shim for <c10/cuda/CUDAGuard.h> (tests/cuda_emu): there is one emulated device, the CPU, so the
// guards only insist that they are given a CPU device (the tensors the emulated ops receive).
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <optional>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "emulated CUDAGuard: expected a CPU tensor, got one on ", device);
  }
  explicit CUDAGuard(c10::DeviceIndex) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device> device) {
    TORCH_CHECK(!device.has_value() || device->is_cpu(), "emulated OptionalCUDAGuard: expected a CPU tensor");
  }
};

}  // namespace c10::cuda
