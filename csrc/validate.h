// The one validator of the swm_fused ops' tensor arguments: list lengths, dtypes, shapes, devices
// and the one-element flag tensors. Every backend reaches it: the compiled kernels through the
// BackendSelect kernels of csrc/checks.cpp, the Python backends through the check_* ops. Messages
// leave out the public op's name, which swm_fused/ops.py prefixes ("ema_: avg has 3 tensors but
// src has 2"); TORCH_CHECK_VALUE / TORCH_CHECK_TYPE become ValueError / TypeError in Python.
// Header-only and device-agnostic (ATen/c10 only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cctype>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace swm_fused::validate {

// What a list may hold: Written lists need a kernel dtype (fp32/fp64/bf16/fp16), Read lists any
// floating dtype.
enum class Role { Written, Read };

struct NamedList {
  std::string name;
  at::TensorList tensors;
  Role role;
};

// torch's Python name of a dtype, e.g. "torch.int64".
inline std::string python_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kHalf: return "torch.float16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // every other dtype is its C++ name in lower case: bool, bfloat16, float8_e4m3fn, uint16, ...
      std::string name = c10::toString(dtype);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return "torch." + name;
    }
  }
}

// A shape as Python prints tuple(t.shape): "(3, 4)", "(5,)", "()".
inline std::string python_shape(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << '(';
  for (size_t d = 0; d < sizes.size(); ++d) out << (d ? ", " : "") << sizes[d];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// sizes == reference, without a call to memcmp per tensor (lists of thousands of small tensors).
inline bool same_sizes(at::IntArrayRef sizes, at::IntArrayRef reference) {
  if (sizes.size() != reference.size()) return false;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] != reference[d]) return false;
  }
  return true;
}

inline bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// lists[0] is the one the others are compared with. Checks, in this order: equal lengths; then
// list by list, position by position: the dtype its role allows, the shape of lists[0] at that
// position, and the device of lists[0][0].
inline void check_lists(const std::vector<NamedList>& lists) {
  const NamedList& first = lists.front();
  for (size_t j = 1; j < lists.size(); ++j) {
    TORCH_CHECK_VALUE(lists[j].tensors.size() == first.tensors.size(), first.name, " has ", first.tensors.size(),
                      " tensors but ", lists[j].name, " has ", lists[j].tensors.size());
  }
  if (first.tensors.empty()) return;
  const c10::Device device = first.tensors[0].device();
  for (const NamedList& list : lists) {
    for (size_t i = 0; i < list.tensors.size(); ++i) {
      const at::Tensor& t = list.tensors[i];
      const at::ScalarType dtype = t.scalar_type();
      TORCH_CHECK_TYPE(list.role != Role::Written || is_kernel_dtype(dtype), list.name, "[", i, "] has dtype ",
                       python_dtype(dtype), "; averages and outputs must be float32, float64, bfloat16 or float16");
      TORCH_CHECK_TYPE(at::isFloatingType(dtype), list.name, "[", i,
                       "] has dtype ", python_dtype(dtype), "; sources must be floating point");
      const at::IntArrayRef reference_shape = first.tensors[i].sizes();
      TORCH_CHECK_VALUE(same_sizes(t.sizes(), reference_shape), "shape mismatch at index ", i, ": ", first.name, "[", i,
                        "] has shape ", python_shape(reference_shape), " but ", list.name, "[", i, "] has shape ",
                        python_shape(t.sizes()));
      TORCH_CHECK_VALUE(t.device() == device, list.name, "[", i, "] is on ", t.device().str(), " but ", first.name,
                        "[0] is on ", device.str(), "; all tensors must be on one device");
    }
  }
}

// A one-element tensor argument (found_inf, weight_tensor) on the device of `tensors`.
inline void check_scalar_tensor(const char* name, const std::optional<at::Tensor>& t, at::TensorList tensors) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->numel() == 1, name, " must hold exactly one element, got shape ", python_shape(t->sizes()));
  if (tensors.empty()) return;
  TORCH_CHECK_VALUE(t->device() == tensors[0].device(), name, " is on ", t->device().str(),
                    " but the tensors are on ", tensors[0].device().str());
}

inline void lerp_args(at::TensorList avg, at::TensorList src, const std::optional<at::Tensor>& weight_tensor,
                      const std::optional<at::Tensor>& found_inf) {
  check_scalar_tensor("found_inf", found_inf, avg);
  check_scalar_tensor("weight_tensor", weight_tensor, avg);
  check_lists({{"avg", avg, Role::Written}, {"src", src, Role::Read}});
}

inline void swag_args(at::TensorList mean, at::TensorList sq_mean, at::TensorList src,
                      const std::optional<at::Tensor>& weight_tensor, const std::optional<at::Tensor>& found_inf) {
  check_scalar_tensor("found_inf", found_inf, mean);
  check_scalar_tensor("weight_tensor", weight_tensor, mean);
  check_lists({{"mean", mean, Role::Written}, {"sq_mean", sq_mean, Role::Written}, {"src", src, Role::Read}});
}

