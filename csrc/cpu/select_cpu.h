// Exact per-tensor selection of the RGP threshold on the CPU, shared by cure::rgp_mask and
// cure::rgp_sgd_step (docs/selection.md describes the algorithm; docs/method.md the contract).
//
// For every tensor i of a list, thresholds[i] = numpy.quantile(s_i, p) as float32, with
//   s = f32(alpha)*|g_nat| + f32(1-alpha)*|g_adv|   (each product and the sum rounded to float32),
// and nonfinite[i] = the number of scores that are inf or NaN. Nothing is written to the inputs.
// The apply passes of the two ops recompute s with score() below: bit for bit the same value.
#pragma once

#include <ATen/ATen.h>
#include <omp.h>

#include <algorithm>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

namespace cure {
namespace cpu {

constexpr int64_t kMaxElements = (int64_t{1} << 32) - 1;  // per tensor: uint32 histogram counts

struct Weights {
  float nat;  // f32(alpha)
  float adv;  // f32(1 - alpha), 1 - alpha computed in double
};

inline Weights weights_of(double alpha) { return {static_cast<float>(alpha), static_cast<float>(1.0 - alpha)}; }

// s = f32(alpha)*|g_nat| + f32(1-alpha)*|g_adv|, each product and the sum rounded to float
// (the build uses -ffp-contract=off: no fused multiply-add).
template <typename T>
inline float score(T nat, T adv, Weights w) {
  const float x = w.nat * std::fabs(static_cast<float>(nat));
  const float y = w.adv * std::fabs(static_cast<float>(adv));
  return x + y;
}

inline uint32_t key_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// One tensor to select on: contiguous gradients of n elements, all of one dtype.
struct SelectInput {
  const void* nat;
  const void* adv;
  at::ScalarType dtype;
  int64_t n;
};

// How a tensor's threshold was found (counted for benchmarks and tests; see selection_counters).
enum class Path : uint8_t { kEmpty, kDirect, kBracket, kFallback, kNonFinite };

struct Selection {
  float threshold = std::numeric_limits<float>::quiet_NaN();
  int64_t nonfinite = 0;
  Path path = Path::kEmpty;
};

// Called once per tensor right after its selection: on the thread that selected it (split = false), or,
// for a tensor that was split over all threads, outside any parallel region (split = true, so the
// callback may start its own). Running the apply pass of a tensor here re-reads its gradients while
// they are still in the last-level cache.
using AfterSelect = std::function<void(int64_t index, const Selection& selection, bool split)>;

// Thresholds and non-finite counts of every tensor, exact. Tensors are handed to the OpenMP threads
// largest first; a tensor larger than its fair share is split over all threads.
std::vector<Selection> select_thresholds(const std::vector<SelectInput>& inputs, Weights w, double p,
                                         const AfterSelect& after = nullptr);

// A range of one tensor's elements for the apply passes, which run over all tensors' chunks in one
// parallel loop (every chunk is independent once the thresholds are known).
struct Chunk {
  int64_t tensor, begin, end;
};

// The chunks of every tensor in about the reverse of the order select_thresholds read them (it hands
// out tensors largest first, each front to back): smallest tensor first, each one's chunks last to
// first, so the pass starts with what is still in the cache.
inline std::vector<Chunk> chunks_of(const std::vector<int64_t>& sizes, int64_t chunk) {
  std::vector<int64_t> order(sizes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sizes[a] < sizes[b]; });
  std::vector<Chunk> out;
  for (const int64_t i : order)
    for (int64_t stop = sizes[i]; stop > 0; stop -= chunk) out.push_back({i, std::max<int64_t>(0, stop - chunk), stop});
  return out;
}

// The apply pass of one tensor right after its selection, over [0, n) in chunks of `chunk` elements,
// last chunk first: the selection read the tensor front to back, so its end is the likeliest part to be
// still in the cache (ResNet-18 shapes, 2 threads: the fused step about 10 % faster than front to back; the
// mask alone the same on an idle machine and faster when another process competes for the cache).
// Returns the sum of fn(begin, end) over the chunks.
template <typename Fn>
int64_t apply_backwards(int64_t begin, int64_t end, int64_t chunk, Fn&& fn) {
  int64_t total = 0;
  for (int64_t stop = end; stop > begin; stop -= chunk) total += fn(std::max(begin, stop - chunk), stop);
  return total;
}

// The same for a tensor whose selection was split over the threads: each thread takes back the slice
// it read (contiguous slices of ceil(n / threads) elements, as the split selection cuts them).
template <typename Fn>
int64_t apply_backwards_split(int64_t n, int64_t chunk, Fn&& fn) {
  int64_t total = 0;
#pragma omp parallel reduction(+ : total)
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = (n + threads - 1) / threads;
    const int64_t begin = std::min(n, t * per);
    total += apply_backwards(begin, std::min(n, begin + per), chunk, fn);
  }
  return total;
}

// Compiles a function for AVX2 (no FMA: the build's -ffp-contract=off still applies); callers check
// has_avx2() first.
#if defined(__x86_64__) && defined(__GNUC__)
#define CURE_TARGET_AVX2 __attribute__((target("avx2")))
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#else
#define CURE_TARGET_AVX2
inline bool has_avx2() { return false; }
#endif

// Whether an apply pass must compare scores with the threshold at all: a NaN threshold masks
// nothing (s < NaN is false), and neither does 0 (scores are >= +0 or NaN).
inline bool masks_anything(float threshold) { return threshold > 0.0f; }

// The ops' statistics (thresholds float32[T], kept int64[T], nonfinite int64[T]) from the selections and
// the kept counts of the apply pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_stats(const std::vector<Selection>& selections,
                                                          const std::vector<int64_t>& kept_count);

}  // namespace cpu
}  // namespace cure
