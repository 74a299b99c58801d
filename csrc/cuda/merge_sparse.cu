// ties_merge_ and dare_drop_: the element-wise steps of the sparsifying merges, one pass each. ties_merge_ elects
// a sign per element over K task vectors and sums the agreeing (trimmed) entries; dare_drop_ drops entries where
// u >= p and rescales the rest. Every operation is rounded explicitly, in the reference backend's order.
#include <cfloat>

#include "multi_tensor_apply.cuh"

namespace swm_fused_cuda {
namespace {

constexpr int32_t kElectSum = 0, kElectCount = 1, kElectNone = 2;

template <typename OutT, typename InT>
struct TiesOp {
  using C = std::conditional_t<std::is_same_v<OutT, double> || std::is_same_v<InT, double>, double, float>;
  static constexpr int kDepth = 4;  // out, base, the position's K input pointers, its K bands (or nullptr)
  static constexpr int kVec = vec_width<InT>();

  const double* weights;  // K float64 on the device
  int k;
  int32_t election;
  bool normalize;
  bool has_base;
  bool subtract_base;
  C scale;

  struct Chunk {
    OutT* out;
    const InT* base;
    const InT* const* in;  // K pointers to the inputs' first elements (not advanced to the chunk)
    const double* bands;
    int64_t start;
  };

  __device__ bool skip() const { return false; }

  __device__ Chunk chunk(const TensorTable<kDepth>& table, int t, int64_t start) const {
    return {static_cast<OutT*>(table.ptrs[0][t]) + start,
            has_base ? static_cast<const InT*>(table.ptrs[1][t]) + start : nullptr,
            static_cast<const InT* const*>(table.ptrs[2][t]), static_cast<const double*>(table.ptrs[3][t]), start};
  }

  __device__ bool aligned(const Chunk& c) const {
    bool ok = is_aligned<kVec>(c.out) && (!has_base || is_aligned<kVec>(c.base));
    for (int kk = 0; kk < k && ok; ++kk) ok = is_aligned<kVec>(c.in[kk] + c.start);
    return ok;
  }

  // x = w * d for d = x_in - b (x_in when not subtracting) inside input kk's band [lo, hi), else 0; |d| is
  // compared with the float64 bounds exactly, and hi = +inf is no upper bound.
  __device__ C term(const Chunk& c, int kk, C x_in, C b, C w) const {
    const C d = subtract_base ? sub_rn(x_in, b) : x_in;
    if (c.bands != nullptr) {
      const double m = fabs(static_cast<double>(d));
      const double lo = c.bands[2 * kk], hi = c.bands[2 * kk + 1];
      if (!(m >= lo && (m < hi || hi > DBL_MAX))) return C(0);
    }
    return mul_rn(w, d);
  }

  // f(j, x, w) for the terms x of elements i .. i+N-1 of input kk, whose weight is w.
  template <int N, typename F> __device__ void for_each_term(const Chunk& c, int kk, const C* b, int i, F&& f) const {
    const C w = static_cast<C>(weights[kk]);
    const Vec<InT, N> v = load<N>(c.in[kk] + c.start + i);
#pragma unroll
    for (int j = 0; j < N; ++j) f(j, term(c, kk, convert_in<C>(v.v[j]), b[j], w), w);
  }

  // Two sweeps over the K inputs: the election, then the masked sums, which read the inputs again (from
  // cache: the same thread just loaded them), so K is not limited by registers. Every load of an element
  // happens before its store, so `out` may be the base or one of the inputs.
  template <int N> __device__ void apply(const Chunk& c, int i) const {
    C b[N], votes[N], m[N], d[N];
    if (has_base) {
      const Vec<InT, N> bv = load<N>(c.base + i);
#pragma unroll
      for (int j = 0; j < N; ++j) b[j] = convert_in<C>(bv.v[j]);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (!has_base) b[j] = C(0);
      votes[j] = m[j] = d[j] = C(0);
    }
    for (int kk = 0; election != kElectNone && kk < k; ++kk) {
      for_each_term<N>(c, kk, b, i, [&](int j, C x, C) {
        votes[j] = add_rn(votes[j], election == kElectCount ? C(int(x > C(0)) - int(x < C(0))) : x);
      });
    }
    for (int kk = 0; kk < k; ++kk) {
      for_each_term<N>(c, kk, b, i, [&](int j, C x, C w) {
        const bool kept = election == kElectNone || (votes[j] >= C(0) ? x > C(0) : x < C(0));
        m[j] = add_rn(m[j], kept ? x : C(0));
        d[j] = add_rn(d[j], kept ? w : C(0));
      });
    }
    Vec<OutT, N> r;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const C mixed = normalize ? div_rn(m[j], d[j] == C(0) ? C(1) : d[j]) : m[j];
      const C o = has_base ? add_rn(b[j], mul_rn(scale, mixed)) : mul_rn(scale, mixed);
      r.v[j] = convert_out<OutT>(static_cast<compute_t<OutT>>(o));  // float64 into 16 bits: through float32
    }
    store<N>(c.out + i, r);
  }
};

// DT: the deltas' dtype; UT, PT: float or double (u, and the per-element keep probabilities).
template <typename DT, typename UT, typename PT>
struct DareOp {
  static constexpr int kDepth = 3;  // delta, u, keep_prob (nullptr for one number)
  static constexpr int kVec = vec_width<DT, UT, PT>();

  double p;
  bool per_element;
  bool rescale;

