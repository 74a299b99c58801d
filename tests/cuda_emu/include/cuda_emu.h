// cuda_emu.h: just enough of CUDA to compile swm_fused's kernels (csrc/cuda/*.cu) with a host C++
// compiler and run them on CPU memory. Force-included (-include) into every emulated translation unit;
// the shim headers next to it (cuda_runtime*.h, cuda_fp16.h, cuda_bf16.h) include it too. The
// non-template part of the runtime (fibers, scheduler, barriers) is in ../runtime.cpp.
//
// Model: a launch runs synchronously on the calling thread. Blocks run one after another (x fastest,
// then y, then z). Inside a block every thread is a cooperative fiber: the scheduler runs each one
// until it finishes or reaches a barrier, in thread order (or reversed, see schedule_mode()), pass
// after pass, and releases a barrier only once every thread of its scope arrived:
//   * __syncthreads()                 : all threads of the block;
//   * __shfl_down_sync(mask, v, d)    : the 32 lanes of the warp (full mask, width 32 only), through
//                                       per-warp exchange slots and two warp barriers;
//   * __shared__                      : storage shared by the block's threads (static thread_local:
//                                       every fiber of a launch runs on one host thread).
// A barrier that can never complete (threads exited or wait at another barrier: a divergent
// barrier) fails the launch with a message (std::runtime_error) instead of deadlocking. Anything else that needs
// cooperating threads (other warp intrinsics, votes, atomics, dynamic shared memory, cooperative
// groups, grid sync) is deliberately NOT defined, so a kernel that starts using it fails to compile
// here instead of being emulated wrongly.
//
// Only what the kernels use is provided, with CUDA's semantics where they differ from plain C++:
//   * __fmaf_rn/__fadd_rn/... : one IEEE rounding each (the build uses -ffp-contract=off, so the host
//     compiler fuses nothing either);
//   * __half/__nv_bfloat16 : 2-byte storage types with no implicit conversions or operators, like a
//     torch CUDA build (-D__CUDA_NO_HALF_CONVERSIONS__ etc.); conversions round to nearest even and
//     produce the canonical NaN 0x7fff, like the device's cvt instructions;
//   * launch configuration errors (zero or oversized grid/block) are reported by cudaGetLastError().
#pragma once

#include <math.h>  // C++ <math.h>: float overloads of fabs & co. in the global namespace, as in device code

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------------
// Qualifiers: all code is host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---------------------------------------------------------------------------------------------------
// Errors and streams.
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

namespace cuda_emu {
namespace detail {
inline thread_local cudaError_t last_error = cudaSuccess;
}  // namespace detail
}  // namespace cuda_emu

// Like CUDA: returns the last error and resets it.
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::cuda_emu::detail::last_error;
  ::cuda_emu::detail::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::cuda_emu::detail::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
  }
  return "unknown error";
}
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
  }
  return "cudaErrorUnknown";
}

// ---------------------------------------------------------------------------------------------------
// Built-in index variables: thread-local, set by the launch loop, read-only to kernel code.
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace cuda_emu {
namespace detail {
inline thread_local uint3 thread_idx{0, 0, 0};
inline thread_local uint3 block_idx{0, 0, 0};
inline thread_local dim3 block_dim{1, 1, 1};
inline thread_local dim3 grid_dim{1, 1, 1};
}  // namespace detail
}  // namespace cuda_emu

#define threadIdx (static_cast<const uint3&>(::cuda_emu::detail::thread_idx))
#define blockIdx (static_cast<const uint3&>(::cuda_emu::detail::block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_emu::detail::block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_emu::detail::grid_dim))

