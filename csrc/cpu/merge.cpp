// swm_fused::merge_ on CPU: out <- sum_k weights[k] * inputs[k], K inputs per output, one pass.
//
// The schedule (bench/NOTES.md, "K-way merge"): each thread runs through its range one 64-byte
// line at a time, reading that line of up to kGroup inputs side by side, with a software prefetch
// kPrefetchBytes ahead in every input stream, and writes the line of the output straight from
// registers, with non-temporal stores when the call is larger than the caches (no read of the
// output line before it is written: (K+1) element sizes per element move instead of K+2).
// bfloat16 inputs and outputs are converted in registers on the way. Other conversions (float16,
// mixed dtypes at one position), more than kGroup inputs and float16 outputs go through per-block
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
// Inputs read together per line: at K = 8, four at a time (two passes over an L1 accumulator) ran
// 5-15% slower than eight side by side in a standalone loop.
constexpr size_t kGroup = 8;
// Elements per block (a multiple of every line's element count): the accumulator of K > kGroup
// inputs, or of an output written through store(), stays in L1.
constexpr int64_t kMergeBlock = 1024;
// Inputs converted into L1 buffers one input at a time (float16, mixed dtypes) read one stream
// alone per conversion: longer runs, and fewer inputs per group so the buffers still fit in L1,
// keep the hardware prefetchers ahead (the previous kernel's schedule).
constexpr size_t kConvertGroup = 4;
constexpr int64_t kConvertBlock = 2048;
// How far ahead of the line being read each input is prefetched: 8 lines (256 as good, 1024 and
// more worse; without it about 8% slower at K = 8, in a standalone loop).
constexpr int64_t kPrefetchBytes = 512;
// A call that moves at least this many bytes streams its outputs past the caches. Below it the
// output may well be read again from cache, and non-temporal stores would evict it.
constexpr int64_t kStreamMinBytes = int64_t(32) << 20;

// ---- Vectors

// Vectors of the target's width (32 bytes with AVX, 16 otherwise: SSE2, NEON) of compute-type
// values: the SIMD width is explicit, and the arithmetic is the scalar code's, lane by lane: a
// product rounded, then a sum rounded (the build disables fp contraction).
#if defined(__AVX__)
constexpr int64_t kVecBytes = 32;
#else
constexpr int64_t kVecBytes = 16;
#endif

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
typedef uint32_t U32 __attribute__((vector_size(kVecBytes)));  // the bits of a Vec<float>
typedef uint16_t U16 __attribute__((vector_size(kVecBytes / 2)));  // as many bfloat16s

// The storage of a bfloat16 operand, converted to and from float in registers.
struct BFloat16Bits {
  uint16_t bits;
};

template <typename C>
constexpr at::ScalarType kDtypeOf = c10::CppTypeToScalarType<C>::value;

// One vector of compute-type values from the elements of type S at p.
template <typename C, typename S>
[[gnu::always_inline]] inline Vec<C> load_as(const S* p) {
  if constexpr (std::is_same_v<S, C>) {
    Vec<C> v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else {
    static_assert(std::is_same_v<C, float> && std::is_same_v<S, BFloat16Bits>);
    U16 h;
    std::memcpy(&h, p, sizeof h);
    return (Vec<float>)(__builtin_convertvector(h, U32) << 16);  // bf16_to_float
  }
}

// float_to_bf16 (multi_tensor.h), lane by lane: round to nearest even; a NaN stays a quiet NaN.
[[gnu::always_inline]] inline U16 to_bf16(Vec<float> v) {
  const U32 u = (U32)v;
  const U32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const U32 quiet_nan = (u >> 16) | 0x40u;
  return __builtin_convertvector((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded, U16);
}

// Stores one vector to p as elements of type D, past the caches with kStream (p then aligned to
// the stored bytes) where the target has such stores.
template <typename D, bool kStream, typename C>
[[gnu::always_inline]] inline void store_as(D* p, Vec<C> v) {
  if constexpr (std::is_same_v<D, C>) {
#if defined(SWM_FUSED_STREAM_STORES)
    if constexpr (kStream) {
#if defined(__AVX__)
      if constexpr (std::is_same_v<C, float>) {
        _mm256_stream_ps(p, (__m256)v);
      } else {
        _mm256_stream_pd(p, (__m256d)v);
      }
#else
      if constexpr (std::is_same_v<C, float>) {
        _mm_stream_ps(p, (__m128)v);
      } else {
        _mm_stream_pd(p, (__m128d)v);
      }
#endif
      return;
    }
#endif
    std::memcpy(p, &v, sizeof v);
  } else {
    static_assert(std::is_same_v<C, float> && std::is_same_v<D, BFloat16Bits>);
    const U16 h = to_bf16(v);
#if defined(SWM_FUSED_STREAM_STORES)
    if constexpr (kStream) {
#if defined(__AVX__)
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)h);
#else
      long long bits;
      std::memcpy(&bits, &h, sizeof bits);
      _mm_stream_si64(reinterpret_cast<long long*>(p), bits);
#endif
      return;
    }
#endif
    std::memcpy(p, &h, sizeof h);
  }
}

