// lerp_: avg <- lerp(avg, src, w) over many tensors (EMA: w = 1 - decay; SWA: w = 1 / (n + 1)).
// lerp_multi_: the same for K averages of one source, which is read once (post-hoc EMA profiles).
#include "multi_tensor_apply.cuh"

namespace swm_fused_cuda {
namespace {

template <typename AvgT, typename SrcT>
struct LerpOp {
  using C = compute_t<AvgT>;
  static constexpr int kDepth = 2;  // avg, src
  static constexpr int kVec = vec_width<AvgT, SrcT>();

  double weight;
  const double* weight_dev;  // float64 scalar on the device, or nullptr: then `weight` is used
  const float* found_inf;    // float32 scalar on the device, or nullptr

  struct Chunk {
    AvgT* avg;
    const SrcT* src;
    C w;
  };

  __device__ bool skip() const { return found_inf != nullptr && *found_inf != 0.0f; }

  __device__ Chunk chunk(const TensorTable<kDepth>& table, int t, int64_t start) const {
    // Like torch: the weight is rounded once to the compute type.
    const C w = static_cast<C>(weight_dev != nullptr ? *weight_dev : weight);
    return {static_cast<AvgT*>(table.ptrs[0][t]) + start, static_cast<const SrcT*>(table.ptrs[1][t]) + start, w};
  }

  __device__ bool aligned(const Chunk& c) const { return is_aligned<kVec>(c.avg) && is_aligned<kVec>(c.src); }

  template <int N> __device__ void apply(const Chunk& c, int i) const {
    const Vec<AvgT, N> a = load<N>(c.avg + i);
    const Vec<SrcT, N> s = load<N>(c.src + i);
    Vec<AvgT, N> r;
#pragma unroll
    for (int j = 0; j < N; ++j) r.v[j] = convert_out<AvgT>(lerp(convert_in<C>(a.v[j]), convert_in<C>(s.v[j]), c.w));
    store<N>(c.avg + i, r);
  }
};

// K averages of one dtype and one source: avg_k <- lerp(avg_k, src, w_k).
template <typename AvgT, typename SrcT, int K>
struct LerpMultiOp {
  using C = compute_t<AvgT>;
  static constexpr int kDepth = K + 1;  // avg_0 .. avg_{K-1}, src
  static constexpr int kVec = vec_width<AvgT, SrcT>();

  double weights[K];
  const float* found_inf;  // float32 scalar on the device, or nullptr

  struct Chunk {
    AvgT* avg[K];
    const SrcT* src;
    C w[K];
  };

  __device__ bool skip() const { return found_inf != nullptr && *found_inf != 0.0f; }

  __device__ Chunk chunk(const TensorTable<kDepth>& table, int t, int64_t start) const {
    Chunk c;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      c.avg[k] = static_cast<AvgT*>(table.ptrs[k][t]) + start;
      c.w[k] = static_cast<C>(weights[k]);  // rounded once to the compute type, as lerp_ does
    }
    c.src = static_cast<const SrcT*>(table.ptrs[K][t]) + start;
    return c;
  }

  __device__ bool aligned(const Chunk& c) const {
    bool ok = is_aligned<kVec>(c.src);
#pragma unroll
    for (int k = 0; k < K; ++k) ok = ok && is_aligned<kVec>(c.avg[k]);
    return ok;
  }

  template <int N> __device__ void apply(const Chunk& c, int i) const {
    const Vec<SrcT, N> s = load<N>(c.src + i);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const Vec<AvgT, N> a = load<N>(c.avg[k] + i);
      Vec<AvgT, N> r;
#pragma unroll
      for (int j = 0; j < N; ++j) r.v[j] = convert_out<AvgT>(lerp(convert_in<C>(a.v[j]), convert_in<C>(s.v[j]), c.w[k]));
      store<N>(c.avg[k] + i, r);
    }
  }
};