  struct Chunk {
    DT* delta;
    const UT* u;
    const PT* p;
  };

  __device__ bool skip() const { return false; }

  __device__ Chunk chunk(const TensorTable<kDepth>& table, int t, int64_t start) const {
    return {static_cast<DT*>(table.ptrs[0][t]) + start, static_cast<const UT*>(table.ptrs[1][t]) + start,
            per_element ? static_cast<const PT*>(table.ptrs[2][t]) + start : nullptr};
  }

  __device__ bool aligned(const Chunk& c) const {
    return is_aligned<kVec>(c.delta) && is_aligned<kVec>(c.u) && (!per_element || is_aligned<kVec>(c.p));
  }

  template <int N> __device__ void apply(const Chunk& c, int i) const {
    const Vec<DT, N> dv = load<N>(c.delta + i);
    const Vec<UT, N> uv = load<N>(c.u + i);
    Vec<PT, N> pv;
    if (per_element) pv = load<N>(c.p + i);
    Vec<DT, N> r;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const double pj = per_element ? static_cast<double>(pv.v[j]) : p;
      const double dj = static_cast<double>(widen(dv.v[j]));
      const double o = static_cast<double>(uv.v[j]) < pj ? (rescale ? div_rn(dj, pj) : dj) : 0.0;
      r.v[j] = convert_out<DT>(static_cast<compute_t<DT>>(o));
    }
    store<N>(c.delta + i, r);
  }
};

// f(Tag<float>) or f(Tag<double>) for a float32/float64 code; false for any other.
template <typename F> bool dispatch_wide(int32_t code, F&& f) {
  if (code == kFloat32) {
    f(Tag<float>{});
    return true;
  }
  if (code == kFloat64) {
    f(Tag<double>{});
    return true;
  }
  return false;
}

}  // namespace

cudaError_t launch_ties_merge(int64_t n, const int64_t* numels, void* const* outs, const int32_t* out_dtypes,
                              const void* const* bases, const void* const* in_rows, const int32_t* in_dtypes,
                              const void* const* bands, int32_t k_inputs, const double* weights_dev,
                              int32_t election, bool normalize, double scale, bool has_base, bool subtract_base,
                              cudaStream_t stream) {
  if (k_inputs < 1 || election < kElectSum || election > kElectNone) return cudaErrorInvalidValue;
  std::vector<int64_t> groups[4][4];  // [out dtype][input dtype] -> tensor indices
  for (int64_t i = 0; i < n; ++i) {
    if (!valid_dtype(out_dtypes[i]) || !valid_dtype(in_dtypes[i])) return cudaErrorInvalidValue;
    groups[out_dtypes[i]][in_dtypes[i]].push_back(i);
  }
  auto pointer = [&](int d, int64_t i) -> void* {
    const void* p = d == 0 ? outs[i] : d == 1 ? bases[i] : d == 2 ? in_rows[i] : bands[i];
    return const_cast<void*>(p);
  };
  return for_each_dtype_pair(groups, [&](auto out_tag, auto in_tag, const std::vector<int64_t>& members) {
    using Op = TiesOp<typename decltype(out_tag)::type, typename decltype(in_tag)::type>;
    const Op op{weights_dev, k_inputs, election, normalize, has_base, subtract_base,
                static_cast<typename Op::C>(scale)};  // rounded once to the compute type, as torch does
    return multi_tensor_apply(members, numels, pointer, op, stream);
  });
}

cudaError_t launch_dare_drop(int64_t n, const int64_t* numels, void* const* deltas, const int32_t* delta_dtypes,
                             const void* const* us, const int32_t* u_dtypes, const void* const* keep_probs,
                             const int32_t* prob_dtypes, double p, bool rescale, cudaStream_t stream) {
  std::vector<int64_t> groups[4][2][2];  // [delta dtype][u: float, double][keep_prob: float, double]
  for (int64_t i = 0; i < n; ++i) {
    const int32_t prob = keep_probs != nullptr ? prob_dtypes[i] : kFloat32;
    if (!valid_dtype(delta_dtypes[i]) || u_dtypes[i] < kFloat32 || u_dtypes[i] > kFloat64 || prob < kFloat32 ||
        prob > kFloat64) {
      return cudaErrorInvalidValue;
    }
    groups[delta_dtypes[i]][u_dtypes[i]][prob].push_back(i);
  }
  auto pointer = [&](int d, int64_t i) -> void* {
    const void* ptr = d == 0 ? deltas[i] : d == 1 ? us[i] : (keep_probs != nullptr ? keep_probs[i] : nullptr);
    return const_cast<void*>(ptr);
  };
  cudaError_t err = cudaSuccess;
  for (int32_t dt = 0; dt < 4; ++dt) {
    for (int32_t ut = 0; ut < 2; ++ut) {
      for (int32_t pt = 0; pt < 2; ++pt) {
        if (groups[dt][ut][pt].empty() || err != cudaSuccess) continue;
        dispatch_dtype(dt, [&](auto delta_tag) {
          dispatch_wide(ut, [&](auto u_tag) {
            dispatch_wide(pt, [&](auto p_tag) {
              using Op = DareOp<typename decltype(delta_tag)::type, typename decltype(u_tag)::type,
                                typename decltype(p_tag)::type>;
              err = multi_tensor_apply(groups[dt][ut][pt], numels, pointer, Op{p, keep_probs != nullptr, rescale},
                                       stream);
            });
          });
        });
      }
    }
  }
  return err;
}

}  // namespace swm_fused_cuda