// Orders this thread's non-temporal stores before whatever follows (the end of the parallel region).
inline void stream_fence() {
#if defined(SWM_FUSED_STREAM_STORES)
  _mm_sfence();
#endif
}

template <typename C, typename S>
inline C to_compute(S s) {
  if constexpr (std::is_same_v<S, C>) {
    return s;
  } else {
    return bf16_to_float(s.bits);
  }
}

template <typename D, typename C>
inline void store_one(D* p, C value) {
  if constexpr (std::is_same_v<D, C>) {
    *p = value;
  } else {
    p->bits = float_to_bf16(value);
  }
}

// ---- The line loop

// dst[i] <- (acc[i] when kFromAcc, else w[0] * x[0][i]) + w[g] * x[g][i] for the further inputs g,
// in order, for i in [0, n): a product rounded, then a sum rounded, as torch computes `acc + w * x`.
// acc may be dst (an in-place accumulation); dst may be one of x (an in-place merge: every input
// of a line is read before the line is written). With kStream, dst is 64-byte aligned.
template <typename C, typename S, typename D, size_t G, bool kFromAcc, bool kStream>
void accumulate_lines(D* dst, const C* acc, const S* const* x, const C* w, int64_t n) {
  constexpr int64_t kLane = kVecBytes / static_cast<int64_t>(sizeof(C));
  // Elements per step: a whole 64-byte line of the narrowest operand.
  constexpr int64_t kStep = kLineBytes / static_cast<int64_t>(std::min({sizeof(C), sizeof(S), sizeof(D)}));
  constexpr int64_t kVecs = kStep / kLane;
  constexpr int64_t kLinesOfS = kStep * static_cast<int64_t>(sizeof(S)) / kLineBytes;
  constexpr int64_t kLineOfS = kLineBytes / static_cast<int64_t>(sizeof(S)), kAhead = kPrefetchBytes / sizeof(S);
  Vec<C> wv[G];
  for (size_t g = 0; g < G; ++g) wv[g] = Vec<C>{} + w[g];
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    for (size_t g = 0; g < G; ++g) {
      for (int64_t l = 0; l < kLinesOfS; ++l) __builtin_prefetch(x[g] + i + kAhead + l * kLineOfS, 0, 3);
    }
    Vec<C> a[kVecs];
    size_t g = 0;
    if constexpr (kFromAcc) {
      for (int64_t v = 0; v < kVecs; ++v) a[v] = load_as<C>(acc + i + v * kLane);
    } else {
      for (int64_t v = 0; v < kVecs; ++v) a[v] = wv[0] * load_as<C>(x[0] + i + v * kLane);
      g = 1;
    }
    for (; g < G; ++g) {
      for (int64_t v = 0; v < kVecs; ++v) a[v] = a[v] + wv[g] * load_as<C>(x[g] + i + v * kLane);
    }
    for (int64_t v = 0; v < kVecs; ++v) store_as<D, kStream, C>(dst + i + v * kLane, a[v]);
  }
  for (; i < n; ++i) {  // the last partial line
    C a;
    size_t g = 0;
    if constexpr (kFromAcc) {
      a = acc[i];
    } else {
      a = w[0] * to_compute<C>(x[0][i]);
      g = 1;
    }
    for (; g < G; ++g) a = a + w[g] * to_compute<C>(x[g][i]);
    store_one(dst + i, a);
  }
}

template <typename C, typename S, typename D, size_t G>
void accumulate_lines(D* dst, const C* acc, const S* const* x, const C* w, int64_t n, bool stream) {
  if (acc != nullptr) {
    return stream ? accumulate_lines<C, S, D, G, true, true>(dst, acc, x, w, n)
                  : accumulate_lines<C, S, D, G, true, false>(dst, acc, x, w, n);
  }
  return stream ? accumulate_lines<C, S, D, G, false, true>(dst, acc, x, w, n)
                : accumulate_lines<C, S, D, G, false, false>(dst, acc, x, w, n);
}

// The group's inputs (1 to kGroup of them) added into dst; acc is nullptr for the first group.
template <typename C, typename S, typename D>
void accumulate_group(D* dst, const C* acc, const S* const* x, const C* w, size_t group, int64_t n, bool stream) {
  static_assert(kGroup == 8, "the switch covers groups of 1 to 8 inputs");
  switch (group) {
    case 1: return accumulate_lines<C, S, D, 1>(dst, acc, x, w, n, stream);
    case 2: return accumulate_lines<C, S, D, 2>(dst, acc, x, w, n, stream);
    case 3: return accumulate_lines<C, S, D, 3>(dst, acc, x, w, n, stream);
    case 4: return accumulate_lines<C, S, D, 4>(dst, acc, x, w, n, stream);
    case 5: return accumulate_lines<C, S, D, 5>(dst, acc, x, w, n, stream);
    case 6: return accumulate_lines<C, S, D, 6>(dst, acc, x, w, n, stream);
    case 7: return accumulate_lines<C, S, D, 7>(dst, acc, x, w, n, stream);
    default: return accumulate_lines<C, S, D, kGroup>(dst, acc, x, w, n, stream);
  }
}