// ---------------------------------------------------------------------------------------------------
// Block cooperation (implemented in tests/cuda_emu/runtime.cpp). The barrier functions are out of line
// on purpose: the compiler must reload threadIdx and shared memory after each of them.
namespace cuda_emu {
namespace detail {
using ThreadBody = void (*)(void* ctx);
// Runs body(ctx) once per thread of a block of `block` threads, as fibers. `kernel` and `signature` (the
// launching operator|'s __PRETTY_FUNCTION__, which lists the kernel's parameter types) name it in errors.
void run_block(ThreadBody body, void* ctx, dim3 block, const void* kernel, const char* signature);
void syncthreads(const char* file, int line);
unsigned long long shfl_down_bits(unsigned int mask, unsigned long long bits, unsigned int delta, int width,
                                  const char* file, int line);
// 0: each scheduler pass runs the threads in increasing index order; 1: in decreasing order.
int& schedule_mode();
// [block barriers completed, warp barriers completed, fibers run] since the library loaded.
long long sync_stat(int which);

template <typename T> struct shuffleable : std::false_type {};
template <> struct shuffleable<int> : std::true_type {};
template <> struct shuffleable<unsigned int> : std::true_type {};
template <> struct shuffleable<long> : std::true_type {};
template <> struct shuffleable<unsigned long> : std::true_type {};
template <> struct shuffleable<long long> : std::true_type {};
template <> struct shuffleable<unsigned long long> : std::true_type {};
template <> struct shuffleable<float> : std::true_type {};
template <> struct shuffleable<double> : std::true_type {};

template <typename T>
inline T shfl_down_sync(const char* file, int line, unsigned int mask, T var, unsigned int delta, int width = 32) {
  static_assert(shuffleable<T>::value, "__shfl_down_sync is emulated for 4- and 8-byte integers, float, double");
  unsigned long long bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl_down_bits(mask, bits, delta, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace detail
}  // namespace cuda_emu

// Block-scoped storage: all fibers of a block run on one host thread, one block after another, so a
// thread-local static is shared by exactly the block's threads. Not reset between blocks (CUDA leaves
// it undefined): a block sees what the previous block on this host thread left. `extern __shared__`
// (dynamic shared memory) does not compile.
#define __shared__ static thread_local
#define __syncthreads() ::cuda_emu::detail::syncthreads(__FILE__, __LINE__)
#define __shfl_down_sync(...) ::cuda_emu::detail::shfl_down_sync(__FILE__, __LINE__, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------------
// Bit casts and explicitly rounded arithmetic.
namespace cuda_emu {
template <typename To, typename From> inline To bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To r;
  std::memcpy(&r, &x, sizeof(To));
  return r;
}
}  // namespace cuda_emu

inline unsigned int __float_as_uint(float x) { return ::cuda_emu::bit_cast<unsigned int>(x); }
inline float __uint_as_float(unsigned int x) { return ::cuda_emu::bit_cast<float>(x); }
inline int __float_as_int(float x) { return ::cuda_emu::bit_cast<int>(x); }
inline float __int_as_float(int x) { return ::cuda_emu::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return ::cuda_emu::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return ::cuda_emu::bit_cast<double>(x); }

inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }

// ---------------------------------------------------------------------------------------------------
// 16-bit float types (cuda_fp16.h / cuda_bf16.h): storage plus the conversion intrinsics.
struct alignas(2) __half {
  unsigned short __x;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
};
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half must be 2 bytes, 2-aligned");
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 must be 2 bytes, 2-aligned");

inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<unsigned int>(h.__x) << 16); }

// Round to nearest even; NaN -> 0x7fff (what cvt.rn.bf16.f32 gives).
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
  const unsigned int rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(rounded >> 16)};
}

inline float __half2float(__half h) {
  const unsigned int sign = (static_cast<unsigned int>(h.__x) & 0x8000u) << 16;
  const unsigned int exp = (h.__x >> 10) & 0x1fu;
  const unsigned int mant = h.__x & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float mag = std::ldexp(static_cast<float>(mant), -24);
    return __uint_as_float(__float_as_uint(mag) | sign);
  }
  if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (mant << 13));  // Inf, NaN (payload kept)
  return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, overflow to Inf, gradual underflow; NaN -> 0x7fff (what cvt.rn.f16.f32 gives).
