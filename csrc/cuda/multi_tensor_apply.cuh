// Multi-tensor-apply for swm_fused's CUDA backend (apex/torch-foreach style), plus the plain-argument
// launchers that csrc/cuda/bindings.cpp calls.
//
// The first part (launcher declarations) is plain C++ so that bindings.cpp, built by the host compiler,
// can include this header. Everything under __CUDACC__ is device code used by the .cu files only.
// Only CUDA headers are included here, never torch, so `nvcc -c` compiles the .cu files without CUDA torch.
//
// How a launch is laid out:
//   * Tensors are grouped by their dtype combination on the host; each group runs one kernel
//     instantiation, in as few launches as the kernel-argument table allows.
//   * A TensorTable (passed by value as the kernel argument, under 4 KB) holds up to kMaxTensors
//     tensors: one base pointer per operand, the element count, and the index of its first block.
//   * Each block handles one chunk of kChunkSize elements of one tensor; it finds its tensor by a
//     binary search over first_block (block-uniform, served by the constant cache).
//   * Inside a chunk: 16-byte vector loads/stores when every operand's chunk pointer is aligned,
//     then a scalar tail; fully scalar otherwise.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace swm_fused_cuda {

// dtype codes shared with bindings.cpp.
enum DTypeCode : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Most inputs one merge launch reads; bindings.cpp chains launches through an accumulator for more.
constexpr int kMaxMergeInputs = 8;

// Most averages one lerp_multi launch updates; bindings.cpp runs more in groups of this many.
constexpr int kMaxLerpProfiles = 4;

// Every launcher takes per-tensor arrays of length n (numels, pointers, dtype codes), enqueues its
// kernels on `stream`, and returns the first launch error (cudaSuccess when all launches went out),
// or cudaErrorInvalidValue for an unknown dtype code or an out-of-range argument. Tensors must be
// contiguous; tensors with numel 0 are skipped. weight_dev (a float64 scalar) and found_inf_dev
// (a float32 scalar) are device pointers read inside the kernel, or nullptr when absent.

// avg[i] <- lerp(avg[i], src[i], w), with w = *weight_dev if given, else weight. Nothing is written
// when *found_inf_dev != 0.
cudaError_t launch_lerp(int64_t n, const int64_t* numels, void* const* avgs, const int32_t* avg_dtypes,
                        const void* const* srcs, const int32_t* src_dtypes, double weight,
                        const double* weight_dev, const float* found_inf_dev, cudaStream_t stream);

// avgs[k * n + i] <- lerp(avgs[k * n + i], src[i], weights[k]) for k < k_profiles, reading src[i] once.
// All k_profiles averages of position i have dtype avg_dtypes[i]. 1 <= k_profiles <= kMaxLerpProfiles;
// weights is a host array. Nothing is written when *found_inf_dev != 0.
cudaError_t launch_lerp_multi(int64_t n, const int64_t* numels, int32_t k_profiles, void* const* avgs,
                              const int32_t* avg_dtypes, const void* const* srcs, const int32_t* src_dtypes,
                              const double* weights, const float* found_inf_dev, cudaStream_t stream);

// mean[i] <- lerp(mean[i], src[i], w); sq_mean[i] <- lerp(sq_mean[i], src[i]^2, w); one pass.
cudaError_t launch_swag(int64_t n, const int64_t* numels, void* const* means, const int32_t* mean_dtypes,
                        void* const* sq_means, const int32_t* sq_mean_dtypes, const void* const* srcs,
                        const int32_t* src_dtypes, double weight, const double* weight_dev,
                        const float* found_inf_dev, cudaStream_t stream);

// out[i] <- acc[i] + sum_k weights[k] * inputs[k * n + i]   (acc term only when accs != nullptr),
// accumulated in order k = 0..k_inputs-1 in the compute type of out_dtypes[i], one rounding at the
// store. Without accs the sum starts as weights[0] * inputs[i]. accs[i] holds values of that compute
// type (float64 for float64 outputs, else float32) and may be the same memory as outs[i]; outs[i]
// may also be one of the inputs. All inputs of position i have dtype in_dtypes[i].
// 1 <= k_inputs <= kMaxMergeInputs.
cudaError_t launch_merge(int64_t n, const int64_t* numels, void* const* outs, const int32_t* out_dtypes,
                         const void* const* accs, int32_t k_inputs, const void* const* inputs,
                         const int32_t* in_dtypes, const double* weights, cudaStream_t stream);

// *flag_dev <- 1.0f if any element of any tensor is NaN or Inf (plain stores; *flag_dev is not cleared).
cudaError_t launch_any_nonfinite(int64_t n, const int64_t* numels, const void* const* tensors,
                                 const int32_t* dtypes, float* flag_dev, cudaStream_t stream);

