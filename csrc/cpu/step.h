// The CPU half of BoundLists.run_step_ (csrc/bound.cpp): the NaN/Inf check and the average of one
// update over CPU tensors, with the operands staged once for both (the ops any_nonfinite and lerp_
// would each stage, and each be validated, again). The caller has validated the lists with
// validate::lerp_args, which covers every rule of both ops, so every tensor is a CPU tensor.
#pragma once

#include <ATen/core/Tensor.h>

namespace swm_fused::cpu {

// With `check`, returns true and changes nothing when some src element is NaN or Inf (exactly
// any_nonfinite(src) != 0); otherwise avg <- lerp(avg, src, weight), bit for bit the lerp_ kernel,
// and returns false.
bool lerp_step(at::TensorList avg, at::TensorList src, double weight, bool check);

}  // namespace swm_fused::cpu
