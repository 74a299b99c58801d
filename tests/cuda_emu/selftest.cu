// Test-only kernels for the emulation layer itself (tests/cuda_emu): warp shuffles, __syncthreads with
// __shared__ memory, and deliberately divergent barriers, which must fail the launch with a message. Built like
// csrc/cuda/*.cu (launch syntax rewritten, cuda_emu.h force-included); glue.cpp exposes them as
// swm_fused_emu::_emu_* ops.
#include <cuda_runtime.h>

namespace cuda_emu_selftest {
namespace {

// out[i] <- __shfl_down_sync(full, in[i], delta) as double and as int (bits of in's integer part).
__global__ void shfl_kernel(const double* in, double* out, long long* out_int, unsigned int delta) {
  const int i = static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * blockIdx.x));
  out[i] = __shfl_down_sync(0xffffffffu, in[i], delta);
  out_int[i] = __shfl_down_sync(0xffffffffu, static_cast<long long>(in[i]), delta);
}

// Every thread publishes a value in shared memory, then reads its neighbour's: right only if the
// barrier holds back every reader until every writer wrote (in either schedule order). Twice, with a
// second barrier so the second round's writes cannot overtake the first round's reads.
__global__ void neighbour_kernel(const float* in, float* out, int with_barriers) {
  __shared__ float slots[1024];
  const int n = static_cast<int>(blockDim.x), t = static_cast<int>(threadIdx.x);
  const int base = static_cast<int>(blockIdx.x) * n;
  slots[t] = in[base + t];
  if (with_barriers) __syncthreads();
  float got = slots[(t + 1) % n];
  if (with_barriers) __syncthreads();
  slots[t] = 2.0f * in[base + t];
  if (with_barriers) __syncthreads();
  got += slots[(t + n - 1) % n];
  out[base + t] = got;
}

// Divergent on purpose; every mode must fail the launch with a "cuda_emu: ..." message.
__global__ void divergent_kernel(int mode, float* sink) {
  const int t = static_cast<int>(threadIdx.x);
  __shared__ float s[64];
  switch (mode) {
    case 0:  // some threads return before a __syncthreads the others wait at
      if (t < 5) return;
      __syncthreads();
      break;
    case 1:  // two different __syncthreads call sites
      if (t % 2) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      break;
    case 2: {  // a lane leaves before a full-mask shuffle
      if (t == 3) return;
      s[t] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
      break;
    }
    case 3:  // half a warp waits at a shuffle, the rest of the block at __syncthreads
      if (t < 16) {  // half of warp 0: the other half never reaches the shuffle
        s[t] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
      }
      __syncthreads();
      break;
    case 4:  // a block of 48 threads: its second warp has 16 lanes, the full mask names 32
      s[t] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
      break;
  }
  sink[t] = s[t % 64];
}

}  // namespace

int shfl(const double* in, double* out, long long* out_int, unsigned int blocks, unsigned int bx, unsigned int by,
         unsigned int delta) {
  shfl_kernel<<<blocks, dim3(bx, by), 0, nullptr>>>(in, out, out_int, delta);
  return static_cast<int>(cudaGetLastError());
}

int neighbour(const float* in, float* out, unsigned int blocks, unsigned int threads, int with_barriers) {
  neighbour_kernel<<<blocks, threads, 0, nullptr>>>(in, out, with_barriers);
  return static_cast<int>(cudaGetLastError());
}

int divergent(int mode, float* sink) {
  divergent_kernel<<<1, mode == 4 ? 48 : 64, 0, nullptr>>>(mode, sink);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda_emu_selftest