// Slots of the float64 workspace launch_sq_norm writes: one per kChunkSize-element chunk of every
// non-empty tensor (the caller sums them).
int64_t sq_norm_partials(int64_t n, const int64_t* numels);

// partials[c] <- sum over chunk c of (scale * t)^2 (scales == nullptr: no scale): each square in the
// tensor's compute type (float64 for float64 tensors, else float32), summed in float64 in a fixed
// order (deterministic). `partials` has sq_norm_partials(n, numels) slots, chunks numbered tensor by
// tensor in list order.
cudaError_t launch_sq_norm(int64_t n, const int64_t* numels, const void* const* tensors, const int32_t* dtypes,
                           const void* const* scales, const int32_t* scale_dtypes, double* partials,
                           cudaStream_t stream);

// saved[i] <- params[i]; params[i] <- params[i] + ((params^2 if adaptive) * grads[i]) * (*scale_dev), in the
// params' compute type, products and sum rounded separately. When *found_inf_dev != 0 the params are not
// written (saved still is).
cudaError_t launch_sam_ascent(int64_t n, const int64_t* numels, void* const* params, const int32_t* param_dtypes,
                              const void* const* grads, const int32_t* grad_dtypes, void* const* saved,
                              const int32_t* saved_dtypes, const double* scale_dev, bool adaptive,
                              const float* found_inf_dev, cudaStream_t stream);

// out[i] <- ties_merge_ of position i (docs/design.md): in_rows[i] is a device array of the k_inputs input pointers
// of position i, all of dtype in_dtypes[i]; bases[i] (same dtype) is read when has_base; bands[i] is a device array
// of 2 * k_inputs float64 (lo, hi per input), or nullptr (no trim); weights_dev is a device array of k_inputs
// float64. election: 0 "sum", 1 "count", 2 "none". Computes in float64 when out or the inputs are float64, else
// float32; out may be the base or one of the inputs. k_inputs >= 1.
cudaError_t launch_ties_merge(int64_t n, const int64_t* numels, void* const* outs, const int32_t* out_dtypes,
                              const void* const* bases, const void* const* in_rows, const int32_t* in_dtypes,
                              const void* const* bands, int32_t k_inputs, const double* weights_dev,
                              int32_t election, bool normalize, double scale, bool has_base, bool subtract_base,
                              cudaStream_t stream);

// deltas[i] <- u < p ? (rescale ? delta / p : delta) : 0, compared and divided in float64, rounded once at the
// store (through float32 into 16-bit deltas). p is keep_probs[i]'s element (float32 or float64: prob_dtypes[i])
// or, when keep_probs is nullptr, the number p. us[i] is float32 or float64 (u_dtypes[i]).
cudaError_t launch_dare_drop(int64_t n, const int64_t* numels, void* const* deltas, const int32_t* delta_dtypes,
                             const void* const* us, const int32_t* u_dtypes, const void* const* keep_probs,
                             const int32_t* prob_dtypes, double p, bool rescale, cudaStream_t stream);

}  // namespace swm_fused_cuda

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>
#include <vector>

namespace swm_fused_cuda {

constexpr int kBlockSize = 512;
constexpr int kChunkSize = 16384;       // elements per block; a multiple of every vector width
constexpr int kTableBytes = 3840;       // TensorTable budget; the op's own arguments fit in the rest of 4 KB
constexpr int kMaxKernelArgBytes = 4096;
constexpr int64_t kMaxGridBlocks = 2147483647;  // gridDim.x limit

// ---------------------------------------------------------------------------------------------------
// Dtypes: compute type, conversions in (to the compute type) and out (one rounding at the store).

template <typename T> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };
template <typename T> using compute_t = typename ComputeType<T>::type;

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }  // exact
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }             // exact

// Source value in compute type C: exact, except float64 -> float32, which rounds to nearest even.
template <typename C, typename T> __device__ __forceinline__ C convert_in(T x) { return static_cast<C>(widen(x)); }

