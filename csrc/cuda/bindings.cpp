// swm_fused ops on CUDA tensors: turns tensor lists into the pointer/size/dtype tables of the
// launchers in multi_tensor_apply.cuh and runs them on the current stream. Arguments arrive validated
// by swm_fused/ops.py; the checks here guard direct torch.ops calls. Nothing here synchronises with
// the host: found_inf and weight_tensor are handed to the kernels as device pointers.
//
// Slower but correct paths, all through stream-ordered torch ops:
//   * a non-contiguous tensor runs through a contiguous temporary (written ones are copied back);
//   * a source dtype the kernels lack (e.g. float8) is converted to float32 first, which is exact;
//   * a merge position whose K inputs do not share one dtype has its inputs converted to the
//     compute type first; the kernel would convert each element to it anyway, so results are equal;
//   * a merge of more than kMaxMergeInputs inputs chains launches through a compute-type accumulator
//     (the same additions, in the same order, as one launch would do).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "multi_tensor_apply.cuh"

namespace swm_fused_cuda {
namespace {

using at::Tensor;

// The kernels' code for a dtype, or -1 when they have no kernel for it.
int32_t dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: return -1;
  }
}

at::ScalarType compute_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

void check_on_device(const Tensor& t, const at::Device& device, const char* op, const char* what, size_t i) {
  TORCH_CHECK(t.device() == device, op, ": ", what, "[", i, "] is on ", t.device(), " but the first tensor is on ",
              device);
}

// Tensors the kernels read, kept alive (with any temporaries) until the launches are enqueued.
class Inputs {
 public:
  explicit Inputs(size_t capacity) { kept_.reserve(capacity); }

  // `t` as a contiguous tensor of a dtype the kernels have (converted to `fallback` when they lack it).
  Tensor add(const Tensor& t, at::ScalarType fallback) {
    Tensor ready = (dtype_code(t.scalar_type()) < 0 ? t.to(fallback) : t).contiguous();
    kept_.push_back(ready);
    return ready;
  }

 private:
  std::vector<Tensor> kept_;
};

// Tensors the kernels write: contiguous ones directly, others through a contiguous temporary
// that finish() copies back.
class Outputs {
 public:
  Outputs(at::TensorList targets, const char* op, const char* what) : targets_(targets) {
    work_.reserve(targets.size());
    for (size_t i = 0; i < targets.size(); ++i) {
      const Tensor& t = targets[i];
      TORCH_CHECK(dtype_code(t.scalar_type()) >= 0, op, ": ", what, "[", i, "] has dtype ", t.scalar_type(),
                  "; written tensors must be float32, float64, bfloat16 or float16");
      work_.push_back(t.is_contiguous() ? t : t.contiguous());
    }
  }
  const Tensor& operator[](size_t i) const { return work_[i]; }
  void finish() {
    for (size_t i = 0; i < work_.size(); ++i) {
      if (!work_[i].is_same(targets_[i])) targets_[i].copy_(work_[i]);
    }
  }

 private:
  at::TensorList targets_;
  std::vector<Tensor> work_;
};

// Device pointer to a float32 found_inf scalar, or nullptr; `keep` holds a converted copy.
const float* found_inf_pointer(const std::optional<Tensor>& found_inf, const at::Device& device, Tensor& keep,
                               const char* op) {
  if (!found_inf.has_value()) return nullptr;
  TORCH_CHECK(found_inf->numel() == 1, op, ": found_inf must hold one element, got ", found_inf->numel());
  TORCH_CHECK(found_inf->device() == device, op, ": found_inf is on ", found_inf->device(), " but the tensors are on ",
              device);
  keep = found_inf->to(at::kFloat).contiguous();
  return keep.const_data_ptr<float>();
}

// Device pointer to a float64 weight scalar, or nullptr; `keep` holds a converted copy.
const double* weight_pointer(const std::optional<Tensor>& weight_tensor, const at::Device& device, Tensor& keep,
                             const char* op) {
  if (!weight_tensor.has_value()) return nullptr;
  TORCH_CHECK(weight_tensor->numel() == 1, op, ": weight_tensor must hold one element, got ", weight_tensor->numel());
  TORCH_CHECK(weight_tensor->device() == device, op, ": weight_tensor is on ", weight_tensor->device(),
              " but the tensors are on ", device);
  keep = weight_tensor->to(at::kDouble).contiguous();
  return keep.const_data_ptr<double>();
}

