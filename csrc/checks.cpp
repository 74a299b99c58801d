// Puts csrc/validate.h in front of every swm_fused op, on every device and every backend.
//
// * The compiled kernels (csrc/cpu/, csrc/cuda/) are reached through BackendSelect kernels that
//   validate, then redispatch. BackendSelect rather than the device kernels because the dispatcher
//   picks one kernel for a whole call from all tensors' devices: a CPU list with a meta (or CUDA)
//   tensor in it never reaches the CPU kernel, and the meta (fake) kernel would accept it silently.
//   BackendSelect runs for every call with real tensors (torch keeps it in every thread's included
//   keys) after autograd and Python modes, so fake-tensor tracing is untouched.
// * The Python backends (reference, triton) call the check_* ops, CompositeImplicitAutograd
//   kernels that run the same validation on any device (meta and fake tensors included) and leave
//   nothing in a traced graph.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

#include "validate.h"

namespace swm_fused {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Redispatching with these keys skips BackendSelect and reaches the device's kernel.
constexpr c10::DispatchKeySet kAfterBackendSelect(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);

using LerpFn = void(at::TensorList, at::TensorList, double, const OptTensor&, const OptTensor&);
using SwagFn = void(at::TensorList, at::TensorList, at::TensorList, double, const OptTensor&, const OptTensor&);
using MergeFn = void(at::TensorList, at::TensorList, at::ArrayRef<double>);
using AnyNonfiniteFn = at::Tensor(at::TensorList);
using LerpMultiFn = void(at::TensorList, at::TensorList, at::ArrayRef<double>, const OptTensor&);
using SqNormFn = at::Tensor(at::TensorList, at::TensorList);
using SamAscentFn = void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, bool, const OptTensor&);
using TiesMergeFn = void(at::TensorList, at::TensorList, at::ArrayRef<double>, at::TensorList, const OptTensor&,
                         c10::string_view, bool, double, bool);
using DareDropFn = void(at::TensorList, at::TensorList, at::TensorList, double, bool);

template <typename Fn>
c10::TypedOperatorHandle<Fn> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

void lerp_checked(c10::DispatchKeySet keys, at::TensorList avg, at::TensorList src, double weight,
                  const OptTensor& weight_tensor, const OptTensor& found_inf) {
  validate::lerp_args(avg, src, weight_tensor, found_inf);
  static const auto op = handle<LerpFn>("swm_fused::lerp_");
  op.redispatch(keys & kAfterBackendSelect, avg, src, weight, weight_tensor, found_inf);
}

void swag_checked(c10::DispatchKeySet keys, at::TensorList mean, at::TensorList sq_mean, at::TensorList src,
                  double weight, const OptTensor& weight_tensor, const OptTensor& found_inf) {
  validate::swag_args(mean, sq_mean, src, weight_tensor, found_inf);
  static const auto op = handle<SwagFn>("swm_fused::swag_");
  op.redispatch(keys & kAfterBackendSelect, mean, sq_mean, src, weight, weight_tensor, found_inf);
}

void merge_checked(c10::DispatchKeySet keys, at::TensorList out, at::TensorList inputs, at::ArrayRef<double> weights) {
  validate::merge_args(out, inputs, weights.size());
  static const auto op = handle<MergeFn>("swm_fused::merge_");
  op.redispatch(keys & kAfterBackendSelect, out, inputs, weights);
}

void lerp_multi_checked(c10::DispatchKeySet keys, at::TensorList avgs, at::TensorList src,
                        at::ArrayRef<double> weights, const OptTensor& found_inf) {
  validate::lerp_multi_args(avgs, src, weights.size(), found_inf);
  static const auto op = handle<LerpMultiFn>("swm_fused::lerp_multi_");
  op.redispatch(keys & kAfterBackendSelect, avgs, src, weights, found_inf);
}

at::Tensor any_nonfinite_checked(c10::DispatchKeySet keys, at::TensorList tensors) {
  validate::any_nonfinite_args(tensors);
  static const auto op = handle<AnyNonfiniteFn>("swm_fused::any_nonfinite");
  return op.redispatch(keys & kAfterBackendSelect, tensors);
}