template <typename T> __device__ __forceinline__ T convert_out(compute_t<T> x);
template <> __device__ __forceinline__ float convert_out<float>(float x) { return x; }
template <> __device__ __forceinline__ double convert_out<double>(double x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 convert_out<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half convert_out<__half>(float x) { return __float2half_rn(x); }

// Arithmetic with explicit rounding, so nvcc never contracts a product into a neighbouring add.
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// torch's lerp (aten/src/ATen/native/Lerp.h), with the fma its CUDA build contracts to:
// d = e - a;  |w| < 0.5 ? fma(w, d, a) : fma(w - 1, d, e).
template <typename C> __device__ __forceinline__ C lerp(C a, C e, C w) {
  const C d = sub_rn(e, a);
  return fabs(w) < C(0.5) ? fma_rn(w, d, a) : fma_rn(sub_rn(w, C(1)), d, e);
}

// NaN or Inf: every exponent bit set.
__device__ __forceinline__ bool is_nonfinite(float x) { return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u; }
__device__ __forceinline__ bool is_nonfinite(double x) {
  return (static_cast<unsigned long long>(__double_as_longlong(x)) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}
__device__ __forceinline__ bool is_nonfinite(__nv_bfloat16 x) { return (__bfloat16_as_ushort(x) & 0x7f80u) == 0x7f80u; }
__device__ __forceinline__ bool is_nonfinite(__half x) { return (__half_as_ushort(x) & 0x7c00u) == 0x7c00u; }

// ---------------------------------------------------------------------------------------------------
// Vector loads/stores: N elements of T, moved as 16-byte (or narrower, for small N*sizeof(T)) accesses.

constexpr int min_int(int a, int b) { return a < b ? a : b; }

template <typename T, int N>
struct alignas(min_int(16, static_cast<int>(sizeof(T)) * N)) Vec {
  T v[N];
};

constexpr int min_of(int a) { return a; }
template <typename... Rest> constexpr int min_of(int a, Rest... rest) { return min_int(a, min_of(rest...)); }

// Elements per vector step: 16 bytes of the narrowest operand (wider operands take several 16-byte accesses).
template <typename... Ts> constexpr int vec_width() { return 16 / min_of(static_cast<int>(sizeof(Ts))...); }

template <int N, typename T> __device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Vec<T, N>) == 0;
}

