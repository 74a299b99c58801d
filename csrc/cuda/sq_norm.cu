// sq_norm: the squared L2 norm of a list of tensors, sum_i sum((scale_i * t_i)^2), as float64 partial sums,
// one per chunk; bindings.cpp adds them up on the device. Deterministic: every chunk's sum runs in a fixed order.
#include "multi_tensor_apply.cuh"

namespace swm_fused_cuda {
namespace {

template <typename T, typename S, bool kScaled>
struct SqNormOp {
  using C = compute_t<T>;
  using Acc = double;
  static constexpr int kDepth = kScaled ? 3 : 2;  // tensor, (scale,) partial slot of the tensor's first chunk
  static constexpr int kVec = kScaled ? vec_width<T, S>() : vec_width<T>();

  struct Chunk {
    const T* x;
    const S* s;
    double* partial;
  };

  __device__ Chunk chunk(const TensorTable<kDepth>& table, int t, int64_t start) const {
    const S* s = kScaled ? static_cast<const S*>(table.ptrs[1][t]) + start : nullptr;
    return {static_cast<const T*>(table.ptrs[0][t]) + start, s,
            static_cast<double*>(table.ptrs[kDepth - 1][t]) + start / kChunkSize};
  }

  __device__ bool aligned(const Chunk& c) const {
    return is_aligned<kVec>(c.x) && (!kScaled || is_aligned<kVec>(c.s));
  }

  template <int N> __device__ double apply(const Chunk& c, int i) const {
    const Vec<T, N> x = load<N>(c.x + i);
    double sum = 0.0;
    if constexpr (kScaled) {
      const Vec<S, N> s = load<N>(c.s + i);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C v = mul_rn(convert_in<C>(s.v[j]), convert_in<C>(x.v[j]));
        sum = add_rn(sum, static_cast<double>(mul_rn(v, v)));
      }
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C v = convert_in<C>(x.v[j]);
        sum = add_rn(sum, static_cast<double>(mul_rn(v, v)));
      }
    }
    return sum;
  }

  __device__ void finish(const Chunk& c, double total) const { *c.partial = total; }
};

}  // namespace

int64_t sq_norm_partials(int64_t n, const int64_t* numels) {
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) chunks += (numels[i] + kChunkSize - 1) / kChunkSize;
  return chunks;
}

cudaError_t launch_sq_norm(int64_t n, const int64_t* numels, const void* const* tensors, const int32_t* dtypes,
                           const void* const* scales, const int32_t* scale_dtypes, double* partials,
                           cudaStream_t stream) {
  const bool scaled = scales != nullptr;
  std::vector<int64_t> groups[4][4];  // [tensor dtype][scale dtype, 0 without scale] -> tensor indices
  std::vector<int64_t> first_chunk(n);
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!valid_dtype(dtypes[i]) || (scaled && !valid_dtype(scale_dtypes[i]))) return cudaErrorInvalidValue;
    groups[dtypes[i]][scaled ? scale_dtypes[i] : 0].push_back(i);
    first_chunk[i] = chunks;
    chunks += (numels[i] + kChunkSize - 1) / kChunkSize;
  }
  auto pointer = [&](int d, int64_t i) -> void* {
    if (d == 0) return const_cast<void*>(tensors[i]);
    if (scaled && d == 1) return const_cast<void*>(scales[i]);
    return partials + first_chunk[i];
  };
  cudaError_t err = cudaSuccess;
  for (int32_t x = 0; x < 4; ++x) {
    for (int32_t s = 0; s < 4; ++s) {
      if (groups[x][s].empty() || err != cudaSuccess) continue;
      dispatch_dtype(x, [&](auto x_tag) {
        using T = typename decltype(x_tag)::type;
        if (!scaled) {
          err = multi_tensor_apply(groups[x][s], numels, pointer, SqNormOp<T, T, false>{}, stream);
          return;
        }
        dispatch_dtype(s, [&](auto s_tag) {
          err = multi_tensor_apply(groups[x][s], numels, pointer, SqNormOp<T, typename decltype(s_tag)::type, true>{},
                                   stream);
        });
      });
    }
  }
  return err;
}

}  // namespace swm_fused_cuda
