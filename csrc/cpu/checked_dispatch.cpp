// Validates every swm_fused op call before any kernel runs, on every device, then hands it on.
//
// The checks are BackendSelect kernels rather than part of the CPU kernels because the
// dispatcher picks one kernel for a whole call from all tensors' devices: a CPU list with a
// meta (or CUDA) tensor in it never reaches the CPU kernel, and the meta (fake) kernel would
// accept it silently. BackendSelect runs for every call with real tensors (torch keeps it in
// every thread's included keys) after autograd and Python modes, so fake-tensor tracing is
// untouched. This file lives with the CPU sources because setup.py builds those into every
// swm_fused._C; it applies to all devices.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

#include "validate.h"

namespace swm_fused {
namespace {

// Redispatching with these keys skips BackendSelect and reaches the device's kernel.
constexpr c10::DispatchKeySet kAfterBackendSelect(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);

using LerpFn = void(at::TensorList, at::TensorList, double, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&);
using SwagFn = void(at::TensorList, at::TensorList, at::TensorList, double, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&);
using MergeFn = void(at::TensorList, at::TensorList, at::ArrayRef<double>);
using AnyNonfiniteFn = at::Tensor(at::TensorList);

template <typename Fn>
c10::TypedOperatorHandle<Fn> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

void lerp_checked(c10::DispatchKeySet keys, at::TensorList avg, at::TensorList src, double weight,
                  const std::optional<at::Tensor>& weight_tensor, const std::optional<at::Tensor>& found_inf) {
  validate::lerp_lists(avg, src);
  static const auto op = handle<LerpFn>("swm_fused::lerp_");
  op.redispatch(keys & kAfterBackendSelect, avg, src, weight, weight_tensor, found_inf);
}

void swag_checked(c10::DispatchKeySet keys, at::TensorList mean, at::TensorList sq_mean, at::TensorList src,
                  double weight, const std::optional<at::Tensor>& weight_tensor,
                  const std::optional<at::Tensor>& found_inf) {
  validate::swag_lists(mean, sq_mean, src);
  static const auto op = handle<SwagFn>("swm_fused::swag_");
  op.redispatch(keys & kAfterBackendSelect, mean, sq_mean, src, weight, weight_tensor, found_inf);
}

void merge_checked(c10::DispatchKeySet keys, at::TensorList out, at::TensorList inputs, at::ArrayRef<double> weights) {
  validate::merge_lists(out, inputs, weights.size());
  static const auto op = handle<MergeFn>("swm_fused::merge_");
  op.redispatch(keys & kAfterBackendSelect, out, inputs, weights);
}

at::Tensor any_nonfinite_checked(c10::DispatchKeySet keys, at::TensorList tensors) {
  validate::any_nonfinite_list(tensors);
  static const auto op = handle<AnyNonfiniteFn>("swm_fused::any_nonfinite");
  return op.redispatch(keys & kAfterBackendSelect, tensors);
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, BackendSelect, m) {
  m.impl("lerp_", &lerp_checked);
  m.impl("swag_", &swag_checked);
  m.impl("merge_", &merge_checked);
  m.impl("any_nonfinite", &any_nonfinite_checked);
}

}  // namespace swm_fused
