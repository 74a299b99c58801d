// swm_fused::any_nonfinite on CPU: 1.0 if any element of any tensor is NaN or Inf, else 0.0.
// Every tensor is floating: swm_fused/ops.py leaves out the others, and csrc/validate.h checks.
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <atomic>

#include "cpu/multi_tensor.h"

namespace swm_fused::cpu {
namespace {

// True when some |x| has an all-ones exponent: the largest magnitude bit pattern tells.
template <typename Bits>
bool has_nonfinite_bits(const Bits* p, int64_t n, Bits magnitude_mask, Bits exponent_mask) {
  Bits largest = 0;
  for (int64_t i = 0; i < n; ++i) largest = std::max<Bits>(largest, p[i] & magnitude_mask);
  return largest >= exponent_mask;
}

bool has_nonfinite(const Operand& t, int64_t begin, int64_t n) {
  switch (t.dtype) {
    case at::kFloat:
      return has_nonfinite_bits<uint32_t>(static_cast<const uint32_t*>(t.data) + begin, n, 0x7FFFFFFFu,
                                          0x7F800000u);
    case at::kDouble:
      return has_nonfinite_bits<uint64_t>(static_cast<const uint64_t*>(t.data) + begin, n,
                                          0x7FFFFFFFFFFFFFFFull, 0x7FF0000000000000ull);
    case at::kBFloat16:
      return has_nonfinite_bits<uint16_t>(static_cast<const uint16_t*>(t.data) + begin, n, 0x7FFF, 0x7F80);
    default:  // at::kHalf
      return has_nonfinite_bits<uint16_t>(static_cast<const uint16_t*>(t.data) + begin, n, 0x7FFF, 0x7C00);
  }
}

at::Tensor any_nonfinite_cpu(at::TensorList tensors) {
  Staging staging;
  const std::vector<Operand> ops = stage_list(staging, tensors, false);
  std::atomic<bool> found{false};
  // Scans in slices so a thread stops soon after any thread found one.
  constexpr int64_t kSlice = 16 * kBlock;
  parallel_over_tensors(ops, 1, [&](size_t i, int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi && !found.load(std::memory_order_relaxed); b += kSlice) {
      if (has_nonfinite(ops[i], b, std::min(kSlice, hi - b))) found.store(true, std::memory_order_relaxed);
    }
  });
  return at::scalar_tensor(found.load() ? 1.0 : 0.0, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CPU, m) { m.impl("any_nonfinite", &any_nonfinite_cpu); }

}  // namespace swm_fused::cpu
