// swm_fused::merge_ on CPU: out <- sum_k weights[k] * inputs[k], K inputs per output, one pass.
#include <torch/library.h>

#include "cpu/multi_tensor.h"

namespace swm_fused::cpu {
namespace {

// Inputs read together in one pass over a block. Reading a few inputs side by side keeps
// every input streaming; one pass per input over the block runs at half that bandwidth.
constexpr size_t kGroup = 4;
// Elements per block: bigger than kBlock, as longer runs per input stream faster here.
constexpr int64_t kMergeBlock = 2048;

// acc <- w[0] * x[0], then acc <- acc + w[g] * x[g] for each further input when `first`;
// else acc <- acc + w[g] * x[g] for every g. A product rounded, then a sum rounded, as
// torch computes `acc + w * x` (the build disables fp contraction).
template <typename C, size_t G>
void accumulate_group(C* __restrict acc, const C* const* x, const C* w, int64_t n, bool first) {
  if (first) {
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      C a = w[0] * x[0][i];
      for (size_t g = 1; g < G; ++g) a = a + w[g] * x[g][i];
      acc[i] = a;
    }
  } else {
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      C a = acc[i];
      for (size_t g = 0; g < G; ++g) a = a + w[g] * x[g][i];
      acc[i] = a;
    }
  }
}

template <typename C>
void accumulate_group(C* acc, const C* const* x, const C* w, size_t group, int64_t n, bool first) {
  switch (group) {
    case 1: return accumulate_group<C, 1>(acc, x, w, n, first);
    case 2: return accumulate_group<C, 2>(acc, x, w, n, first);
    case 3: return accumulate_group<C, 3>(acc, x, w, n, first);
    default: return accumulate_group<C, kGroup>(acc, x, w, n, first);
  }
}

// `inputs[k * stride]` is input k of this output. The block of `out` is stored only after
// every input's block was read, so `out` may be one of the inputs.
template <typename C>
void merge_range(const Operand& out, const Operand* inputs, size_t stride, const std::vector<C>& w,
                 int64_t lo, int64_t hi) {
  static_assert(kGroup == 4, "accumulate_group's switch covers groups of 1 to 4 inputs");
  alignas(64) C acc[kMergeBlock];
  alignas(64) C x_buf[kGroup][kMergeBlock];
  const C* x[kGroup];
  for (int64_t b = lo; b < hi; b += kMergeBlock) {
    const int64_t n = std::min(kMergeBlock, hi - b);
    for (size_t k0 = 0; k0 < w.size(); k0 += kGroup) {
      const size_t group = std::min(kGroup, w.size() - k0);
      for (size_t g = 0; g < group; ++g) x[g] = as_compute<C>(inputs[(k0 + g) * stride], b, n, x_buf[g]);
      accumulate_group<C>(acc, x, &w[k0], group, n, k0 == 0);
    }
    store<C>(out, b, n, acc);
  }
}

// inputs is k-major (inputs[k * n_out + i] pairs with out[i]); validated in csrc/validate.h.
void merge_cpu(at::TensorList out, at::TensorList inputs, at::ArrayRef<double> weights) {
  const size_t n_out = out.size(), k = weights.size();
  Staging staging;
  const std::vector<Operand> outs = stage_list(staging, out, true);
  const std::vector<Operand> ins = stage_list(staging, inputs, false);
  const std::vector<double> weights_double(weights.begin(), weights.end());
  const std::vector<float> weights_float(weights.begin(), weights.end());
  parallel_over_tensors(outs, static_cast<int64_t>(k), [&](size_t i, int64_t lo, int64_t hi) {
    if (outs[i].dtype == at::kDouble) {
      merge_range<double>(outs[i], &ins[i], n_out, weights_double, lo, hi);
    } else {
      merge_range<float>(outs[i], &ins[i], n_out, weights_float, lo, hi);
    }
  });
  staging.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CPU, m) { m.impl("merge_", &merge_cpu); }

}  // namespace swm_fused::cpu