inline __half __float2half_rn(float f) {
  const unsigned int u = __float_as_uint(f);
  const unsigned short sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
  const unsigned int x = u & 0x7fffffffu;
  if (x > 0x7f800000u) return __half{0x7fff};
  if (x >= 0x477ff000u) return __half{static_cast<unsigned short>(sign | 0x7c00u)};  // >= 65520: Inf
  if (x < 0x38800000u) {                                                            // below 2^-14: subnormal
    if (x <= 0x33000000u) return __half{sign};                                      // <= 2^-25: ties to 0
    const unsigned int e = x >> 23;
    const unsigned int m = (x & 0x7fffffu) | 0x800000u;
    const unsigned int shift = 126u - e;  // 14..24: units of 2^-24
    unsigned int r = m >> shift;
    const unsigned int rem = m & ((1u << shift) - 1u);
    const unsigned int halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return __half{static_cast<unsigned short>(sign | r)};
  }
  unsigned int r = ((x >> 23) - 112u) << 10 | ((x & 0x7fffffu) >> 13);
  const unsigned int rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is still right
  return __half{static_cast<unsigned short>(sign | r)};
}

// ---------------------------------------------------------------------------------------------------
// Kernel launches. The build rewrites `kernel<<<cfg>>>(args)` to
//   `kernel | ::cuda_emu::launch_config(cfg) | ::cuda_emu::launch_args(args)`
// (see tests/cuda_emu/build.py): two overloaded `|` that bind the configuration, then run the grid.
namespace cuda_emu {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  cudaStream_t stream;
};

inline LaunchConfig launch_config(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t stream = nullptr) {
  return {grid, block, shared_bytes, stream};
}

template <typename... A> struct LaunchArgs {
  std::tuple<A&&...> refs;
};
template <typename... A> LaunchArgs<A...> launch_args(A&&... args) {
  return {std::forward_as_tuple(std::forward<A>(args)...)};
}

// Counters for tests of the harness itself (launches and blocks since the library loaded).
namespace detail {
inline long long launches = 0;
inline long long blocks_run = 0;
}  // namespace detail

// The same limits a real launch checks (sm_90): grid.x < 2^31, grid.y/z <= 65535, block dims
// <= (1024, 1024, 64) and <= 1024 threads, no zero dimension; static shared memory <= 48 KB.
inline cudaError_t check_config(const LaunchConfig& c) {
  const dim3 g = c.grid, b = c.block;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0) return cudaErrorInvalidConfiguration;
  if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u) return cudaErrorInvalidConfiguration;
  if (b.x > 1024u || b.y > 1024u || b.z > 64u) return cudaErrorInvalidConfiguration;
  if (static_cast<unsigned long long>(b.x) * b.y * b.z > 1024ull) return cudaErrorInvalidConfiguration;
  if (c.shared_bytes > 48u * 1024u) return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <typename... P> struct BoundKernel {
  void (*kernel)(P...);
  LaunchConfig config;
};

template <typename... P> BoundKernel<P...> operator|(void (*kernel)(P...), const LaunchConfig& config) {
  return {kernel, config};
}

template <typename... P, typename... A> void operator|(const BoundKernel<P...>& k, LaunchArgs<A...>&& args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  constexpr size_t param_bytes = (size_t{0} + ... + sizeof(std::decay_t<P>));
  static_assert(param_bytes <= 32764, "kernel parameters exceed CUDA's 32764-byte limit");
  const cudaError_t err = check_config(k.config);
  if (err != cudaSuccess) {
    detail::last_error = err;
    return;
  }
  // A launch copies its arguments once, converted to the parameter types, into parameter space.
  std::tuple<std::decay_t<P>...> params = std::apply(
      [](auto&&... a) { return std::tuple<std::decay_t<P>...>(std::forward<decltype(a)>(a)...); }, args.refs);
  const dim3 g = k.config.grid, b = k.config.block;
  detail::grid_dim = g;
  detail::block_dim = b;
  ++detail::launches;
  // Each thread (a fiber) runs the kernel with its own copy of the parameters.
  auto body = [&]() { std::apply(k.kernel, params); };
  using Body = decltype(body);
  for (unsigned int bz = 0; bz < g.z; ++bz)
    for (unsigned int by = 0; by < g.y; ++by)
      for (unsigned int bx = 0; bx < g.x; ++bx) {
        detail::block_idx = uint3{bx, by, bz};
        ++detail::blocks_run;
        detail::run_block([](void* f) { (*static_cast<Body*>(f))(); }, &body, b,
                          reinterpret_cast<const void*>(k.kernel), __PRETTY_FUNCTION__);
      }
}

}  // namespace cuda_emu
