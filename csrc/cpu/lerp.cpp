// swm_fused::lerp_ and lerp_multi_ on CPU: avg <- lerp(avg, src, w) over a list of tensors (for K
// averages at once in lerp_multi_), one pass over memory.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "cpu/step.h"

namespace swm_fused::cpu {
namespace {

template <typename C>
void lerp_range(const Operand& avg, const Operand& src, int64_t lo, int64_t hi, double weight) {
  alignas(64) C avg_buf[kBlock];
  alignas(64) C src_buf[kBlock];
  const bool no_conversion = avg.dtype == src.dtype && avg.dtype == c10::CppTypeToScalarType<C>::value;
  const int64_t step = no_conversion ? hi - lo : kBlock;
  for (int64_t b = lo; b < hi; b += step) {
    const int64_t n = std::min(step, hi - b);
    C* a = as_compute<C>(avg, b, n, avg_buf);
    lerp_inplace<C>(a, as_compute<C>(src, b, n, src_buf), n, static_cast<C>(weight));
    store<C>(avg, b, n, a);
  }
}

void lerp_cpu(at::TensorList avg, at::TensorList src, double weight,
              const std::optional<at::Tensor>& weight_tensor, const std::optional<at::Tensor>& found_inf) {
  Staging staging;
  const std::vector<Operand> avgs = stage_list(staging, avg, true);
  const std::vector<Operand> srcs = stage_list(staging, src, false);
  if (step_is_skipped(found_inf)) return;
  const double w = weight_tensor.has_value() ? weight_tensor->item<double>() : weight;
  parallel_over_tensors(avgs, 1, [&](size_t i, int64_t lo, int64_t hi) {
    if (avgs[i].dtype == at::kDouble) {
      lerp_range<double>(avgs[i], srcs[i], lo, hi, w);
    } else {
      lerp_range<float>(avgs[i], srcs[i], lo, hi, w);
    }
  });
  staging.write_back();
}

// avgs is k-major (avgs[k * n + i] pairs with src[i]). Blocks of kBlock elements run through all K
// averages while the source block is in L1: the source is read from memory once.
void lerp_multi_cpu(at::TensorList avg, at::TensorList src, at::ArrayRef<double> weights,
                    const std::optional<at::Tensor>& found_inf) {
  const size_t n = src.size(), k_total = weights.size();
  Staging staging;
  const std::vector<Operand> avgs = stage_list(staging, avg, true);
  const std::vector<Operand> srcs = stage_list(staging, src, false);
  if (step_is_skipped(found_inf)) return;
  parallel_over_tensors(srcs, static_cast<int64_t>(k_total), [&](size_t i, int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; b += kBlock) {
      const int64_t e = std::min(b + kBlock, hi);
      for (size_t k = 0; k < k_total; ++k) {
        const Operand& a = avgs[k * n + i];
        if (a.dtype == at::kDouble) {
          lerp_range<double>(a, srcs[i], b, e, weights[k]);
        } else {
          lerp_range<float>(a, srcs[i], b, e, weights[k]);
        }
      }
    }
  });
  staging.write_back();
}

}  // namespace

// csrc/cpu/step.h. The operands are staged once for the check and the average.
bool lerp_step(at::TensorList avg, at::TensorList src, double weight, bool check) {
  Staging staging;
  const std::vector<Operand> avgs = stage_list(staging, avg, true);
  const std::vector<Operand> srcs = stage_list(staging, src, false);
  if (check && any_nonfinite_in(srcs)) return true;
  parallel_over_tensors(avgs, 1, [&](size_t i, int64_t lo, int64_t hi) {
    if (avgs[i].dtype == at::kDouble) {
      lerp_range<double>(avgs[i], srcs[i], lo, hi, weight);
    } else {
      lerp_range<float>(avgs[i], srcs[i], lo, hi, weight);
    }
  });
  staging.write_back();
  return false;
}

TORCH_LIBRARY_IMPL(swm_fused, CPU, m) {
  m.impl("lerp_", &lerp_cpu);
  m.impl("lerp_multi_", &lerp_multi_cpu);
}

}  // namespace swm_fused::cpu
