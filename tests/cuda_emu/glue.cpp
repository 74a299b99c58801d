// Host-only glue of the emulated CUDA build (tests/cuda_emu): the swm_fused_emu schemas (copied at
// build time from the TORCH_LIBRARY block of csrc/ops.cpp) and a few ops that test the emulation
// layer itself (16-bit conversions, launch counters, the scheduler and barriers through the test-only
// kernels of selftest.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cuda_emu.h"

namespace cuda_emu_selftest {  // selftest.cu
int shfl(const double* in, double* out, long long* out_int, unsigned int blocks, unsigned int bx, unsigned int by,
         unsigned int delta);
int neighbour(const float* in, float* out, unsigned int blocks, unsigned int threads, int with_barriers);
int divergent(int mode, float* sink);
}  // namespace cuda_emu_selftest

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

std::vector<int64_t> emu_sync_stats() {
  return {::cuda_emu::detail::sync_stat(0), ::cuda_emu::detail::sync_stat(1), ::cuda_emu::detail::sync_stat(2)};
}

// Sets the scheduler's pass order (0: increasing thread index, 1: decreasing); returns the previous one.
int64_t emu_schedule(int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, "schedule mode is 0 (forward) or 1 (reverse)");
  const int64_t previous = ::cuda_emu::detail::schedule_mode();
  ::cuda_emu::detail::schedule_mode() = static_cast<int>(mode);
  return previous;
}

// in: float64, blocks * bx * by elements; returns (shuffled as double, shuffled as int64 of in's values).
std::vector<at::Tensor> emu_shfl(const at::Tensor& in, int64_t blocks, int64_t bx, int64_t by, int64_t delta) {
  TORCH_CHECK(in.scalar_type() == at::kDouble && in.is_contiguous() && in.numel() == blocks * bx * by);
  at::Tensor out = at::empty_like(in), out_int = at::empty(in.sizes(), in.options().dtype(at::kLong));
  const int err = cuda_emu_selftest::shfl(in.const_data_ptr<double>(), out.data_ptr<double>(),
                                          reinterpret_cast<long long*>(out_int.data_ptr<int64_t>()),
                                          static_cast<unsigned int>(blocks), static_cast<unsigned int>(bx),
                                          static_cast<unsigned int>(by), static_cast<unsigned int>(delta));
  TORCH_CHECK(err == 0, "launch error ", err);
  return {out, out_int};
}

at::Tensor emu_neighbour(const at::Tensor& in, int64_t blocks, int64_t threads, bool with_barriers) {
  TORCH_CHECK(in.scalar_type() == at::kFloat && in.is_contiguous() && in.numel() == blocks * threads);
  at::Tensor out = at::empty_like(in);
  const int err = cuda_emu_selftest::neighbour(in.const_data_ptr<float>(), out.data_ptr<float>(),
                                              static_cast<unsigned int>(blocks), static_cast<unsigned int>(threads),
                                              with_barriers ? 1 : 0);
  TORCH_CHECK(err == 0, "launch error ", err);
  return out;
}

void emu_divergent(int64_t mode) {
  std::vector<float> sink(64);
  TORCH_CHECK(cuda_emu_selftest::divergent(static_cast<int>(mode), sink.data()) == 0, "launch error");
}

}  // namespace

TORCH_LIBRARY(swm_fused_emu, m) {
#include "schemas.inc"
  m.def("_emu_float_to_half(Tensor x) -> Tensor", &emu_float_to_half);
  m.def("_emu_float_to_bfloat16(Tensor x) -> Tensor", &emu_float_to_bfloat16);
  m.def("_emu_half_to_float(Tensor bits) -> Tensor", &emu_half_to_float);
  m.def("_emu_stats() -> int[]", &emu_stats);
  m.def("_emu_sync_stats() -> int[]", &emu_sync_stats);
  m.def("_emu_schedule(int mode) -> int", &emu_schedule);
  m.def("_emu_shfl(Tensor x, int blocks, int bx, int by, int delta) -> Tensor[]", &emu_shfl);
  m.def("_emu_neighbour(Tensor x, int blocks, int threads, bool with_barriers) -> Tensor", &emu_neighbour);
  m.def("_emu_divergent(int mode) -> ()", &emu_divergent);
}