void lerp_cuda(at::TensorList avg, at::TensorList src, double weight, const std::optional<Tensor>& weight_tensor,
               const std::optional<Tensor>& found_inf) {
  TORCH_CHECK(avg.size() == src.size(), "lerp_: got ", avg.size(), " averages but ", src.size(), " sources");
  if (avg.empty()) return;
  const at::Device device = avg[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const size_t n = avg.size();
  Outputs avgs(avg, "lerp_", "avg");
  Inputs inputs(n);
  std::vector<int64_t> numels(n);
  std::vector<void*> avg_ptrs(n);
  std::vector<const void*> src_ptrs(n);
  std::vector<int32_t> avg_codes(n), src_codes(n);
  for (size_t i = 0; i < n; ++i) {
    check_on_device(avg[i], device, "lerp_", "avg", i);
    check_on_device(src[i], device, "lerp_", "src", i);
    TORCH_CHECK(src[i].numel() == avg[i].numel(), "lerp_: src[", i, "] has ", src[i].numel(), " elements but avg[", i,
                "] has ", avg[i].numel());
    const Tensor s = inputs.add(src[i], at::kFloat);
    numels[i] = avgs[i].numel();
    avg_ptrs[i] = avgs[i].data_ptr();
    avg_codes[i] = dtype_code(avgs[i].scalar_type());
    src_ptrs[i] = s.const_data_ptr();
    src_codes[i] = dtype_code(s.scalar_type());
  }
  Tensor weight_keep, found_keep;
  const double* weight_dev = weight_pointer(weight_tensor, device, weight_keep, "lerp_");
  const float* found_dev = found_inf_pointer(found_inf, device, found_keep, "lerp_");
  C10_CUDA_CHECK(launch_lerp(static_cast<int64_t>(n), numels.data(), avg_ptrs.data(), avg_codes.data(),
                             src_ptrs.data(), src_codes.data(), weight, weight_dev, found_dev,
                             c10::cuda::getCurrentCUDAStream()));
  avgs.finish();
}

void swag_cuda(at::TensorList mean, at::TensorList sq_mean, at::TensorList src, double weight,
               const std::optional<Tensor>& weight_tensor, const std::optional<Tensor>& found_inf) {
  TORCH_CHECK(mean.size() == sq_mean.size() && mean.size() == src.size(), "swag_: got ", mean.size(), " means, ",
              sq_mean.size(), " sq_means and ", src.size(), " sources");
  if (mean.empty()) return;
  const at::Device device = mean[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const size_t n = mean.size();
  Outputs means(mean, "swag_", "mean");
  Outputs sq_means(sq_mean, "swag_", "sq_mean");
  Inputs inputs(n);
  std::vector<int64_t> numels(n);
  std::vector<void*> mean_ptrs(n), sq_ptrs(n);
  std::vector<const void*> src_ptrs(n);
  std::vector<int32_t> mean_codes(n), sq_codes(n), src_codes(n);
  for (size_t i = 0; i < n; ++i) {
    check_on_device(mean[i], device, "swag_", "mean", i);
    check_on_device(sq_mean[i], device, "swag_", "sq_mean", i);
    check_on_device(src[i], device, "swag_", "src", i);
    TORCH_CHECK(sq_mean[i].numel() == mean[i].numel() && src[i].numel() == mean[i].numel(), "swag_: mean[", i,
                "], sq_mean[", i, "] and src[", i, "] differ in size");
    const Tensor s = inputs.add(src[i], at::kFloat);
    numels[i] = means[i].numel();
    mean_ptrs[i] = means[i].data_ptr();
    mean_codes[i] = dtype_code(means[i].scalar_type());
    sq_ptrs[i] = sq_means[i].data_ptr();
    sq_codes[i] = dtype_code(sq_means[i].scalar_type());
    src_ptrs[i] = s.const_data_ptr();
    src_codes[i] = dtype_code(s.scalar_type());
  }
  Tensor weight_keep, found_keep;
  const double* weight_dev = weight_pointer(weight_tensor, device, weight_keep, "swag_");
  const float* found_dev = found_inf_pointer(found_inf, device, found_keep, "swag_");
  C10_CUDA_CHECK(launch_swag(static_cast<int64_t>(n), numels.data(), mean_ptrs.data(), mean_codes.data(),
                             sq_ptrs.data(), sq_codes.data(), src_ptrs.data(), src_codes.data(), weight, weight_dev,
                             found_dev, c10::cuda::getCurrentCUDAStream()));
  means.finish();
  sq_means.finish();
}

// inputs is k-major: inputs[k * n + i] pairs with out[i].
void merge_cuda(at::TensorList out, at::TensorList inputs, at::ArrayRef<double> weights) {
  const size_t n = out.size();
  const size_t k_total = weights.size();
  TORCH_CHECK(k_total >= 1, "merge_: weights is empty; give at least one model");
  TORCH_CHECK(inputs.size() == k_total * n, "merge_: got ", inputs.size(), " inputs for ", n, " outputs and ",
              k_total, " weights (expected outputs * weights)");
  if (n == 0) return;
  const at::Device device = out[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Outputs outs(out, "merge_", "out");
  Inputs reads(inputs.size());
  std::vector<int64_t> numels(n);
  std::vector<void*> out_ptrs(n);
  std::vector<int32_t> out_codes(n), in_codes(n);
  std::vector<const void*> in_ptrs(inputs.size());  // k-major, like `inputs`
  for (size_t i = 0; i < n; ++i) {
    check_on_device(out[i], device, "merge_", "out", i);
    const at::ScalarType first = inputs[i].scalar_type();
    bool shared_dtype = dtype_code(first) >= 0;
    for (size_t k = 0; k < k_total; ++k) {
      const Tensor& x = inputs[k * n + i];
      check_on_device(x, device, "merge_", "inputs", k * n + i);
      TORCH_CHECK(x.numel() == out[i].numel(), "merge_: inputs[", k, "][", i, "] has ", x.numel(),
                  " elements but out[", i, "] has ", out[i].numel());
      shared_dtype = shared_dtype && x.scalar_type() == first;
    }
    const at::ScalarType ct = compute_type(outs[i].scalar_type());
    for (size_t k = 0; k < k_total; ++k) {
      const Tensor& x = inputs[k * n + i];
      in_ptrs[k * n + i] = reads.add(shared_dtype ? x : x.to(ct), ct).const_data_ptr();
    }
    numels[i] = outs[i].numel();
    out_ptrs[i] = outs[i].data_ptr();
    out_codes[i] = dtype_code(outs[i].scalar_type());
    in_codes[i] = dtype_code(shared_dtype ? first : ct);
  }

  if (k_total <= static_cast<size_t>(kMaxMergeInputs)) {
    C10_CUDA_CHECK(launch_merge(static_cast<int64_t>(n), numels.data(), out_ptrs.data(), out_codes.data(), nullptr,
                                static_cast<int32_t>(k_total), in_ptrs.data(), in_codes.data(), weights.data(),
                                stream));
    outs.finish();
    return;
  }

  // More inputs than one launch takes: the first launch writes its partial sums to a compute-type
  // accumulator, later ones add to it, and the last one stores into `out`.
  std::vector<Tensor> accs(n);
  std::vector<void*> acc_ptrs(n);
  std::vector<int32_t> acc_codes(n);
  for (size_t i = 0; i < n; ++i) {
    accs[i] = at::empty({numels[i]}, outs[i].options().dtype(compute_type(outs[i].scalar_type())));
    acc_ptrs[i] = accs[i].data_ptr();
    acc_codes[i] = dtype_code(accs[i].scalar_type());
  }
  std::vector<const void*> pass_inputs;
  for (size_t k0 = 0; k0 < k_total; k0 += kMaxMergeInputs) {
    const size_t k_pass = std::min<size_t>(kMaxMergeInputs, k_total - k0);
    const bool first = k0 == 0;
    const bool last = k0 + k_pass == k_total;
    pass_inputs.assign(in_ptrs.begin() + k0 * n, in_ptrs.begin() + (k0 + k_pass) * n);
    C10_CUDA_CHECK(launch_merge(static_cast<int64_t>(n), numels.data(), last ? out_ptrs.data() : acc_ptrs.data(),
                                last ? out_codes.data() : acc_codes.data(), first ? nullptr : acc_ptrs.data(),
                                static_cast<int32_t>(k_pass), pass_inputs.data(), in_codes.data(),
                                weights.data() + k0, stream));
  }
  outs.finish();
}

Tensor any_nonfinite_cuda(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "any_nonfinite: the tensor list is empty");
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const size_t n = tensors.size();
  Inputs inputs(n);
  std::vector<int64_t> numels(n);
  std::vector<const void*> ptrs(n);
  std::vector<int32_t> codes(n);
  for (size_t i = 0; i < n; ++i) {
    check_on_device(tensors[i], device, "any_nonfinite", "tensors", i);
    TORCH_CHECK(at::isFloatingType(tensors[i].scalar_type()), "any_nonfinite: tensors[", i, "] has dtype ",
                tensors[i].scalar_type(), "; expected a floating dtype");
    const Tensor t = inputs.add(tensors[i], at::kFloat);  // conversion to float32 keeps NaN and Inf
    numels[i] = t.numel();
    ptrs[i] = t.const_data_ptr();
    codes[i] = dtype_code(t.scalar_type());
  }
  Tensor flag = at::zeros({}, tensors[0].options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_any_nonfinite(static_cast<int64_t>(n), numels.data(), ptrs.data(), codes.data(),
                                      flag.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return flag;
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CUDA, m) {
  m.impl("lerp_", &lerp_cuda);
  m.impl("swag_", &swag_cuda);
  m.impl("merge_", &merge_cuda);
  m.impl("any_nonfinite", &any_nonfinite_cuda);
}

}  // namespace swm_fused_cuda