// ---- One output's range

// Elements [lo, hi) of one output; `inputs[k * stride]` is input k of it. S: the type every input
// is read as (its own dtype, or the compute type C through conversion buffers when kBuffered). D:
// the output's element type when it is written directly (C or bfloat16), void when it is written
// through an accumulator and store(). With `stream`, the whole 64-byte lines of the range get
// non-temporal stores; the partial lines at either end get ordinary stores (a neighbouring
// thread may write the rest of such a line).
template <typename C, typename S, typename D, bool kBuffered>
void merge_range_as(const Operand& out, const Operand* inputs, size_t stride, const std::vector<C>& w,
                    int64_t lo, int64_t hi, bool stream) {
  constexpr bool kDirect = !std::is_void_v<D>;
  using Out = std::conditional_t<kDirect, D, C>;
  constexpr int64_t kOutSize = sizeof(std::conditional_t<kDirect, D, char>);
  constexpr size_t kGroupSize = kBuffered ? kConvertGroup : kGroup;
  constexpr int64_t kBlock = kBuffered ? kConvertBlock : kMergeBlock;
  const size_t k_total = w.size();
  stream = stream && kDirect;
  alignas(64) C acc[std::max(kMergeBlock, kConvertBlock)];
  alignas(64) C x_buf[kBuffered ? kConvertGroup * kConvertBlock : 1];
  const S* x[kGroup];
  // Blocks start on 64-byte lines of the output, after a head of fewer than a line's elements.
  const int64_t misalign = static_cast<int64_t>(
      reinterpret_cast<uintptr_t>(static_cast<char*>(out.data) + lo * kOutSize) % kLineBytes);
  const int64_t head =
      kDirect && misalign % kOutSize == 0 ? std::min(hi - lo, (kLineBytes - misalign) % kLineBytes / kOutSize) : 0;
  for (int64_t b = lo, n = head; b < hi; b += n, n = std::min(kBlock, hi - b)) {
    if (n == 0) continue;
    // A whole line at b: only then may this block's stores bypass the cache.
    const bool stream_block = stream && (head == 0 ? misalign == 0 : b != lo);
    for (size_t k0 = 0; k0 < k_total; k0 += kGroupSize) {
      const size_t group = std::min(kGroupSize, k_total - k0);
      for (size_t g = 0; g < group; ++g) {
        const Operand& t = inputs[(k0 + g) * stride];
        if constexpr (kBuffered) {
          x[g] = as_compute<C>(t, b, n, x_buf + g * kBlock);
        } else {
          x[g] = static_cast<const S*>(t.data) + b;
        }
      }
      const C* from = k0 == 0 ? nullptr : acc;
      if (k0 + group < k_total) {
        accumulate_group<C, S, C>(acc, from, x, &w[k0], group, n, false);
      } else if constexpr (kDirect) {
        accumulate_group<C, S, D>(static_cast<Out*>(out.data) + b, from, x, &w[k0], group, n, stream_block);
      } else {
        accumulate_group<C, S, C>(acc, from, x, &w[k0], group, n, false);
        store<C>(out, b, n, acc);
      }
    }
  }
  if (stream) stream_fence();
}

// The instantiation of merge_range_as for this output and its inputs' dtypes.
template <typename C>
void merge_range(const Operand& out, const Operand* inputs, size_t stride, const std::vector<C>& w,
                 int64_t lo, int64_t hi, bool stream) {
  const size_t k_total = w.size();
  const at::ScalarType first = inputs[0].dtype;
  bool one_dtype = true;
  for (size_t k = 1; k < k_total; ++k) one_dtype = one_dtype && inputs[k * stride].dtype == first;
  const auto with_output = [&](auto source, auto buffered) {
    using S = decltype(source);
    constexpr bool kBuffered = decltype(buffered)::value;
    if (out.dtype == kDtypeOf<C>) {
      return merge_range_as<C, S, C, kBuffered>(out, inputs, stride, w, lo, hi, stream);
    }
    if constexpr (std::is_same_v<C, float>) {
      if (out.dtype == at::kBFloat16) {
        return merge_range_as<C, S, BFloat16Bits, kBuffered>(out, inputs, stride, w, lo, hi, stream);
      }
    }
    return merge_range_as<C, S, void, kBuffered>(out, inputs, stride, w, lo, hi, stream);
  };
  if (one_dtype && first == kDtypeOf<C>) return with_output(C{}, std::false_type{});
  if constexpr (std::is_same_v<C, float>) {
    if (one_dtype && first == at::kBFloat16) return with_output(BFloat16Bits{}, std::false_type{});
  }
  return with_output(C{}, std::true_type{});
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