// Plain (coherent) loads: merge outputs may alias their inputs, so no __ldg / non-coherent path.
template <int N, typename T> __device__ __forceinline__ Vec<T, N> load(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <int N, typename T> __device__ __forceinline__ void store(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// ---------------------------------------------------------------------------------------------------
// The tensor table and the generic chunked kernel.

template <int DEPTH>
struct TensorTable {
  static constexpr int kMaxTensors = (kTableBytes - 8) / (8 * DEPTH + 8 + 4);
  void* ptrs[DEPTH][kMaxTensors];     // base pointer of operand d of tensor t
  int64_t numel[kMaxTensors];
  int32_t first_block[kMaxTensors];   // strictly increasing: every listed tensor has >= 1 block
  int32_t num_tensors;
};

// The table slot whose block range holds `block`: the last t with first_block[t] <= block.
template <int DEPTH>
__device__ __forceinline__ int tensor_of_block(const TensorTable<DEPTH>& table, int block) {
  int lo = 0, hi = table.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Op interface:
//   kDepth, kVec                 operands per tensor, elements per vector step
//   skip()                       true when the whole launch must write nothing (found_inf)
//   chunk(table, t, start)       typed pointers of tensor t advanced to element `start`, plus per-launch values
//   aligned(chunk)               every pointer the op touches is aligned for Vec<T, kVec>
//   apply<N>(chunk, i)           process elements i .. i+N-1 of the chunk, reading every operand of
//                                those elements before writing any (so outputs may alias inputs)
template <typename Op>
__global__ void __launch_bounds__(kBlockSize) multi_tensor_kernel(const TensorTable<Op::kDepth> table, const Op op) {
  if (op.skip()) return;
  const int t = tensor_of_block(table, static_cast<int>(blockIdx.x));
  const int64_t start = static_cast<int64_t>(static_cast<int>(blockIdx.x) - table.first_block[t]) * kChunkSize;
  const int64_t remaining = table.numel[t] - start;
  const int len = remaining < kChunkSize ? static_cast<int>(remaining) : kChunkSize;
  const typename Op::Chunk chunk = op.chunk(table, t, start);
  constexpr int V = Op::kVec;
  int scalar_from = 0;
  if (op.aligned(chunk)) {
    const int n_vec = len / V;
    for (int v = threadIdx.x; v < n_vec; v += kBlockSize) op.template apply<V>(chunk, v * V);
    scalar_from = n_vec * V;
  }
  for (int i = scalar_from + static_cast<int>(threadIdx.x); i < len; i += kBlockSize) op.template apply<1>(chunk, i);
}

// Reduction ops (those that define `Acc`) instead return an Acc from apply<N>(chunk, i) and get
// finish(chunk, total) called once per block, by thread 0, with the block's sum. The sum runs in a
// fixed order for a fixed block size, so results repeat bit for bit.
template <typename Op, typename = void> struct is_reduction : std::false_type {};
template <typename Op> struct is_reduction<Op, std::void_t<typename Op::Acc>> : std::true_type {};

template <typename Acc> __device__ __forceinline__ Acc block_sum(Acc value) {
  __shared__ Acc warp_sums[kBlockSize / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  Acc total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kBlockSize / 32; ++w) total += warp_sums[w];
  }
  return total;  // meaningful in thread 0 only
}

template <typename Op>
__global__ void __launch_bounds__(kBlockSize) multi_tensor_reduce_kernel(const TensorTable<Op::kDepth> table,
                                                                         const Op op) {
  const int t = tensor_of_block(table, static_cast<int>(blockIdx.x));
  const int64_t start = static_cast<int64_t>(static_cast<int>(blockIdx.x) - table.first_block[t]) * kChunkSize;
  const int64_t remaining = table.numel[t] - start;
  const int len = remaining < kChunkSize ? static_cast<int>(remaining) : kChunkSize;
  const typename Op::Chunk chunk = op.chunk(table, t, start);
  constexpr int V = Op::kVec;
  typename Op::Acc acc = 0;
  int scalar_from = 0;
  if (op.aligned(chunk)) {
    const int n_vec = len / V;
    for (int v = threadIdx.x; v < n_vec; v += kBlockSize) acc += op.template apply<V>(chunk, v * V);
    scalar_from = n_vec * V;
  }
  for (int i = scalar_from + static_cast<int>(threadIdx.x); i < len; i += kBlockSize) {
    acc += op.template apply<1>(chunk, i);
  }
  const typename Op::Acc total = block_sum(acc);
  if (threadIdx.x == 0) op.finish(chunk, total);
}

// Runs `op` over the tensors listed in `members` (indices into the launcher's arrays) in as few launches
// as the table allows; pointer(d, idx) gives operand d of tensor idx.
template <typename Op, typename PointerFn>
cudaError_t multi_tensor_apply(const std::vector<int64_t>& members, const int64_t* numels, PointerFn pointer,
                               const Op& op, cudaStream_t stream) {
  using Table = TensorTable<Op::kDepth>;
  static_assert(sizeof(Table) + sizeof(Op) + 16 <= kMaxKernelArgBytes, "kernel arguments exceed 4 KB");
  Table table{};
  int slot = 0;
  int64_t blocks = 0;
  auto launch = [&]() -> cudaError_t {
    table.num_tensors = slot;
    if constexpr (is_reduction<Op>::value) {
      multi_tensor_reduce_kernel<Op><<<static_cast<unsigned int>(blocks), kBlockSize, 0, stream>>>(table, op);
    } else {
      multi_tensor_kernel<Op><<<static_cast<unsigned int>(blocks), kBlockSize, 0, stream>>>(table, op);
    }
    slot = 0;
    blocks = 0;
    return cudaGetLastError();
  };
  for (const int64_t idx : members) {
    const int64_t n = numels[idx];
    if (n <= 0) continue;
    const int64_t chunks = (n + kChunkSize - 1) / kChunkSize;
    if (chunks > kMaxGridBlocks) return cudaErrorInvalidValue;
    if (slot == Table::kMaxTensors || blocks + chunks > kMaxGridBlocks) {
      const cudaError_t err = launch();
      if (err != cudaSuccess) return err;
    }
    for (int d = 0; d < Op::kDepth; ++d) table.ptrs[d][slot] = pointer(d, idx);
    table.numel[slot] = n;
    table.first_block[slot] = static_cast<int32_t>(blocks);
    ++slot;
    blocks += chunks;
  }
  return slot > 0 ? launch() : cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------
// Host-side dtype dispatch: calls f(Tag<T>{}) for a dtype code; false for an unknown code.

template <typename T> struct Tag { using type = T; };

template <typename F> bool dispatch_dtype(int32_t code, F&& f) {
  switch (code) {
    case kFloat32: f(Tag<float>{}); return true;
    case kFloat64: f(Tag<double>{}); return true;
    case kBFloat16: f(Tag<__nv_bfloat16>{}); return true;
    case kFloat16: f(Tag<__half>{}); return true;
    default: return false;
  }
}

inline bool valid_dtype(int32_t code) { return code >= kFloat32 && code <= kFloat16; }

// f(Tag<A>{}, Tag<B>{}, members) for every non-empty groups[a][b] of a grid of dtype codes (a: the written
// tensors', b: the read ones'), in order, until f returns an error; returns that error or cudaSuccess.
template <typename F> cudaError_t for_each_dtype_pair(const std::vector<int64_t> (&groups)[4][4], F&& f) {
  cudaError_t err = cudaSuccess;
  for (int32_t a = 0; a < 4; ++a) {
    for (int32_t b = 0; b < 4; ++b) {
      if (groups[a][b].empty() || err != cudaSuccess) continue;
      dispatch_dtype(a, [&](auto a_tag) {
        dispatch_dtype(b, [&](auto b_tag) { err = f(a_tag, b_tag, groups[a][b]); });
      });
    }
  }
  return err;
}

}  // namespace swm_fused_cuda

#endif  // __CUDACC__
