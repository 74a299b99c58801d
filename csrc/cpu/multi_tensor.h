// Shared machinery of the CPU kernels: operands, dtype conversions, staging of
// non-contiguous tensors, and one parallel region over a whole list of tensors.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace swm_fused::cpu {

// Elements per conversion block: a few of these fit in L1 at once.
constexpr int64_t kBlock = 512;

// Raw contiguous memory of one tensor.
struct Operand {
  void* data;
  at::ScalarType dtype;
  int64_t numel;
};

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// ---- Bit-exact conversions written with integer and float ops only, so loops over them vectorise.

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even; a NaN stays a (quiet) NaN with its sign.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

// IEEE half -> float, exact (the FP16 library's branch-free algorithm).
inline float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * bits_to_float(15u << 23);
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_to_float(sign | float_to_bits(two_w < (1u << 27) ? denormalized : normalized));
}

// float -> IEEE half, round to nearest even (FP16 library); a NaN keeps its sign and top payload bits.
inline uint16_t float_to_half(float f) {
  const float scale_to_inf = bits_to_float(239u << 23);
  const float scale_to_zero = bits_to_float(17u << 23);
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  const uint32_t nan = 0x7E00u | ((w >> 13) & 0x03FFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? nan : nonsign));
}

// Compute type C (float or double) of elements [begin, begin + n) of `t`: the operand's own
// memory when its dtype is C, else `buf` filled with the converted values.
template <typename C>
C* as_compute(const Operand& t, int64_t begin, int64_t n, C* buf) {
  switch (t.dtype) {
    case at::kFloat: {
      float* p = static_cast<float*>(t.data) + begin;
      if constexpr (std::is_same_v<C, float>) {
        return p;
      } else {
        for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
        return buf;
      }
    }
    case at::kDouble: {
      double* p = static_cast<double*>(t.data) + begin;
      if constexpr (std::is_same_v<C, double>) {
        return p;
      } else {
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
        return buf;
      }
    }
    case at::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(t.data) + begin;
      for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(p[i]);
      return buf;
    }
    default: {  // at::kHalf; staging admits nothing else
      const uint16_t* p = static_cast<const uint16_t*>(t.data) + begin;
      for (int64_t i = 0; i < n; ++i) buf[i] = half_to_float(p[i]);
      return buf;
    }
  }
}

// Stores compute-type values into elements [begin, begin + n) of a written operand, rounding
// once; a no-op when `values` already is that memory. Written float64 tensors compute in
// double, every other written dtype in float.
template <typename C>
void store(const Operand& t, int64_t begin, int64_t n, const C* values) {
  if constexpr (std::is_same_v<C, double>) {
    double* p = static_cast<double*>(t.data) + begin;
    if (p != values) std::copy(values, values + n, p);
  } else if (t.dtype == at::kFloat) {
    float* p = static_cast<float*>(t.data) + begin;
    if (p != values) std::copy(values, values + n, p);
  } else if (t.dtype == at::kBFloat16) {
    uint16_t* p = static_cast<uint16_t*>(t.data) + begin;
    for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(values[i]);
  } else {
    uint16_t* p = static_cast<uint16_t*>(t.data) + begin;
    for (int64_t i = 0; i < n; ++i) p[i] = float_to_half(values[i]);
  }
}

// Stores compute-type values into any written dtype: `store` expects float64 tensors to take
// double values and the others float ones (double values into a narrower type go through float,
// as torch's conversions do).
template <typename C>
void store_any(const Operand& t, int64_t begin, int64_t n, const C* values) {
  if constexpr (std::is_same_v<C, double>) {
    if (t.dtype != at::kDouble) {
      alignas(64) float narrow[kBlock];
      for (int64_t i = 0; i < n; ++i) narrow[i] = static_cast<float>(values[i]);
      store<float>(t, begin, n, narrow);
      return;
    }
  } else {
    if (t.dtype == at::kDouble) {
      alignas(64) double wide[kBlock];
      for (int64_t i = 0; i < n; ++i) wide[i] = values[i];
      store<double>(t, begin, n, wide);
      return;
    }
  }
  store<C>(t, begin, n, values);
}

// a <- lerp(a, s, w) with torch's vectorised formula, so float32 results match torch.lerp bit
// for bit: fma(w, s - a, a) when |w| < 0.5, else fma(w - 1, s - a, s).
template <typename C>
void lerp_inplace(C* __restrict a, const C* __restrict s, int64_t n, C w) {
  if (std::abs(w) < C(0.5)) {
    for (int64_t i = 0; i < n; ++i) a[i] = std::fma(w, s[i] - a[i], a[i]);
  } else {
    const C w_minus_one = w - C(1);
    for (int64_t i = 0; i < n; ++i) a[i] = std::fma(w_minus_one, s[i] - a[i], s[i]);
  }
}

