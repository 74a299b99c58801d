// swm_fused::swag_ on CPU: both SWAG moments, mean <- lerp(mean, s, w) and
// sq_mean <- lerp(sq_mean, s*s, w), in one pass over memory.
#include <torch/library.h>

#include "cpu/multi_tensor.h"

namespace swm_fused::cpu {
namespace {

// q <- lerp(q, s*s, w), with s*s rounded to C first (as the reference computes it).
template <typename C>
void lerp_square_inplace(C* __restrict q, const C* __restrict s, int64_t n, C w) {
  if (std::abs(w) < C(0.5)) {
    for (int64_t i = 0; i < n; ++i) q[i] = std::fma(w, s[i] * s[i] - q[i], q[i]);
  } else {
    const C w_minus_one = w - C(1);
    for (int64_t i = 0; i < n; ++i) {
      const C sq = s[i] * s[i];
      q[i] = std::fma(w_minus_one, sq - q[i], sq);
    }
  }
}

// Each moment computes in its own compute type (double for a float64 moment, else float).
template <typename CMean, typename CSq>
void swag_range(const Operand& mean, const Operand& sq_mean, const Operand& src, int64_t lo, int64_t hi,
                double weight) {
  alignas(64) CMean mean_buf[kBlock];
  alignas(64) CMean src_buf[kBlock];
  alignas(64) CSq sq_buf[kBlock];
  alignas(64) CSq src_sq_buf[kBlock];
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int64_t n = std::min(kBlock, hi - b);
    CMean* m = as_compute<CMean>(mean, b, n, mean_buf);
    CMean* s = as_compute<CMean>(src, b, n, src_buf);
    lerp_inplace<CMean>(m, s, n, static_cast<CMean>(weight));
    store<CMean>(mean, b, n, m);
    CSq* q = as_compute<CSq>(sq_mean, b, n, sq_buf);
    const CSq* s_sq;
    if constexpr (std::is_same_v<CMean, CSq>) {
      s_sq = s;
    } else {
      s_sq = as_compute<CSq>(src, b, n, src_sq_buf);
    }
    lerp_square_inplace<CSq>(q, s_sq, n, static_cast<CSq>(weight));
    store<CSq>(sq_mean, b, n, q);
  }
}

void swag_cpu(at::TensorList mean, at::TensorList sq_mean, at::TensorList src, double weight,
              const std::optional<at::Tensor>& weight_tensor, const std::optional<at::Tensor>& found_inf) {
  Staging staging;
  const std::vector<Operand> means = stage_list(staging, mean, true);
  const std::vector<Operand> sq_means = stage_list(staging, sq_mean, true);
  const std::vector<Operand> srcs = stage_list(staging, src, false);
  if (step_is_skipped(found_inf)) return;
  const double w = weight_tensor.has_value() ? weight_tensor->item<double>() : weight;
  parallel_over_tensors(means, 2, [&](size_t i, int64_t lo, int64_t hi) {
    const bool mean_f64 = means[i].dtype == at::kDouble, sq_f64 = sq_means[i].dtype == at::kDouble;
    if (mean_f64 && sq_f64) {
      swag_range<double, double>(means[i], sq_means[i], srcs[i], lo, hi, w);
    } else if (mean_f64) {
      swag_range<double, float>(means[i], sq_means[i], srcs[i], lo, hi, w);
    } else if (sq_f64) {
      swag_range<float, double>(means[i], sq_means[i], srcs[i], lo, hi, w);
    } else {
      swag_range<float, float>(means[i], sq_means[i], srcs[i], lo, hi, w);
    }
  });
  staging.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CPU, m) { m.impl("swag_", &swag_cpu); }

}  // namespace swm_fused::cpu