template <int K, typename AvgT, typename SrcT>
cudaError_t run_lerp_multi(const std::vector<int64_t>& members, const int64_t* numels, int64_t n,
                           void* const* avgs, const void* const* srcs, const double* weights,
                           const float* found_inf_dev, cudaStream_t stream) {
  LerpMultiOp<AvgT, SrcT, K> op{};
  for (int k = 0; k < K; ++k) op.weights[k] = weights[k];
  op.found_inf = found_inf_dev;
  auto pointer = [&](int d, int64_t i) -> void* { return d < K ? avgs[d * n + i] : const_cast<void*>(srcs[i]); };
  return multi_tensor_apply(members, numels, pointer, op, stream);
}

}  // namespace

cudaError_t launch_lerp_multi(int64_t n, const int64_t* numels, int32_t k_profiles, void* const* avgs,
                              const int32_t* avg_dtypes, const void* const* srcs, const int32_t* src_dtypes,
                              const double* weights, const float* found_inf_dev, cudaStream_t stream) {
  if (k_profiles < 1 || k_profiles > kMaxLerpProfiles) return cudaErrorInvalidValue;
  std::vector<int64_t> groups[4][4];  // [avg dtype][src dtype] -> tensor indices
  for (int64_t i = 0; i < n; ++i) {
    if (!valid_dtype(avg_dtypes[i]) || !valid_dtype(src_dtypes[i])) return cudaErrorInvalidValue;
    groups[avg_dtypes[i]][src_dtypes[i]].push_back(i);
  }
  cudaError_t err = cudaSuccess;
  for (int32_t a = 0; a < 4; ++a) {
    for (int32_t s = 0; s < 4; ++s) {
      if (groups[a][s].empty() || err != cudaSuccess) continue;
      dispatch_dtype(a, [&](auto avg_tag) {
        dispatch_dtype(s, [&](auto src_tag) {
          using AvgT = typename decltype(avg_tag)::type;
          using SrcT = typename decltype(src_tag)::type;
          const auto& m = groups[a][s];
          switch (k_profiles) {
            case 1: err = run_lerp_multi<1, AvgT, SrcT>(m, numels, n, avgs, srcs, weights, found_inf_dev, stream); break;
            case 2: err = run_lerp_multi<2, AvgT, SrcT>(m, numels, n, avgs, srcs, weights, found_inf_dev, stream); break;
            case 3: err = run_lerp_multi<3, AvgT, SrcT>(m, numels, n, avgs, srcs, weights, found_inf_dev, stream); break;
            default: err = run_lerp_multi<4, AvgT, SrcT>(m, numels, n, avgs, srcs, weights, found_inf_dev, stream);
          }
        });
      });
    }
  }
  return err;
}

cudaError_t launch_lerp(int64_t n, const int64_t* numels, void* const* avgs, const int32_t* avg_dtypes,
                        const void* const* srcs, const int32_t* src_dtypes, double weight,
                        const double* weight_dev, const float* found_inf_dev, cudaStream_t stream) {
  std::vector<int64_t> groups[4][4];  // [avg dtype][src dtype] -> tensor indices
  for (int64_t i = 0; i < n; ++i) {
    if (!valid_dtype(avg_dtypes[i]) || !valid_dtype(src_dtypes[i])) return cudaErrorInvalidValue;
    groups[avg_dtypes[i]][src_dtypes[i]].push_back(i);
  }
  auto pointer = [&](int d, int64_t i) -> void* { return d == 0 ? avgs[i] : const_cast<void*>(srcs[i]); };
  cudaError_t err = cudaSuccess;
  for (int32_t a = 0; a < 4; ++a) {
    for (int32_t s = 0; s < 4; ++s) {
      if (groups[a][s].empty() || err != cudaSuccess) continue;
      dispatch_dtype(a, [&](auto avg_tag) {
        dispatch_dtype(s, [&](auto src_tag) {
          using Op = LerpOp<typename decltype(avg_tag)::type, typename decltype(src_tag)::type>;
          err = multi_tensor_apply(groups[a][s], numels, pointer, Op{weight, weight_dev, found_inf_dev}, stream);
        });
      });
    }
  }
  return err;
}

}  // namespace swm_fused_cuda
