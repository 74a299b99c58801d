// The byte patterns of the CPU copy ceiling and of a K-way merge, as bare loops: what the memory
// system gives a core (or all of them) for each pattern, with no kernel around it.
//
//   g++ -O3 -march=native -fopenmp bench/stream_patterns.cpp -o /tmp/stream_patterns
//   OMP_NUM_THREADS=1 /tmp/stream_patterns      # one thread, timed with its CPU clock
//   OMP_NUM_THREADS=2 /tmp/stream_patterns      # every thread, wall clock
//
// Each pattern runs in turn with the copy reference (the in-place add of bench/cases.py's
// copy_ceiling: a += b, 12 bytes per element) and prints the median over rounds of its GB/s and of
// its ratio to the copy in the same round. "read K + write" sums K streams into an output (no
// weights): a K-way merge's 4(K+1) bytes per element; "NT" writes with non-temporal stores, "reg"
// with ordinary stores (which read each output line before writing it).
#include <immintrin.h>
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

constexpr int64_t kN = int64_t(1) << 24;  // elements per stream: 64 MB, far past the caches
constexpr int kMaxK = 8;
float* x[kMaxK];
float* out;
float* a;
float* b;
bool cpu_clock = false;

double now() {
  timespec ts;
  clock_gettime(cpu_clock ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

void copy_add() {  // the copy ceiling's pattern: read a, read b, write a
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < 4 * kN; i += 8) {
    _mm256_store_ps(a + i, _mm256_add_ps(_mm256_load_ps(a + i), _mm256_load_ps(b + i)));
  }
}

template <int K>
float read_only() {
  float total = 0;
#pragma omp parallel reduction(+ : total)
  {
    __m256 acc[K];
    for (int k = 0; k < K; ++k) acc[k] = _mm256_setzero_ps();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < kN; i += 8) {
      for (int k = 0; k < K; ++k) acc[k] = _mm256_add_ps(acc[k], _mm256_load_ps(x[k] + i));
    }
    float f[8];
    for (int k = 1; k < K; ++k) acc[0] = _mm256_add_ps(acc[0], acc[k]);
    _mm256_storeu_ps(f, acc[0]);
    total += f[0];
  }
  return total;
}

template <int K, bool kNonTemporal>
void read_write() {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < kN; i += 8) {
    __m256 s = _mm256_load_ps(x[0] + i);
    for (int k = 1; k < K; ++k) s = _mm256_add_ps(s, _mm256_load_ps(x[k] + i));
    if (kNonTemporal) {
      _mm256_stream_ps(out + i, s);
    } else {
      _mm256_store_ps(out + i, s);
    }
  }
  if (kNonTemporal) _mm_sfence();
}

volatile float sink;

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? atoi(argv[1]) : 9;
  cpu_clock = omp_get_max_threads() == 1;
  for (int k = 0; k < kMaxK; ++k) {
    x[k] = static_cast<float*>(aligned_alloc(64, kN * 4));
    for (int64_t i = 0; i < kN; ++i) x[k][i] = 1e-3f * k;
  }
  out = static_cast<float*>(aligned_alloc(64, kN * 4));
  a = static_cast<float*>(aligned_alloc(64, 4 * kN * 4));
  b = static_cast<float*>(aligned_alloc(64, 4 * kN * 4));
  std::memset(out, 0, kN * 4);
  for (int64_t i = 0; i < 4 * kN; ++i) a[i] = 0, b[i] = 1e-30f;
  struct Pattern {
    std::string name;
    std::function<void()> run;
    double bytes;
  };
  const double n = kN;
  const std::vector<Pattern> patterns = {
      {"read 1", [] { sink = read_only<1>(); }, 4 * n},
      {"read 2", [] { sink = read_only<2>(); }, 8 * n},
      {"read 8", [] { sink = read_only<8>(); }, 32 * n},
      {"read 2 + write reg (K=2 merge)", read_write<2, false>, 12 * n},
      {"read 2 + write NT  (K=2 merge)", read_write<2, true>, 12 * n},
      {"read 3 + write reg (K=3 merge)", read_write<3, false>, 16 * n},
      {"read 3 + write NT  (K=3 merge)", read_write<3, true>, 16 * n},
      {"read 8 + write reg (K=8 merge)", read_write<8, false>, 36 * n},
      {"read 8 + write NT  (K=8 merge)", read_write<8, true>, 36 * n},
  };
  std::vector<std::vector<double>> gbps(patterns.size()), ratio(patterns.size());
  std::vector<double> copy;
  copy_add();
  for (const auto& p : patterns) p.run();  // warm-up: pages touched
  for (int r = 0; r < rounds; ++r) {
    for (size_t j = 0; j < patterns.size(); ++j) {
      double t = now();
      copy_add();
      const double copy_gbps = 12 * 4 * n / (now() - t) / 1e9;
      t = now();
      patterns[j].run();
      const double g = patterns[j].bytes / (now() - t) / 1e9;
      copy.push_back(copy_gbps);
      gbps[j].push_back(g);
      ratio[j].push_back(g / copy_gbps);
    }
  }
  const auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  printf("%d thread(s), %s clock, %d rounds; copy (a += b, 12 B/elem): %.1f GB/s\n", omp_get_max_threads(),
         cpu_clock ? "thread CPU" : "wall", rounds, median(copy));
  for (size_t j = 0; j < patterns.size(); ++j) {
    printf("%-32s %6.1f GB/s  %4.0f%% of copy\n", patterns[j].name.c_str(), median(gbps[j]), 100 * median(ratio[j]));
  }
  return 0;
}
