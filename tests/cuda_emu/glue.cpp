// Host-only glue of the emulated CUDA build (tests/cuda_emu): the swm_fused_emu schemas (copied at
// build time from the TORCH_LIBRARY block of csrc/ops.cpp) and a few ops that test the emulation
// layer itself (16-bit conversions, launch counters).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cuda_emu.h"

namespace {

at::Tensor float_to_16(const at::Tensor& x, bool bf16) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu(), "expected a float32 CPU tensor");
  const at::Tensor src = x.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(at::kShort));
  const float* s = src.const_data_ptr<float>();
  int16_t* o = out.data_ptr<int16_t>();
  for (int64_t i = 0; i < src.numel(); ++i) {
    const unsigned short bits = bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(s[i])) : __half_as_ushort(__float2half_rn(s[i]));
    o[i] = static_cast<int16_t>(bits);
  }
  return out;
}

at::Tensor emu_float_to_half(const at::Tensor& x) { return float_to_16(x, false); }
at::Tensor emu_float_to_bfloat16(const at::Tensor& x) { return float_to_16(x, true); }

at::Tensor emu_half_to_float(const at::Tensor& bits) {
  TORCH_CHECK(bits.scalar_type() == at::kShort && bits.is_cpu(), "expected an int16 CPU tensor");
  const at::Tensor src = bits.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(at::kFloat));
  const int16_t* s = src.const_data_ptr<int16_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < src.numel(); ++i) o[i] = __half2float(__ushort_as_half(static_cast<unsigned short>(s[i])));
  return out;
}

std::vector<int64_t> emu_stats() {
  return {::cuda_emu::detail::launches, ::cuda_emu::detail::blocks_run};
}

}  // namespace

TORCH_LIBRARY(swm_fused_emu, m) {
#include "schemas.inc"
  m.def("_emu_float_to_half(Tensor x) -> Tensor", &emu_float_to_half);
  m.def("_emu_float_to_bfloat16(Tensor x) -> Tensor", &emu_float_to_bfloat16);
  m.def("_emu_half_to_float(Tensor bits) -> Tensor", &emu_half_to_float);
  m.def("_emu_stats() -> int[]", &emu_stats);
}
