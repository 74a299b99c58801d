// swm_fused::sq_norm on CPU: sum over every tensor of (scale * t)^2, one 0-dim tensor (float64 when a
// tensor is float64, else float32).
// Each square is computed in the tensor's compute type (double for float64 tensors, else float) and
// the squares are summed in double, in fixed slices whose partial sums are added in order, so the
// result does not depend on the number of threads.
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include "cpu/multi_tensor.h"

namespace swm_fused::cpu {
namespace {

// Elements per partial sum: fixed, so results repeat bit for bit on any thread count.
constexpr int64_t kSlice = 16 * kBlock;

template <typename C>
double sum_squares(const Operand& t, const Operand* scale, int64_t lo, int64_t hi) {
  alignas(64) C t_buf[kBlock];
  alignas(64) C s_buf[kBlock];
  double total = 0.0;
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int64_t n = std::min(kBlock, hi - b);
    const C* x = as_compute<C>(t, b, n, t_buf);
    double block = 0.0;
    if (scale != nullptr) {
      const C* s = as_compute<C>(*scale, b, n, s_buf);
      for (int64_t i = 0; i < n; ++i) {
        const C v = s[i] * x[i];
        block += static_cast<double>(v * v);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) block += static_cast<double>(x[i] * x[i]);
    }
    total += block;
  }
  return total;
}

at::Tensor sq_norm_cpu(at::TensorList tensors, at::TensorList scale) {
  Staging staging;
  const std::vector<Operand> xs = stage_list(staging, tensors, false);
  const std::vector<Operand> ss = stage_list(staging, scale, false);
  const bool scaled = !ss.empty();
  // One partial per (tensor, slice), filled in parallel, added in order.
  std::vector<int64_t> first(xs.size() + 1, 0);
  for (size_t i = 0; i < xs.size(); ++i) first[i + 1] = first[i] + (xs[i].numel + kSlice - 1) / kSlice;
  std::vector<double> partials(static_cast<size_t>(first.back()), 0.0);
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t p = begin; p < end; ++p) {
      while (first[i + 1] <= p) ++i;
      const int64_t lo = (p - first[i]) * kSlice, hi = std::min(xs[i].numel, lo + kSlice);
      const Operand* s = scaled ? &ss[i] : nullptr;
      partials[p] = xs[i].dtype == at::kDouble ? sum_squares<double>(xs[i], s, lo, hi)
                                               : sum_squares<float>(xs[i], s, lo, hi);
    }
  });
  double total = 0.0;
  bool any_double = false;
  for (const double p : partials) total += p;
  for (const at::Tensor& t : tensors) any_double = any_double || t.scalar_type() == at::kDouble;
  return at::scalar_tensor(total, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CPU, m) { m.impl("sq_norm", &sq_norm_cpu); }

}  // namespace swm_fused::cpu
