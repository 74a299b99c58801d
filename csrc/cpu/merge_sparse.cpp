// swm_fused::ties_merge_ and dare_drop_ on CPU: the element-wise steps of the sparsifying merges, one pass each.
// ties_merge_ elects a sign per element over K task vectors and sums the agreeing (trimmed) entries;
// dare_drop_ drops entries where u >= p and rescales the rest. Contracts: docs/design.md.
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/multi_tensor.h"

namespace swm_fused::cpu {
namespace {

enum class Election { Sum, Count, None };

Election parse_election(c10::string_view majority_sign) {
  if (majority_sign == "sum") return Election::Sum;
  return majority_sign == "count" ? Election::Count : Election::None;
}

// Bytes of per-model task-vector blocks one range keeps in cache: blocks shrink as K grows.
constexpr int64_t kTiesBlockBytes = 64 * 1024;

// Everything of one ties_merge_ call but the tensors.
struct TiesParams {
  Election election;
  bool normalize;
  bool subtract_base;
  double scale;
  const std::vector<double>* weights;
};

// The smallest C value >= x: for C values m, m >= x exactly when m >= at_least<C>(x), and m < x exactly when
// m < at_least<C>(x), so float32 task vectors compare with float64 bounds exactly, in float32.
template <typename C>
C at_least(double x) {
  const C c = static_cast<C>(x);
  return static_cast<double>(c) < x ? std::nextafter(c, std::numeric_limits<C>::infinity()) : c;
}

// `keep ? value : 0` through the bits: under -ftrapping-math (the default) GCC vectorises no floating-point
// select that follows a comparison, but it does vectorise this.
template <typename C>
inline C kept_or_zero(bool keep, C value) {
  using Bits = std::conditional_t<sizeof(C) == 4, uint32_t, uint64_t>;
  return std::bit_cast<C>(std::bit_cast<Bits>(value) & (Bits(0) - Bits(keep)));
}

// x_k = w_k * d_k for the entries inside model k's band [lo, hi) (hi = +inf: no upper bound), else 0.
// `band` is nullptr when nothing is trimmed.
template <typename C>
void task_terms(C* __restrict x, const C* __restrict in, const C* __restrict b, int64_t n, C w, const double* band) {
  if (b != nullptr) {
    for (int64_t j = 0; j < n; ++j) x[j] = in[j] - b[j];
  } else {
    std::copy(in, in + n, x);
  }
  if (band == nullptr) {
    for (int64_t j = 0; j < n; ++j) x[j] = w * x[j];
    return;
  }
  const C lo = at_least<C>(band[0]);
  if (band[1] == std::numeric_limits<double>::infinity()) {
    for (int64_t j = 0; j < n; ++j) {
      x[j] = kept_or_zero(std::abs(x[j]) >= lo, w * x[j]);
    }
  } else {
    const C hi = at_least<C>(band[1]);
    for (int64_t j = 0; j < n; ++j) {
      const C m = std::abs(x[j]);
      x[j] = kept_or_zero((m >= lo) & (m < hi), w * x[j]);
    }
  }
}

// One range of one position. `inputs[k * stride]` is input k; `bands` holds (lo, hi) per input, or is nullptr.
// Every input block is read before `out`'s block is stored, so `out` may be the base or one of the inputs.
template <typename C>
void ties_range(const Operand& out, const Operand* base, const Operand* inputs, size_t stride, const double* bands,
                const TiesParams& p, int64_t lo, int64_t hi) {
  const size_t k_total = p.weights->size();
  const int64_t block = std::clamp<int64_t>(kTiesBlockBytes / static_cast<int64_t>(sizeof(C) * k_total), 16, kBlock);
  std::vector<C> x(k_total * block);  // every model's terms of the block: the second sweep reads them again
  alignas(64) C base_buf[kBlock], in_buf[kBlock], sign[kBlock], m[kBlock], d[kBlock];
  const C scale = static_cast<C>(p.scale);
  for (int64_t b0 = lo; b0 < hi; b0 += block) {
    const int64_t n = std::min(block, hi - b0);
    const C* b = base != nullptr ? as_compute<C>(*base, b0, n, base_buf) : nullptr;
    std::fill(sign, sign + n, C(0));  // the election's sum, then the elected sign
    for (size_t k = 0; k < k_total; ++k) {
      C* xk = &x[k * block];
      task_terms<C>(xk, as_compute<C>(inputs[k * stride], b0, n, in_buf), p.subtract_base ? b : nullptr, n,
                    static_cast<C>((*p.weights)[k]), bands != nullptr ? bands + 2 * k : nullptr);
      if (p.election == Election::Sum) {
        for (int64_t j = 0; j < n; ++j) sign[j] = sign[j] + xk[j];
      } else if (p.election == Election::Count) {  // sign(0) = sign(NaN) = 0
        for (int64_t j = 0; j < n; ++j) sign[j] = sign[j] + (C(xk[j] > 0) - C(xk[j] < 0));
      }
    }
    for (int64_t j = 0; j < n; ++j) sign[j] = C(2) * C(sign[j] >= 0) - C(1);  // +1 where E >= 0, else -1
    std::fill(m, m + n, C(0));
    std::fill(d, d + n, C(0));
    for (size_t k = 0; k < k_total; ++k) {
      const C* xk = &x[k * block];
      const C w = static_cast<C>((*p.weights)[k]);
      if (p.election == Election::None) {
        for (int64_t j = 0; j < n; ++j) {
          m[j] = m[j] + xk[j];
          d[j] = d[j] + w;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {  // kept: x has the elected sign (x * (+-1) is exact; NaN and 0 fail)
          const bool kept = xk[j] * sign[j] > 0;
          m[j] = m[j] + kept_or_zero(kept, xk[j]);
          d[j] = d[j] + kept_or_zero(kept, w);
        }
      }
    }
    if (p.normalize) {
      for (int64_t j = 0; j < n; ++j) m[j] = m[j] / (d[j] + C(d[j] == 0));  // D = 0 read as 1
    }
    if (b != nullptr) {
      for (int64_t j = 0; j < n; ++j) m[j] = b[j] + scale * m[j];
    } else {
      for (int64_t j = 0; j < n; ++j) m[j] = scale * m[j];
    }
    store_any<C>(out, b0, n, m);
  }
}

bool any_double(at::TensorList a, at::TensorList b, at::TensorList c, size_t i, size_t n) {
  bool found = a[i].scalar_type() == at::kDouble || (!c.empty() && c[i].scalar_type() == at::kDouble);
  for (size_t k = 0; !found && k * n + i < b.size(); ++k) found = b[k * n + i].scalar_type() == at::kDouble;
  return found;
}

// inputs is k-major (inputs[k * n + i] pairs with out[i]); validated in csrc/validate.h.
void ties_merge_cpu(at::TensorList out, at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList base,
                    const std::optional<at::Tensor>& thresholds, c10::string_view majority_sign, bool normalize,
                    double scale, bool task_vectors) {
  const size_t n_out = out.size();
  Staging staging;
  const std::vector<Operand> outs = stage_list(staging, out, true);
  const std::vector<Operand> ins = stage_list(staging, inputs, false);
  const std::vector<Operand> bases = stage_list(staging, base, false);
  // (N, K, 2) float64: position i's bands are one row; float64 holds any floating threshold exactly.
  const at::Tensor bands = thresholds.has_value() ? thresholds->to(at::kDouble).permute({1, 0, 2}).contiguous()
                                                  : at::Tensor();
  const std::vector<double> w(weights.begin(), weights.end());
  const TiesParams params{parse_election(majority_sign), normalize, !base.empty() && !task_vectors, scale, &w};
  std::vector<bool> wide(n_out);
  for (size_t i = 0; i < n_out; ++i) wide[i] = any_double(out, inputs, base, i, n_out);
  parallel_over_tensors(outs, static_cast<int64_t>(w.size()) + 1, [&](size_t i, int64_t lo, int64_t hi) {
    const Operand* b = bases.empty() ? nullptr : &bases[i];
    const double* band = bands.defined() ? bands.const_data_ptr<double>() + 2 * w.size() * i : nullptr;
    if (wide[i]) {
      ties_range<double>(outs[i], b, &ins[i], n_out, band, params, lo, hi);
    } else {
      ties_range<float>(outs[i], b, &ins[i], n_out, band, params, lo, hi);
    }
  });
  staging.write_back();
}

// delta <- u < p ? (rescale ? delta / p : delta) : 0, compared and divided in float64, rounded once at the store
// (through float32 into 16-bit deltas, as torch converts float64).
void drop_range(const Operand& delta, const Operand& u, const Operand* keep_prob, double p, bool rescale, int64_t lo,
                int64_t hi) {
  alignas(64) double d_buf[kBlock], u_buf[kBlock], p_buf[kBlock], out[kBlock];
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t n = std::min(kBlock, hi - b0);
    const double* d = as_compute<double>(delta, b0, n, d_buf);
    const double* uu = as_compute<double>(u, b0, n, u_buf);
    const double* pp = keep_prob != nullptr ? as_compute<double>(*keep_prob, b0, n, p_buf) : nullptr;
    if (pp == nullptr) {
      std::fill(p_buf, p_buf + n, p);
      pp = p_buf;
    }
    if (rescale) {
      for (int64_t j = 0; j < n; ++j) out[j] = kept_or_zero(uu[j] < pp[j], d[j] / pp[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) out[j] = kept_or_zero(uu[j] < pp[j], d[j]);
    }
    store_any<double>(delta, b0, n, out);
  }
}

void dare_drop_cpu(at::TensorList deltas, at::TensorList u, at::TensorList keep_prob, double p, bool rescale) {
  Staging staging;
  const std::vector<Operand> ds = stage_list(staging, deltas, true);
  const std::vector<Operand> us = stage_list(staging, u, false);
  const std::vector<Operand> ps = stage_list(staging, keep_prob, false);
  parallel_over_tensors(ds, 2, [&](size_t i, int64_t lo, int64_t hi) {
    drop_range(ds[i], us[i], ps.empty() ? nullptr : &ps[i], p, rescale, lo, hi);
  });
  staging.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CPU, m) {
  m.impl("ties_merge_", &ties_merge_cpu);
  m.impl("dare_drop_", &dare_drop_cpu);
}

}  // namespace swm_fused::cpu
