// lerp_: avg <- lerp(avg, src, w) over many tensors (EMA: w = 1 - decay; SWA: w = 1 / (n + 1)).
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

}  // namespace

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
