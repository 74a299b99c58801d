// sam_ascent_: SAM's ascent in one pass: saved <- w; w <- w + ((w*w if adaptive) * g) * scale.
#include "multi_tensor_apply.cuh"

namespace swm_fused_cuda {
namespace {

// In the params' compute type, each product and the sum rounded separately (davda54/sam's order).
template <typename ParamT, typename GradT, typename SavedT>
struct SamAscentOp {
  using C = compute_t<ParamT>;
  static constexpr int kDepth = 3;  // params, grads, saved
  static constexpr int kVec = vec_width<ParamT, GradT, SavedT>();

  const double* scale_dev;  // float64 scalar on the device
  const float* found_inf;   // float32 scalar on the device, or nullptr
  bool adaptive;

  struct Chunk {
    ParamT* w;
    const GradT* g;
    SavedT* saved;
    C scale;
    bool perturb;
  };

  __device__ bool skip() const { return false; }  // a flagged step still writes saved

  __device__ Chunk chunk(const TensorTable<kDepth>& table, int t, int64_t start) const {
    return {static_cast<ParamT*>(table.ptrs[0][t]) + start, static_cast<const GradT*>(table.ptrs[1][t]) + start,
            static_cast<SavedT*>(table.ptrs[2][t]) + start, static_cast<C>(*scale_dev),
            found_inf == nullptr || *found_inf == 0.0f};
  }

  __device__ bool aligned(const Chunk& c) const {
    return is_aligned<kVec>(c.w) && is_aligned<kVec>(c.g) && is_aligned<kVec>(c.saved);
  }

  template <int N> __device__ void apply(const Chunk& c, int i) const {
    const Vec<ParamT, N> w = load<N>(c.w + i);
    Vec<SavedT, N> saved;
#pragma unroll
    for (int j = 0; j < N; ++j) saved.v[j] = convert_out<SavedT>(convert_in<compute_t<SavedT>>(w.v[j]));
    store<N>(c.saved + i, saved);
    if (!c.perturb) return;
    const Vec<GradT, N> g = load<N>(c.g + i);
    Vec<ParamT, N> r;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const C x = convert_in<C>(w.v[j]);
      const C gx = convert_in<C>(g.v[j]);
      const C e = adaptive ? mul_rn(mul_rn(mul_rn(x, x), gx), c.scale) : mul_rn(gx, c.scale);
      r.v[j] = convert_out<ParamT>(add_rn(x, e));
    }
    store<N>(c.w + i, r);
  }
};

}  // namespace

cudaError_t launch_sam_ascent(int64_t n, const int64_t* numels, void* const* params, const int32_t* param_dtypes,
                              const void* const* grads, const int32_t* grad_dtypes, void* const* saved,
                              const int32_t* saved_dtypes, const double* scale_dev, bool adaptive,
                              const float* found_inf_dev, cudaStream_t stream) {
  std::vector<int64_t> groups[4][4][4];  // [param dtype][grad dtype][saved dtype] -> tensor indices
  for (int64_t i = 0; i < n; ++i) {
    if (!valid_dtype(param_dtypes[i]) || !valid_dtype(grad_dtypes[i]) || !valid_dtype(saved_dtypes[i])) {
      return cudaErrorInvalidValue;
    }
    groups[param_dtypes[i]][grad_dtypes[i]][saved_dtypes[i]].push_back(i);
  }
  auto pointer = [&](int d, int64_t i) -> void* {
    return d == 0 ? params[i] : d == 1 ? const_cast<void*>(grads[i]) : saved[i];
  };
  cudaError_t err = cudaSuccess;
  for (int32_t p = 0; p < 4; ++p) {
    for (int32_t g = 0; g < 4; ++g) {
      for (int32_t s = 0; s < 4; ++s) {
        if (groups[p][g][s].empty() || err != cudaSuccess) continue;
        dispatch_dtype(p, [&](auto param_tag) {
          dispatch_dtype(g, [&](auto grad_tag) {
            dispatch_dtype(s, [&](auto saved_tag) {
              using Op = SamAscentOp<typename decltype(param_tag)::type, typename decltype(grad_tag)::type,
                                     typename decltype(saved_tag)::type>;
              err = multi_tensor_apply(groups[p][g][s], numels, pointer, Op{scale_dev, found_inf_dev, adaptive},
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