at::Tensor sq_norm_checked(c10::DispatchKeySet keys, at::TensorList tensors, at::TensorList scale) {
  validate::sq_norm_args(tensors, scale);
  static const auto op = handle<SqNormFn>("swm_fused::sq_norm");
  return op.redispatch(keys & kAfterBackendSelect, tensors, scale);
}

void sam_ascent_checked(c10::DispatchKeySet keys, at::TensorList params, at::TensorList grads, at::TensorList saved,
                        const at::Tensor& scale, bool adaptive, const OptTensor& found_inf) {
  validate::sam_ascent_args(params, grads, saved, scale, found_inf);
  static const auto op = handle<SamAscentFn>("swm_fused::sam_ascent_");
  op.redispatch(keys & kAfterBackendSelect, params, grads, saved, scale, adaptive, found_inf);
}

void ties_merge_checked(c10::DispatchKeySet keys, at::TensorList out, at::TensorList inputs,
                        at::ArrayRef<double> weights, at::TensorList base, const OptTensor& thresholds,
                        c10::string_view majority_sign, bool normalize, double scale, bool task_vectors) {
  validate::ties_merge_args(out, inputs, weights.size(), base, thresholds, majority_sign);
  static const auto op = handle<TiesMergeFn>("swm_fused::ties_merge_");
  op.redispatch(keys & kAfterBackendSelect, out, inputs, weights, base, thresholds, majority_sign, normalize, scale,
                task_vectors);
}

void dare_drop_checked(c10::DispatchKeySet keys, at::TensorList deltas, at::TensorList u, at::TensorList keep_prob,
                       double p, bool rescale) {
  validate::dare_drop_args(deltas, u, keep_prob);
  static const auto op = handle<DareDropFn>("swm_fused::dare_drop_");
  op.redispatch(keys & kAfterBackendSelect, deltas, u, keep_prob, p, rescale);
}

void check_merge(at::TensorList out, at::TensorList inputs, int64_t num_weights) {
  TORCH_CHECK_VALUE(num_weights >= 0, "num_weights must be >= 0, got ", num_weights);
  validate::merge_args(out, inputs, static_cast<size_t>(num_weights));
}

void check_lerp_multi(at::TensorList avgs, at::TensorList src, int64_t num_weights, const OptTensor& found_inf) {
  TORCH_CHECK_VALUE(num_weights >= 0, "num_weights must be >= 0, got ", num_weights);
  validate::lerp_multi_args(avgs, src, static_cast<size_t>(num_weights), found_inf);
}

void check_ties_merge(at::TensorList out, at::TensorList inputs, int64_t num_weights, at::TensorList base,
                      const OptTensor& thresholds, c10::string_view majority_sign) {
  TORCH_CHECK_VALUE(num_weights >= 0, "num_weights must be >= 0, got ", num_weights);
  validate::ties_merge_args(out, inputs, static_cast<size_t>(num_weights), base, thresholds, majority_sign);
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, BackendSelect, m) {
  m.impl("lerp_", &lerp_checked);
  m.impl("swag_", &swag_checked);
  m.impl("merge_", &merge_checked);
  m.impl("lerp_multi_", &lerp_multi_checked);
  m.impl("any_nonfinite", &any_nonfinite_checked);
  m.impl("sq_norm", &sq_norm_checked);
  m.impl("sam_ascent_", &sam_ascent_checked);
  m.impl("ties_merge_", &ties_merge_checked);
  m.impl("dare_drop_", &dare_drop_checked);
}

TORCH_LIBRARY_IMPL(swm_fused, CompositeImplicitAutograd, m) {
  m.impl("check_lerp_", &validate::lerp_args);
  m.impl("check_swag_", &validate::swag_args);
  m.impl("check_merge_", &check_merge);
  m.impl("check_lerp_multi_", &check_lerp_multi);
  m.impl("check_any_nonfinite", &validate::any_nonfinite_args);
  m.impl("check_sq_norm", &validate::sq_norm_args);
  m.impl("check_sam_ascent_", &validate::sam_ascent_args);
  m.impl("check_ties_merge_", &check_ties_merge);
  m.impl("check_dare_drop_", &validate::dare_drop_args);
}

}  // namespace swm_fused
