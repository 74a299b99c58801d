// swm_fused::any_nonfinite on CPU: 1.0 if any element of any tensor is NaN or Inf, else 0.0.
// Every tensor is floating: swm_fused/ops.py leaves out the others, and csrc/validate.h checks.
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include "cpu/multi_tensor.h"

namespace swm_fused::cpu {
namespace {

at::Tensor any_nonfinite_cpu(at::TensorList tensors) {
  Staging staging;
  const std::vector<Operand> ops = stage_list(staging, tensors, false);
  return at::scalar_tensor(any_nonfinite_in(ops) ? 1.0 : 0.0, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CPU, m) { m.impl("any_nonfinite", &any_nonfinite_cpu); }

}  // namespace swm_fused::cpu
