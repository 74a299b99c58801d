// swm_fused::merge_ on CPU: out <- sum_k weights[k] * inputs[k], K inputs per output, one pass.
#include <torch/library.h>

#include "cpu/multi_tensor.h"

namespace swm_fused::cpu {
namespace {

// acc <- w * x, then acc <- acc + w * x per further input: a product rounded, then a sum
// rounded, as torch computes `acc + w * x` (the build disables fp contraction).
template <typename C>
void scale(C* __restrict acc, const C* __restrict x, int64_t n, C w) {
  for (int64_t i = 0; i < n; ++i) acc[i] = w * x[i];
}

template <typename C>
void accumulate(C* __restrict acc, const C* __restrict x, int64_t n, C w) {
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + w * x[i];
}

// `inputs[k * stride]` is input k of this output. The block of `out` is stored only after
// every input's block was read, so `out` may be one of the inputs.
template <typename C>
void merge_range(const Operand& out, const Operand* inputs, size_t stride, c10::ArrayRef<double> weights,
                 int64_t lo, int64_t hi) {
  alignas(64) C acc[kBlock];
  alignas(64) C x_buf[kBlock];
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int64_t n = std::min(kBlock, hi - b);
    scale<C>(acc, as_compute<C>(inputs[0], b, n, x_buf), n, static_cast<C>(weights[0]));
    for (size_t k = 1; k < weights.size(); ++k)
      accumulate<C>(acc, as_compute<C>(inputs[k * stride], b, n, x_buf), n, static_cast<C>(weights[k]));
    store<C>(out, b, n, acc);
  }
}

void merge_cpu(at::TensorList out, at::TensorList inputs, at::ArrayRef<double> weights) {
  const size_t n_out = out.size(), k = weights.size();
  TORCH_CHECK(k >= 1, "merge_: weights is empty; give at least one input list");
  TORCH_CHECK(inputs.size() == k * n_out, "merge_: expected ", k, " x ", n_out, " inputs (k-major), got ",
              inputs.size());
  Staging staging;
  const std::vector<Operand> outs = stage_list(staging, out, true, "merge_");
  const std::vector<Operand> ins = stage_list(staging, inputs, false, "merge_");
  for (size_t j = 0; j < k; ++j)
    check_numels(outs, std::vector<Operand>(ins.begin() + j * n_out, ins.begin() + (j + 1) * n_out), "merge_");
  parallel_over_tensors(outs, static_cast<int64_t>(k), [&](size_t i, int64_t lo, int64_t hi) {
    if (outs[i].dtype == at::kDouble) {
      merge_range<double>(outs[i], &ins[i], n_out, weights, lo, hi);
    } else {
      merge_range<float>(outs[i], &ins[i], n_out, weights, lo, hi);
    }
  });
  staging.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CPU, m) { m.impl("merge_", &merge_cpu); }

}  // namespace swm_fused::cpu
