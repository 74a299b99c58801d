// merge_: out <- [acc +] sum_k w_k * x_k over many tensors, accumulated in order k = 0..K-1 in the
// compute type (mul then add, each rounded, exactly like the reference), one rounding at the store.
#include "multi_tensor_apply.cuh"

namespace swm_fused_cuda {
namespace {

// Up to kMaxK inputs (k of them used). The table row per tensor is: out, accumulator (nullptr when
// the launch has none), then the inputs. All loads of an element happen before its store, so `out`
// may be the same memory as the accumulator or as any input.
template <typename OutT, typename InT, int kMaxK>
struct MergeOp {
  using C = compute_t<OutT>;
  static constexpr int kDepth = 2 + kMaxK;
  // 16-byte loads of every input (they are most of the traffic); out and acc move kVec elements in
  // as many 16-byte accesses as needed. Sizing by the narrowest operand instead would hold K vectors
  // of up to 64 bytes in registers and spill.
  static constexpr int kVec = vec_width<InT>();

  int k;         // inputs used, 1..kMaxK
  bool has_acc;  // start from the accumulator instead of weights[0] * x_0
  C weights[kMaxK];

  struct Chunk {
    OutT* out;
    const C* acc;
    const InT* in[kMaxK];
  };

  __device__ bool skip() const { return false; }

  __device__ Chunk chunk(const TensorTable<kDepth>& table, int t, int64_t start) const {
    Chunk c;
    c.out = static_cast<OutT*>(table.ptrs[0][t]) + start;
    c.acc = has_acc ? static_cast<const C*>(table.ptrs[1][t]) + start : nullptr;
#pragma unroll
    for (int kk = 0; kk < kMaxK; ++kk) c.in[kk] = kk < k ? static_cast<const InT*>(table.ptrs[2 + kk][t]) + start : nullptr;
    return c;
  }

  __device__ bool aligned(const Chunk& c) const {
    bool ok = is_aligned<kVec>(c.out) && (!has_acc || is_aligned<kVec>(c.acc));
#pragma unroll
    for (int kk = 0; kk < kMaxK; ++kk) ok = ok && (kk >= k || is_aligned<kVec>(c.in[kk]));
    return ok;
  }

  template <int N> __device__ void apply(const Chunk& c, int i) const {
    Vec<InT, N> x[kMaxK];
#pragma unroll
    for (int kk = 0; kk < kMaxK; ++kk) {
      if (kk < k) x[kk] = load<N>(c.in[kk] + i);
    }
    C acc[N];
    if (has_acc) {
      const Vec<C, N> a = load<N>(c.acc + i);
#pragma unroll
      for (int j = 0; j < N; ++j) acc[j] = a.v[j];
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) acc[j] = mul_rn(weights[0], convert_in<C>(x[0].v[j]));
    }
#pragma unroll
    for (int kk = 0; kk < kMaxK; ++kk) {
      if (kk < k && (has_acc || kk > 0)) {
#pragma unroll
        for (int j = 0; j < N; ++j) acc[j] = add_rn(acc[j], mul_rn(weights[kk], convert_in<C>(x[kk].v[j])));
      }
    }
    Vec<OutT, N> r;
#pragma unroll
    for (int j = 0; j < N; ++j) r.v[j] = convert_out<OutT>(acc[j]);
    store<N>(c.out + i, r);
  }
};

template <typename OutT, typename InT, int kMaxK, typename PointerFn>
cudaError_t run_merge(const std::vector<int64_t>& members, const int64_t* numels, PointerFn pointer, bool has_acc,
                      int32_t k, const double* weights, cudaStream_t stream) {
  MergeOp<OutT, InT, kMaxK> op{};
  op.k = k;
  op.has_acc = has_acc;
  // Like torch's scalar multiply: each weight is rounded once to the compute type.
  for (int kk = 0; kk < k; ++kk) op.weights[kk] = static_cast<compute_t<OutT>>(weights[kk]);
  return multi_tensor_apply(members, numels, pointer, op, stream);
}

}  // namespace

cudaError_t launch_merge(int64_t n, const int64_t* numels, void* const* outs, const int32_t* out_dtypes,
                         const void* const* accs, int32_t k_inputs, const void* const* inputs,
                         const int32_t* in_dtypes, const double* weights, cudaStream_t stream) {
  if (k_inputs < 1 || k_inputs > kMaxMergeInputs) return cudaErrorInvalidValue;
  std::vector<int64_t> groups[4][4];  // [out dtype][input dtype] -> tensor indices
  for (int64_t i = 0; i < n; ++i) {
    if (!valid_dtype(out_dtypes[i]) || !valid_dtype(in_dtypes[i])) return cudaErrorInvalidValue;
    groups[out_dtypes[i]][in_dtypes[i]].push_back(i);
  }
  auto pointer = [&](int d, int64_t i) -> void* {
    if (d == 0) return outs[i];
    if (d == 1) return accs != nullptr ? const_cast<void*>(accs[i]) : nullptr;
    const int64_t kk = d - 2;
    return kk < k_inputs ? const_cast<void*>(inputs[kk * n + i]) : nullptr;
  };
  const bool has_acc = accs != nullptr;
  return for_each_dtype_pair(groups, [&](auto out_tag, auto in_tag, const std::vector<int64_t>& members) {
    using OutT = typename decltype(out_tag)::type;
    using InT = typename decltype(in_tag)::type;
    // Table depth follows K, so small merges pack more tensors per launch.
    if (k_inputs <= 2) return run_merge<OutT, InT, 2>(members, numels, pointer, has_acc, k_inputs, weights, stream);
    if (k_inputs <= 4) return run_merge<OutT, InT, 4>(members, numels, pointer, has_acc, k_inputs, weights, stream);
    return run_merge<OutT, InT, kMaxMergeInputs>(members, numels, pointer, has_acc, k_inputs, weights, stream);
  });
}

}  // namespace swm_fused_cuda