// Turns tensors into operands. Contiguous tensors of a kernel dtype are used in place; others
// go through contiguous temporaries (float32 for other floating sources, which is exact), and
// written temporaries are copied back by write_back(). The arguments were validated before the
// kernel was reached (csrc/validate.h): every tensor is a CPU tensor, shapes match, written ones
// have a kernel dtype and read ones a floating dtype.
class Staging {
 public:
  Operand read(const at::Tensor& t) {
    if (t.is_contiguous() && is_kernel_dtype(t.scalar_type())) return operand(t);
    temps_.push_back(t.to(is_kernel_dtype(t.scalar_type()) ? t.scalar_type() : at::kFloat,
                          /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous));
    return operand(temps_.back());
  }

  Operand written(const at::Tensor& t) {
    if (t.is_contiguous()) return operand(t);
    write_backs_.emplace_back(t, t.contiguous());
    return operand(write_backs_.back().second);
  }

  void write_back() {
    for (auto& [dst, tmp] : write_backs_) dst.copy_(tmp);
  }

 private:
  static Operand operand(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type(), t.numel()}; }

  std::vector<at::Tensor> temps_;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_backs_;
};

// Operands of every tensor of `list`, staged as written or as read-only.
inline std::vector<Operand> stage_list(Staging& staging, at::TensorList list, bool is_written) {
  std::vector<Operand> out;
  out.reserve(list.size());
  for (const at::Tensor& t : list) out.push_back(is_written ? staging.written(t) : staging.read(t));
  return out;
}

// True when a found_inf flag is given and non-zero: the step is skipped.
inline bool step_is_skipped(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<double>() != 0.0;
}

// Calls fn(i, begin, end) on element ranges covering every element of every operand exactly
// once, from ONE parallel region over the whole list. Threads get equal shares of a cost
// space in which each tensor counts its elements plus a fixed per-tensor overhead, so lists
// of thousands of small tensors split as evenly as one big tensor.
template <typename F>
void parallel_over_tensors(const std::vector<Operand>& tensors, int64_t work_per_element, const F& fn) {
  constexpr int64_t kTensorOverhead = 128;
  constexpr int64_t kGrain = 32768;
  std::vector<int64_t> start(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) start[i + 1] = start[i] + kTensorOverhead + tensors[i].numel;
  const int64_t grain = std::max<int64_t>(kGrain / std::max<int64_t>(work_per_element, 1), 1024);
  at::parallel_for(0, start.back(), grain, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (; i < tensors.size() && start[i] < end; ++i) {
      const int64_t first = start[i] + kTensorOverhead, n = tensors[i].numel;
      const int64_t lo = std::clamp<int64_t>(begin - first, 0, n);
      const int64_t hi = std::clamp<int64_t>(end - first, 0, n);
      if (lo < hi) fn(i, lo, hi);
    }
  });
}

// True when some |x| has an all-ones exponent: the largest magnitude bit pattern tells.
template <typename Bits>
bool has_nonfinite_bits(const Bits* p, int64_t n, Bits magnitude_mask, Bits exponent_mask) {
  Bits largest = 0;
  for (int64_t i = 0; i < n; ++i) largest = std::max<Bits>(largest, p[i] & magnitude_mask);
  return largest >= exponent_mask;
}

inline bool has_nonfinite(const Operand& t, int64_t begin, int64_t n) {
  switch (t.dtype) {
    case at::kFloat:
      return has_nonfinite_bits<uint32_t>(static_cast<const uint32_t*>(t.data) + begin, n, 0x7FFFFFFFu,
                                          0x7F800000u);
    case at::kDouble:
      return has_nonfinite_bits<uint64_t>(static_cast<const uint64_t*>(t.data) + begin, n,
                                          0x7FFFFFFFFFFFFFFFull, 0x7FF0000000000000ull);
    case at::kBFloat16:
      return has_nonfinite_bits<uint16_t>(static_cast<const uint16_t*>(t.data) + begin, n, 0x7FFF, 0x7F80);
    default:  // at::kHalf
      return has_nonfinite_bits<uint16_t>(static_cast<const uint16_t*>(t.data) + begin, n, 0x7FFF, 0x7C00);
  }
}

// Whether any element of the (staged, floating) operands is NaN or Inf. Scans in slices so a
// thread stops soon after any thread found one.
inline bool any_nonfinite_in(const std::vector<Operand>& ops) {
  std::atomic<bool> found{false};
  constexpr int64_t kSlice = 16 * kBlock;
  parallel_over_tensors(ops, 1, [&](size_t i, int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi && !found.load(std::memory_order_relaxed); b += kSlice) {
      if (has_nonfinite(ops[i], b, std::min(kSlice, hi - b))) found.store(true, std::memory_order_relaxed);
    }
  });
  return found.load();
}

}  // namespace swm_fused::cpu
