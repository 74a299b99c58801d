// swm_fused::merge_ on CPU: out <- sum_k weights[k] * inputs[k], K inputs per output, one pass.
//
// The schedule (bench/NOTES.md, "K-way merge"): each thread runs through its range one 64-byte
// line of the output at a time, reading that line of up to kGroup inputs side by side, with a
// software prefetch kPrefetchBytes ahead in every input stream (the hardware prefetchers stop at
// each 4 KB page and track few streams), and writes the line straight from registers, with
// non-temporal stores when the call is larger than the caches (no read of the output line before
// it is written: 4(K+1) bytes per element move instead of 4(K+2)). Inputs of another dtype than
// the compute type, more than kGroup inputs, and outputs of another dtype go through per-block
// buffers that stay in L1.
#include <torch/library.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SWM_FUSED_STREAM_STORES 1
#endif

#include "cpu/multi_tensor.h"

namespace swm_fused::cpu {
namespace {

constexpr int64_t kLineBytes = 64;
// Inputs read together per line. Eight streams side by side ran fastest (four: 20% slower at K = 8).
constexpr size_t kGroup = 8;
// Elements per block of the buffered paths (a multiple of every line length): kGroup converted
// inputs of this size fill L1.
constexpr int64_t kMergeBlock = 1024;
// How far ahead of the line being read each input is prefetched: 8 lines.
constexpr int64_t kPrefetchBytes = 512;
// A call that moves at least this many bytes streams its float32/float64 outputs past the caches.
// Below it the output may well be read again from cache, and non-temporal stores would evict it.
constexpr int64_t kStreamMinBytes = int64_t(32) << 20;

// Vectors of the target's width (32 bytes with AVX, 16 otherwise: SSE2, NEON) of compute-type
// values: the SIMD width is explicit, and the arithmetic is the scalar code's, lane by lane: a
// product rounded, then a sum rounded (the build disables fp contraction).
#if defined(__AVX__)
constexpr int64_t kVecBytes = 32;
#else
constexpr int64_t kVecBytes = 16;
#endif
constexpr int64_t kVecsPerLine = kLineBytes / kVecBytes;

template <typename C>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};
template <typename C>
using Vec = typename VecOf<C>::type;

template <typename C>
[[gnu::always_inline]] inline Vec<C> load(const C* p) {
  Vec<C> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename C>
[[gnu::always_inline]] inline void store_vec(C* p, Vec<C> v) {
  std::memcpy(p, &v, sizeof v);
}

// Stores v to p (aligned to the vector) past the caches where the target has such stores.
template <typename C>
[[gnu::always_inline]] inline void stream_vec(C* p, Vec<C> v) {
#if defined(SWM_FUSED_STREAM_STORES) && defined(__AVX__)
  if constexpr (std::is_same_v<C, float>) {
    _mm256_stream_ps(p, (__m256)v);
  } else {
    _mm256_stream_pd(p, (__m256d)v);
  }
#elif defined(SWM_FUSED_STREAM_STORES)
  if constexpr (std::is_same_v<C, float>) {
    _mm_stream_ps(p, (__m128)v);
  } else {
    _mm_stream_pd(p, (__m128d)v);
  }
#else
  store_vec(p, v);
#endif
}

// Orders this thread's non-temporal stores before whatever follows (the end of the parallel region).
inline void stream_fence() {
#if defined(SWM_FUSED_STREAM_STORES)
  _mm_sfence();
#endif
}

enum class Dst { kRegular, kStream };

// dst[i] <- (acc[i] when acc, else w[0] * x[0][i]) + w[g] * x[g][i] for the further inputs g, in
// order, for i in [0, n): a product rounded, then a sum rounded, as torch computes `acc + w * x`.
// acc may be dst (an in-place accumulation); dst may be one of x (an in-place merge: every input
// of a line is read before the line is written). With Dst::kStream, dst is 64-byte aligned.
template <typename C, size_t G, bool kFromAcc, Dst kDst>
void accumulate_lines(C* dst, const C* acc, const C* const* x, const C* w, int64_t n) {
  constexpr int64_t kLane = kVecBytes / sizeof(C), kLine = kLineBytes / sizeof(C);
  constexpr int64_t kAhead = kPrefetchBytes / sizeof(C);
  Vec<C> wv[G];
  for (size_t g = 0; g < G; ++g) wv[g] = Vec<C>{} + w[g];
  int64_t i = 0;
  for (; i + kLine <= n; i += kLine) {
    for (size_t g = 0; g < G; ++g) __builtin_prefetch(x[g] + i + kAhead, 0, 3);
    Vec<C> a[kVecsPerLine];
    size_t g = 0;
    if constexpr (kFromAcc) {
      for (int64_t v = 0; v < kVecsPerLine; ++v) a[v] = load(acc + i + v * kLane);
    } else {
      for (int64_t v = 0; v < kVecsPerLine; ++v) a[v] = wv[0] * load(x[0] + i + v * kLane);
      g = 1;
    }
    for (; g < G; ++g) {
      for (int64_t v = 0; v < kVecsPerLine; ++v) a[v] = a[v] + wv[g] * load(x[g] + i + v * kLane);
    }
    for (int64_t v = 0; v < kVecsPerLine; ++v) {
      if constexpr (kDst == Dst::kStream) {
        stream_vec(dst + i + v * kLane, a[v]);
      } else {
        store_vec(dst + i + v * kLane, a[v]);
      }
    }
  }
  for (; i < n; ++i) {  // the last partial line
    C a;
    size_t g = 0;
    if constexpr (kFromAcc) {
      a = acc[i];
    } else {
      a = w[0] * x[0][i];
      g = 1;
    }
    for (; g < G; ++g) a = a + w[g] * x[g][i];
    dst[i] = a;
  }
}

template <typename C, size_t G>
void accumulate_lines(C* dst, const C* acc, const C* const* x, const C* w, int64_t n, bool stream) {
  if (acc != nullptr) {
    return stream ? accumulate_lines<C, G, true, Dst::kStream>(dst, acc, x, w, n)
                  : accumulate_lines<C, G, true, Dst::kRegular>(dst, acc, x, w, n);
  }
  return stream ? accumulate_lines<C, G, false, Dst::kStream>(dst, acc, x, w, n)
                : accumulate_lines<C, G, false, Dst::kRegular>(dst, acc, x, w, n);
}

// The group's G inputs (1 <= G <= kGroup) added into dst; acc is nullptr for the first group.
template <typename C>
void accumulate_group(C* dst, const C* acc, const C* const* x, const C* w, size_t group, int64_t n, bool stream) {
  static_assert(kGroup == 8, "the switch covers groups of 1 to 8 inputs");
  switch (group) {
    case 1: return accumulate_lines<C, 1>(dst, acc, x, w, n, stream);
    case 2: return accumulate_lines<C, 2>(dst, acc, x, w, n, stream);
    case 3: return accumulate_lines<C, 3>(dst, acc, x, w, n, stream);
    case 4: return accumulate_lines<C, 4>(dst, acc, x, w, n, stream);
    case 5: return accumulate_lines<C, 5>(dst, acc, x, w, n, stream);
    case 6: return accumulate_lines<C, 6>(dst, acc, x, w, n, stream);
    case 7: return accumulate_lines<C, 7>(dst, acc, x, w, n, stream);
    default: return accumulate_lines<C, kGroup>(dst, acc, x, w, n, stream);
  }
}

// Elements [lo, hi) of one output. `inputs[k * stride]` is input k of this output. With `stream`,
// a written operand of the compute type gets non-temporal stores on the whole 64-byte lines of the
// range; the partial lines at either end get ordinary stores (a neighbouring thread may write the
// rest of such a line).
template <typename C>
void merge_range(const Operand& out, const Operand* inputs, size_t stride, const std::vector<C>& w,
                 int64_t lo, int64_t hi, bool stream) {
  constexpr int64_t kLine = kLineBytes / sizeof(C);
  const size_t k_total = w.size();
  C* const direct = out.dtype == c10::CppTypeToScalarType<C>::value ? static_cast<C*>(out.data) : nullptr;
  stream = stream && direct != nullptr;
  alignas(64) C acc[kMergeBlock];
  alignas(64) C x_buf[kGroup][kMergeBlock];
  const C* x[kGroup];
  // Blocks start on 64-byte lines of the output, after a head of fewer than kLine elements.
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(static_cast<char*>(out.data) +
                                                                            lo * static_cast<int64_t>(sizeof(C))) %
                                                kLineBytes);
  const int64_t head = misalign % static_cast<int64_t>(sizeof(C)) == 0
                           ? std::min(hi - lo, (kLine - misalign / static_cast<int64_t>(sizeof(C))) % kLine)
                           : 0;
  for (int64_t b = lo, n = head; b < hi; b += n, n = std::min(kMergeBlock, hi - b)) {
    if (n == 0) continue;
    // A whole line at b: only then may this block's stores bypass the cache.
    const bool stream_block = stream && (head == 0 ? misalign == 0 : b != lo);
    for (size_t k0 = 0; k0 < k_total; k0 += kGroup) {
      const size_t group = std::min(kGroup, k_total - k0);
      for (size_t g = 0; g < group; ++g) x[g] = as_compute<C>(inputs[(k0 + g) * stride], b, n, x_buf[g]);
      const bool last = k0 + group == k_total;
      C* dst = last && direct != nullptr ? direct + b : acc;
      accumulate_group<C>(dst, k0 == 0 ? nullptr : acc, x, &w[k0], group, n, last && stream_block);
    }
    if (direct == nullptr) store<C>(out, b, n, acc);
  }
  if (stream) stream_fence();
}

// True when the bytes of `out` overlap those of any of the K inputs paired with it.
bool overlaps_an_input(const Operand& out, const Operand* inputs, size_t stride, size_t k_total) {
  const auto span = [](const Operand& t) {
    const char* p = static_cast<const char*>(t.data);
    return std::make_pair(p, p + t.numel * static_cast<int64_t>(c10::elementSize(t.dtype)));
  };
  const auto [o_lo, o_hi] = span(out);
  for (size_t k = 0; k < k_total; ++k) {
    const auto [i_lo, i_hi] = span(inputs[k * stride]);
    if (o_lo < i_hi && i_lo < o_hi) return true;
  }
  return false;
}

// inputs is k-major (inputs[k * n_out + i] pairs with out[i]); validated in csrc/validate.h.
void merge_cpu(at::TensorList out, at::TensorList inputs, at::ArrayRef<double> weights) {
  const size_t n_out = out.size(), k = weights.size();
  Staging staging;
  const std::vector<Operand> outs = stage_list(staging, out, true);
  const std::vector<Operand> ins = stage_list(staging, inputs, false);
  const std::vector<double> weights_double(weights.begin(), weights.end());
  const std::vector<float> weights_float(weights.begin(), weights.end());
  // Non-temporal stores for a call larger than the caches, on outputs that are none of their inputs
  // (an in-place merge reads each output line anyway, so ordinary stores cost no extra read there).
  int64_t call_bytes = 0;
  for (size_t i = 0; i < n_out; ++i) {
    call_bytes += outs[i].numel * static_cast<int64_t>(c10::elementSize(outs[i].dtype));
    for (size_t j = 0; j < k; ++j) {
      call_bytes += ins[j * n_out + i].numel * static_cast<int64_t>(c10::elementSize(ins[j * n_out + i].dtype));
    }
  }
  std::vector<char> stream(n_out, 0);
  for (size_t i = 0; i < n_out; ++i) {
    stream[i] = call_bytes >= kStreamMinBytes && !overlaps_an_input(outs[i], &ins[i], n_out, k);
  }
  parallel_over_tensors(outs, static_cast<int64_t>(k), [&](size_t i, int64_t lo, int64_t hi) {
    if (outs[i].dtype == at::kDouble) {
      merge_range<double>(outs[i], &ins[i], n_out, weights_double, lo, hi, stream[i]);
    } else {
      merge_range<float>(outs[i], &ins[i], n_out, weights_float, lo, hi, stream[i]);
    }
  });
  staging.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CPU, m) { m.impl("merge_", &merge_cpu); }

}  // namespace swm_fused::cpu
