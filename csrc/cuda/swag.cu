// swag_: both SWAG moments in one pass: mean <- lerp(mean, src, w); sq_mean <- lerp(sq_mean, src * src, w).
#include "multi_tensor_apply.cuh"

namespace swm_fused_cuda {
namespace {

// Each moment is computed in its own compute type (float64 for a float64 moment, else float32),
// with src converted to it and src * src rounded there before the lerp, as the reference does.
template <typename MeanT, typename SqT, typename SrcT>
struct SwagOp {
  using CM = compute_t<MeanT>;
  using CS = compute_t<SqT>;
  static constexpr int kDepth = 3;  // mean, sq_mean, src
  static constexpr int kVec = vec_width<MeanT, SqT, SrcT>();

  double weight;
  const double* weight_dev;  // float64 scalar on the device, or nullptr: then `weight` is used
  const float* found_inf;    // float32 scalar on the device, or nullptr

  struct Chunk {
    MeanT* mean;
    SqT* sq;
    const SrcT* src;
    CM w_mean;
    CS w_sq;
  };

  __device__ bool skip() const { return found_inf != nullptr && *found_inf != 0.0f; }

  __device__ Chunk chunk(const TensorTable<kDepth>& table, int t, int64_t start) const {
    const double w = weight_dev != nullptr ? *weight_dev : weight;
    return {static_cast<MeanT*>(table.ptrs[0][t]) + start, static_cast<SqT*>(table.ptrs[1][t]) + start,
            static_cast<const SrcT*>(table.ptrs[2][t]) + start, static_cast<CM>(w), static_cast<CS>(w)};
  }

  __device__ bool aligned(const Chunk& c) const {
    return is_aligned<kVec>(c.mean) && is_aligned<kVec>(c.sq) && is_aligned<kVec>(c.src);
  }

  template <int N> __device__ void apply(const Chunk& c, int i) const {
    const Vec<MeanT, N> m = load<N>(c.mean + i);
    const Vec<SqT, N> q = load<N>(c.sq + i);
    const Vec<SrcT, N> s = load<N>(c.src + i);
    Vec<MeanT, N> new_m;
    Vec<SqT, N> new_q;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const CM s_m = convert_in<CM>(s.v[j]);
      const CS s_q = convert_in<CS>(s.v[j]);
      new_m.v[j] = convert_out<MeanT>(lerp(convert_in<CM>(m.v[j]), s_m, c.w_mean));
      new_q.v[j] = convert_out<SqT>(lerp(convert_in<CS>(q.v[j]), mul_rn(s_q, s_q), c.w_sq));
    }
    store<N>(c.mean + i, new_m);
    store<N>(c.sq + i, new_q);
  }
};

}  // namespace

cudaError_t launch_swag(int64_t n, const int64_t* numels, void* const* means, const int32_t* mean_dtypes,
                        void* const* sq_means, const int32_t* sq_mean_dtypes, const void* const* srcs,
                        const int32_t* src_dtypes, double weight, const double* weight_dev,
                        const float* found_inf_dev, cudaStream_t stream) {
  std::vector<int64_t> groups[4][4][4];  // [mean dtype][sq_mean dtype][src dtype] -> tensor indices
  for (int64_t i = 0; i < n; ++i) {
    if (!valid_dtype(mean_dtypes[i]) || !valid_dtype(sq_mean_dtypes[i]) || !valid_dtype(src_dtypes[i])) {
      return cudaErrorInvalidValue;
    }
    groups[mean_dtypes[i]][sq_mean_dtypes[i]][src_dtypes[i]].push_back(i);
  }
  auto pointer = [&](int d, int64_t i) -> void* {
    return d == 0 ? means[i] : d == 1 ? sq_means[i] : const_cast<void*>(srcs[i]);
  };
  cudaError_t err = cudaSuccess;
  for (int32_t m = 0; m < 4; ++m) {
    for (int32_t q = 0; q < 4; ++q) {
      for (int32_t s = 0; s < 4; ++s) {
        if (groups[m][q][s].empty() || err != cudaSuccess) continue;
        dispatch_dtype(m, [&](auto mean_tag) {
          dispatch_dtype(q, [&](auto sq_tag) {
            dispatch_dtype(s, [&](auto src_tag) {
              using Op = SwagOp<typename decltype(mean_tag)::type, typename decltype(sq_tag)::type,
                                typename decltype(src_tag)::type>;
              err = multi_tensor_apply(groups[m][q][s], numels, pointer, Op{weight, weight_dev, found_inf_dev},
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
