// swm_fused ops on CUDA tensors: turns tensor lists into the pointer/size/dtype tables of the
// launchers in multi_tensor_apply.cuh and runs them on the current stream. Arguments arrive validated
// by csrc/validate.h (csrc/checks.cpp puts it in front of every call): one device, matching shapes,
// kernel dtypes for written tensors, floating ones for read tensors, one-element flag tensors.
// Nothing here synchronises with the host: found_inf and weight_tensor are handed to the kernels as
// device pointers, and ties_merge_'s table of input pointers goes to the device from pinned memory,
// asynchronously on the current stream.
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
#include <cstring>
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
  explicit Outputs(at::TensorList targets) : targets_(targets) {
    work_.reserve(targets.size());
    for (const Tensor& t : targets) work_.push_back(t.is_contiguous() ? t : t.contiguous());
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

// Device pointer to a one-element tensor converted to `dtype`, or nullptr; `keep` holds the converted copy.
template <typename T>
const T* scalar_pointer(const std::optional<Tensor>& t, at::ScalarType dtype, Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->to(dtype).contiguous();
  return keep.const_data_ptr<T>();
}

void lerp_cuda(at::TensorList avg, at::TensorList src, double weight, const std::optional<Tensor>& weight_tensor,
               const std::optional<Tensor>& found_inf) {
  if (avg.empty()) return;
  const at::Device device = avg[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const size_t n = avg.size();
  Outputs avgs(avg);
  Inputs inputs(n);
  std::vector<int64_t> numels(n);
  std::vector<void*> avg_ptrs(n);
  std::vector<const void*> src_ptrs(n);
  std::vector<int32_t> avg_codes(n), src_codes(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor s = inputs.add(src[i], at::kFloat);
    numels[i] = avgs[i].numel();
    avg_ptrs[i] = avgs[i].data_ptr();
    avg_codes[i] = dtype_code(avgs[i].scalar_type());
    src_ptrs[i] = s.const_data_ptr();
    src_codes[i] = dtype_code(s.scalar_type());
  }
  Tensor weight_keep, found_keep;
  const double* weight_dev = scalar_pointer<double>(weight_tensor, at::kDouble, weight_keep);
  const float* found_dev = scalar_pointer<float>(found_inf, at::kFloat, found_keep);
  C10_CUDA_CHECK(launch_lerp(static_cast<int64_t>(n), numels.data(), avg_ptrs.data(), avg_codes.data(),
                             src_ptrs.data(), src_codes.data(), weight, weight_dev, found_dev,
                             c10::cuda::getCurrentCUDAStream()));
  avgs.finish();
}

// avg is k-major: avg[k * n + i] pairs with src[i], K = weights.size(). Positions whose K averages
// share a dtype run fused (the source read once per kMaxLerpProfiles profiles); others run as K lerps.
void lerp_multi_cuda(at::TensorList avg, at::TensorList src, at::ArrayRef<double> weights,
                     const std::optional<Tensor>& found_inf) {
  const size_t n = src.size(), k_total = weights.size();
  if (n == 0) return;
  const at::Device device = src[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Outputs avgs(avg);
  Inputs inputs(n);
  Tensor found_keep;
  const float* found_dev = scalar_pointer<float>(found_inf, at::kFloat, found_keep);
  std::vector<int64_t> numels, mixed_numels;
  std::vector<const void*> src_ptrs, mixed_src_ptrs;
  std::vector<int32_t> avg_codes, src_codes, mixed_src_codes;
  std::vector<std::vector<void*>> avg_ptrs(k_total), mixed_avg_ptrs(k_total);
  std::vector<std::vector<int32_t>> mixed_avg_codes(k_total);
  for (size_t i = 0; i < n; ++i) {
    const Tensor s = inputs.add(src[i], at::kFloat);
    const int32_t code = dtype_code(avgs[i].scalar_type());
    bool uniform = true;
    for (size_t k = 1; k < k_total; ++k) uniform = uniform && dtype_code(avgs[k * n + i].scalar_type()) == code;
    if (uniform) {
      numels.push_back(s.numel());
      src_ptrs.push_back(s.const_data_ptr());
      src_codes.push_back(dtype_code(s.scalar_type()));
      avg_codes.push_back(code);
      for (size_t k = 0; k < k_total; ++k) avg_ptrs[k].push_back(avgs[k * n + i].data_ptr());
    } else {
      mixed_numels.push_back(s.numel());
      mixed_src_ptrs.push_back(s.const_data_ptr());
      mixed_src_codes.push_back(dtype_code(s.scalar_type()));
      for (size_t k = 0; k < k_total; ++k) {
        mixed_avg_ptrs[k].push_back(avgs[k * n + i].data_ptr());
        mixed_avg_codes[k].push_back(dtype_code(avgs[k * n + i].scalar_type()));
      }
    }
  }
  const int64_t n_uniform = static_cast<int64_t>(numels.size());
  for (size_t k0 = 0; k0 < k_total && n_uniform > 0; k0 += kMaxLerpProfiles) {
    const size_t k_pass = std::min<size_t>(kMaxLerpProfiles, k_total - k0);
    std::vector<void*> pass_avgs;  // k-major over the uniform positions
    pass_avgs.reserve(k_pass * numels.size());
    for (size_t k = k0; k < k0 + k_pass; ++k) pass_avgs.insert(pass_avgs.end(), avg_ptrs[k].begin(), avg_ptrs[k].end());
    C10_CUDA_CHECK(launch_lerp_multi(n_uniform, numels.data(), static_cast<int32_t>(k_pass), pass_avgs.data(),
                                     avg_codes.data(), src_ptrs.data(), src_codes.data(), weights.data() + k0,
                                     found_dev, stream));
  }
  for (size_t k = 0; k < k_total && !mixed_numels.empty(); ++k) {
    C10_CUDA_CHECK(launch_lerp(static_cast<int64_t>(mixed_numels.size()), mixed_numels.data(), mixed_avg_ptrs[k].data(),
                               mixed_avg_codes[k].data(), mixed_src_ptrs.data(), mixed_src_codes.data(), weights[k],
                               nullptr, found_dev, stream));
  }
  avgs.finish();
}

void swag_cuda(at::TensorList mean, at::TensorList sq_mean, at::TensorList src, double weight,
               const std::optional<Tensor>& weight_tensor, const std::optional<Tensor>& found_inf) {
  if (mean.empty()) return;
  const at::Device device = mean[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const size_t n = mean.size();
  Outputs means(mean);
  Outputs sq_means(sq_mean);
  Inputs inputs(n);
  std::vector<int64_t> numels(n);
  std::vector<void*> mean_ptrs(n), sq_ptrs(n);
  std::vector<const void*> src_ptrs(n);
  std::vector<int32_t> mean_codes(n), sq_codes(n), src_codes(n);
  for (size_t i = 0; i < n; ++i) {
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
  const double* weight_dev = scalar_pointer<double>(weight_tensor, at::kDouble, weight_keep);
  const float* found_dev = scalar_pointer<float>(found_inf, at::kFloat, found_keep);
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
  if (n == 0) return;
  const at::Device device = out[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Outputs outs(out);
  Inputs reads(inputs.size());
  std::vector<int64_t> numels(n);
  std::vector<void*> out_ptrs(n);
  std::vector<int32_t> out_codes(n), in_codes(n);
  std::vector<const void*> in_ptrs(inputs.size());  // k-major, like `inputs`
  for (size_t i = 0; i < n; ++i) {
    const at::ScalarType first = inputs[i].scalar_type();
    bool shared_dtype = dtype_code(first) >= 0;
    for (size_t k = 0; k < k_total; ++k) {
      const Tensor& x = inputs[k * n + i];
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
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const size_t n = tensors.size();
  Inputs inputs(n);
  std::vector<int64_t> numels(n);
  std::vector<const void*> ptrs(n);
  std::vector<int32_t> codes(n);
  for (size_t i = 0; i < n; ++i) {
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

// sum_i sum((scale_i * t_i)^2): float64 partials per chunk from the kernels, added by a torch sum on the
// same stream (deterministic), rounded once to float32 (kept in float64 when a tensor is float64).
Tensor sq_norm_cuda(at::TensorList tensors, at::TensorList scale) {
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const size_t n = tensors.size();
  const bool scaled = !scale.empty();
  Inputs inputs(2 * n);
  std::vector<int64_t> numels(n);
  std::vector<const void*> ptrs(n), scale_ptrs(scaled ? n : 0);
  std::vector<int32_t> codes(n), scale_codes(scaled ? n : 0);
  for (size_t i = 0; i < n; ++i) {
    const Tensor t = inputs.add(tensors[i], at::kFloat);
    numels[i] = t.numel();
    ptrs[i] = t.const_data_ptr();
    codes[i] = dtype_code(t.scalar_type());
    if (scaled) {
      const Tensor s = inputs.add(scale[i], at::kFloat);
      scale_ptrs[i] = s.const_data_ptr();
      scale_codes[i] = dtype_code(s.scalar_type());
    }
  }
  const int64_t slots = sq_norm_partials(static_cast<int64_t>(n), numels.data());
  bool any_double = false;
  for (const Tensor& t : tensors) any_double = any_double || t.scalar_type() == at::kDouble;
  const at::ScalarType result_type = any_double ? at::kDouble : at::kFloat;
  if (slots == 0) return at::zeros({}, tensors[0].options().dtype(result_type));
  Tensor partials = at::empty({slots}, tensors[0].options().dtype(at::kDouble));
  C10_CUDA_CHECK(launch_sq_norm(static_cast<int64_t>(n), numels.data(), ptrs.data(), codes.data(),
                                scaled ? scale_ptrs.data() : nullptr, scaled ? scale_codes.data() : nullptr,
                                partials.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()));
  return partials.sum().to(result_type);
}

void sam_ascent_cuda(at::TensorList params, at::TensorList grads, at::TensorList saved, const Tensor& scale,
                     bool adaptive, const std::optional<Tensor>& found_inf) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const size_t n = params.size();
  Outputs ps(params);
  Outputs ss(saved);
  Inputs inputs(n);
  std::vector<int64_t> numels(n);
  std::vector<void*> param_ptrs(n), saved_ptrs(n);
  std::vector<const void*> grad_ptrs(n);
  std::vector<int32_t> param_codes(n), grad_codes(n), saved_codes(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor g = inputs.add(grads[i], at::kFloat);
    numels[i] = ps[i].numel();
    param_ptrs[i] = ps[i].data_ptr();
    param_codes[i] = dtype_code(ps[i].scalar_type());
    grad_ptrs[i] = g.const_data_ptr();
    grad_codes[i] = dtype_code(g.scalar_type());
    saved_ptrs[i] = ss[i].data_ptr();
    saved_codes[i] = dtype_code(ss[i].scalar_type());
  }
  Tensor scale_keep, found_keep;
  const double* scale_dev = scalar_pointer<double>(scale, at::kDouble, scale_keep);
  const float* found_dev = scalar_pointer<float>(found_inf, at::kFloat, found_keep);
  C10_CUDA_CHECK(launch_sam_ascent(static_cast<int64_t>(n), numels.data(), param_ptrs.data(), param_codes.data(),
                                   grad_ptrs.data(), grad_codes.data(), saved_ptrs.data(), saved_codes.data(),
                                   scale_dev, adaptive, found_dev, c10::cuda::getCurrentCUDAStream()));
  ps.finish();
  ss.finish();
}

// `words` on `device` without synchronising: a pinned host copy sent on the current stream (torch's caching host
// allocator keeps the pinned block until the copy is done); on the CPU (the emulated build), the host tensor.
Tensor device_words(const std::vector<int64_t>& words, const at::Device& device) {
  const bool cuda = device.is_cuda();
  Tensor host = at::empty({static_cast<int64_t>(words.size())},
                          at::TensorOptions().dtype(at::kLong).pinned_memory(cuda));
  std::copy(words.begin(), words.end(), host.data_ptr<int64_t>());
  return cuda ? host.to(at::TensorOptions().dtype(at::kLong).device(device), /*non_blocking=*/true) : host;
}

// inputs is k-major: inputs[k * n + i] pairs with out[i]. A position whose inputs and base share one kernel dtype
// runs on them directly; otherwise they are converted to its compute type first (the kernel would convert each
// element to it anyway). The weights and each position's K input pointers go to the device as one small table,
// so K is bounded by nothing in the kernel arguments.
void ties_merge_cuda(at::TensorList out, at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList base,
                     const std::optional<Tensor>& thresholds, c10::string_view majority_sign, bool normalize,
                     double scale, bool task_vectors) {
  const size_t n = out.size(), k_total = weights.size();
  if (n == 0) return;
  const at::Device device = out[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const bool has_base = !base.empty();
  Outputs outs(out);
  Inputs reads(inputs.size() + base.size());
  std::vector<int64_t> words(k_total * (n + 1));  // K weights (float64 bits), then K input pointers per position
  std::memcpy(words.data(), weights.data(), k_total * sizeof(double));
  std::vector<int64_t> numels(n);
  std::vector<void*> out_ptrs(n);
  std::vector<const void*> base_ptrs(n, nullptr), rows(n), band_ptrs(n, nullptr);
  std::vector<int32_t> out_codes(n), in_codes(n);
  for (size_t i = 0; i < n; ++i) {
    const at::ScalarType first = inputs[i].scalar_type();
    bool shared = dtype_code(first) >= 0 && (!has_base || base[i].scalar_type() == first);
    bool wide = outs[i].scalar_type() == at::kDouble || (has_base && base[i].scalar_type() == at::kDouble);
    for (size_t k = 0; k < k_total; ++k) {
      shared = shared && inputs[k * n + i].scalar_type() == first;
      wide = wide || inputs[k * n + i].scalar_type() == at::kDouble;
    }
    const at::ScalarType ct = wide ? at::kDouble : at::kFloat;
    for (size_t k = 0; k < k_total; ++k) {
      const Tensor& x = inputs[k * n + i];
      words[k_total * (i + 1) + k] = reinterpret_cast<int64_t>(reads.add(shared ? x : x.to(ct), ct).const_data_ptr());
    }
    if (has_base) base_ptrs[i] = reads.add(shared ? base[i] : base[i].to(ct), ct).const_data_ptr();
    numels[i] = outs[i].numel();
    out_ptrs[i] = outs[i].data_ptr();
    out_codes[i] = dtype_code(outs[i].scalar_type());
    in_codes[i] = dtype_code(shared ? first : ct);
  }
  const Tensor table = device_words(words, device);
  const int64_t* table_dev = table.const_data_ptr<int64_t>();
  for (size_t i = 0; i < n; ++i) rows[i] = table_dev + k_total * (i + 1);
  Tensor bands;  // (N, K, 2) float64: position i's (lo, hi) pairs are one row; float64 holds any threshold exactly
  if (thresholds.has_value()) {
    bands = thresholds->to(at::kDouble).permute({1, 0, 2}).contiguous();
    for (size_t i = 0; i < n; ++i) band_ptrs[i] = bands.const_data_ptr<double>() + 2 * k_total * i;
  }
  const int32_t election = majority_sign == "sum" ? 0 : majority_sign == "count" ? 1 : 2;
  C10_CUDA_CHECK(launch_ties_merge(static_cast<int64_t>(n), numels.data(), out_ptrs.data(), out_codes.data(),
                                   base_ptrs.data(), rows.data(), in_codes.data(), band_ptrs.data(),
                                   static_cast<int32_t>(k_total), reinterpret_cast<const double*>(table_dev),
                                   election, normalize, scale, has_base, has_base && !task_vectors,
                                   c10::cuda::getCurrentCUDAStream()));
  outs.finish();
}

// u and per-element keep probabilities reach the kernels as float32 or float64 (other dtypes are converted to
// float32, exactly); the comparison and the division run in float64.
void dare_drop_cuda(at::TensorList deltas, at::TensorList u, at::TensorList keep_prob, double p, bool rescale) {
  const size_t n = deltas.size();
  if (n == 0) return;
  const at::Device device = deltas[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const bool per_element = !keep_prob.empty();
  Outputs ds(deltas);
  Inputs reads(2 * n);
  auto wide_or_float = [&](const Tensor& t) {
    const bool kept = t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
    return reads.add(kept ? t : t.to(at::kFloat), at::kFloat);
  };
  std::vector<int64_t> numels(n);
  std::vector<void*> delta_ptrs(n);
  std::vector<const void*> u_ptrs(n), p_ptrs(per_element ? n : 0);
  std::vector<int32_t> delta_codes(n), u_codes(n), p_codes(per_element ? n : 0);
  for (size_t i = 0; i < n; ++i) {
    const Tensor uu = wide_or_float(u[i]);
    numels[i] = ds[i].numel();
    delta_ptrs[i] = ds[i].data_ptr();
    delta_codes[i] = dtype_code(ds[i].scalar_type());
    u_ptrs[i] = uu.const_data_ptr();
    u_codes[i] = dtype_code(uu.scalar_type());
    if (per_element) {
      const Tensor pp = wide_or_float(keep_prob[i]);
      p_ptrs[i] = pp.const_data_ptr();
      p_codes[i] = dtype_code(pp.scalar_type());
    }
  }
  C10_CUDA_CHECK(launch_dare_drop(static_cast<int64_t>(n), numels.data(), delta_ptrs.data(), delta_codes.data(),
                                  u_ptrs.data(), u_codes.data(), per_element ? p_ptrs.data() : nullptr,
                                  per_element ? p_codes.data() : nullptr, p, rescale,
                                  c10::cuda::getCurrentCUDAStream()));
  ds.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CUDA, m) {
  m.impl("lerp_", &lerp_cuda);
  m.impl("lerp_multi_", &lerp_multi_cuda);
  m.impl("swag_", &swag_cuda);
  m.impl("merge_", &merge_cuda);
  m.impl("any_nonfinite", &any_nonfinite_cuda);
  m.impl("sq_norm", &sq_norm_cuda);
  m.impl("sam_ascent_", &sam_ascent_cuda);
  m.impl("ties_merge_", &ties_merge_cuda);
  m.impl("dare_drop_", &dare_drop_cuda);
}

}  // namespace swm_fused_cuda
