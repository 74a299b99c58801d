// any_nonfinite: *flag <- 1.0f when any element of any tensor is NaN or Inf.
#include "multi_tensor_apply.cuh"

namespace swm_fused_cuda {
namespace {

template <typename T>
struct NonfiniteOp {
  static constexpr int kDepth = 1;
  static constexpr int kVec = vec_width<T>();

  float* flag;  // float32 scalar on the device, zeroed by the caller

  struct Chunk {
    const T* x;
  };

  __device__ bool skip() const { return false; }

  __device__ Chunk chunk(const TensorTable<kDepth>& table, int t, int64_t start) const {
    return {static_cast<const T*>(table.ptrs[0][t]) + start};
  }

  __device__ bool aligned(const Chunk& c) const { return is_aligned<kVec>(c.x); }

  template <int N> __device__ void apply(const Chunk& c, int i) const {
    const Vec<T, N> x = load<N>(c.x + i);
    bool bad = false;
#pragma unroll
    for (int j = 0; j < N; ++j) bad |= is_nonfinite(x.v[j]);
    if (bad) *flag = 1.0f;  // every writer stores the same value, so the race is benign
  }
};

}  // namespace

cudaError_t launch_any_nonfinite(int64_t n, const int64_t* numels, const void* const* tensors,
                                 const int32_t* dtypes, float* flag_dev, cudaStream_t stream) {
  std::vector<int64_t> groups[4];  // [dtype] -> tensor indices
  for (int64_t i = 0; i < n; ++i) {
    if (!valid_dtype(dtypes[i])) return cudaErrorInvalidValue;
    groups[dtypes[i]].push_back(i);
  }
  auto pointer = [&](int, int64_t i) -> void* { return const_cast<void*>(tensors[i]); };
  cudaError_t err = cudaSuccess;
  for (int32_t d = 0; d < 4; ++d) {
    if (groups[d].empty() || err != cudaSuccess) continue;
    dispatch_dtype(d, [&](auto tag) {
      using Op = NonfiniteOp<typename decltype(tag)::type>;
      err = multi_tensor_apply(groups[d], numels, pointer, Op{flag_dev}, stream);
    });
  }
  return err;
}

}  // namespace swm_fused_cuda