// The written list `out` followed by the K read lists of `inputs` (k-major: inputs[k * N + i], K = n_weights),
// after checking that there is at least one and that `inputs` holds K * N tensors.
inline std::vector<NamedList> out_and_k_inputs(at::TensorList out, at::TensorList inputs, size_t n_weights) {
  TORCH_CHECK_VALUE(n_weights >= 1, "weights is empty; give at least one input list");
  const size_t n = out.size();
  TORCH_CHECK_VALUE(inputs.size() == n_weights * n, "inputs has ", inputs.size(), " tensors but ", n_weights,
                    " weights and ", n, " outputs need ", n_weights * n, " (k-major: inputs[k * ", n, " + i])");
  std::vector<NamedList> lists;
  lists.reserve(n_weights + 2);
  lists.push_back({"out", out, Role::Written});
  for (size_t k = 0; k < n_weights; ++k)
    lists.push_back({"inputs[" + std::to_string(k) + "]", inputs.slice(k * n, n), Role::Read});
  return lists;
}

inline void merge_args(at::TensorList out, at::TensorList inputs, size_t n_weights) {
  check_lists(out_and_k_inputs(out, inputs, n_weights));
}

// `avgs` holds K = n_weights lists back to back (k-major: avgs[k * N + i]), N = src.size().
inline void lerp_multi_args(at::TensorList avgs, at::TensorList src, size_t n_weights,
                            const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK_VALUE(n_weights >= 1, "weights is empty; give at least one profile");
  const size_t n = src.size();
  TORCH_CHECK_VALUE(avgs.size() == n_weights * n, "avgs has ", avgs.size(), " tensors but ", n_weights,
                    " weights and ", n, " sources need ", n_weights * n, " (k-major: avgs[k * ", n, " + i])");
  check_scalar_tensor("found_inf", found_inf, avgs);
  std::vector<NamedList> lists;
  lists.reserve(n_weights + 1);
  for (size_t k = 0; k < n_weights; ++k)
    lists.push_back({"avgs[" + std::to_string(k) + "]", avgs.slice(k * n, n), Role::Written});
  lists.push_back({"src", src, Role::Read});
  check_lists(lists);
}

// Only floating tensors reach any_nonfinite: swm_fused/ops.py leaves out the others, which cannot hold NaN.
inline void any_nonfinite_args(at::TensorList tensors) { check_lists({{"tensors", tensors, Role::Read}}); }

// sq_norm: `scale` is empty (no scale) or pairs with `tensors`, position by position.
inline void sq_norm_args(at::TensorList tensors, at::TensorList scale) {
  if (scale.empty()) {
    check_lists({{"tensors", tensors, Role::Read}});
  } else {
    check_lists({{"tensors", tensors, Role::Read}, {"scale", scale, Role::Read}});
  }
}

// sam_ascent_: params and saved are written (saved gets the params' values), grads are read; `scale`
// is a one-element tensor on the params' device.
inline void sam_ascent_args(at::TensorList params, at::TensorList grads, at::TensorList saved, const at::Tensor& scale,
                            const std::optional<at::Tensor>& found_inf) {
  check_scalar_tensor("found_inf", found_inf, params);
  check_scalar_tensor("scale", scale, params);
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), "scale has dtype ", python_dtype(scale.scalar_type()),
                   "; it must be floating point");
  check_lists({{"params", params, Role::Written}, {"grads", grads, Role::Read}, {"saved", saved, Role::Written}});
}

// ties_merge_: `inputs` as for merge_; `base` empty or paired with `out`; `thresholds` a floating tensor of shape
// (K, N, 2) on the tensors' device; majority_sign "sum", "count" or "none".
inline void ties_merge_args(at::TensorList out, at::TensorList inputs, size_t n_weights, at::TensorList base,
                            const std::optional<at::Tensor>& thresholds, c10::string_view majority_sign) {
  TORCH_CHECK_VALUE(majority_sign == "sum" || majority_sign == "count" || majority_sign == "none",
                    "majority_sign must be 'sum', 'count' or 'none', got '", majority_sign, "'");
  if (thresholds.has_value()) {
    const at::Tensor& t = *thresholds;
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "thresholds has dtype ", python_dtype(t.scalar_type()),
                     "; it must be floating point");
    const std::vector<int64_t> shape{static_cast<int64_t>(n_weights), static_cast<int64_t>(out.size()), 2};
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), "thresholds must have shape (K, N, 2) = ",
                      python_shape(shape), " for K = ", n_weights, " input lists of N = ", out.size(),
                      " tensors, got ", python_shape(t.sizes()));
    TORCH_CHECK_VALUE(out.empty() || t.device() == out[0].device(), "thresholds is on ", t.device().str(),
                      " but the tensors are on ", out[0].device().str());
  }
  std::vector<NamedList> lists = out_and_k_inputs(out, inputs, n_weights);
  if (!base.empty()) lists.push_back({"base", base, Role::Read});
  check_lists(lists);
}

// dare_drop_: `u` pairs with `deltas`, and so does `keep_prob` unless it is empty (one keep probability for all).
inline void dare_drop_args(at::TensorList deltas, at::TensorList u, at::TensorList keep_prob) {
  std::vector<NamedList> lists{{"deltas", deltas, Role::Written}, {"u", u, Role::Read}};
  if (!keep_prob.empty()) lists.push_back({"keep_prob", keep_prob, Role::Read});
  check_lists(lists);
}

}  // namespace swm_fused::validate
