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
#include <memory>
#include <tuple>
#include <utility>
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

// Elements per chunk of the apply passes. Slices of a tensor split over the threads start at multiples
// of it, so a chunk never straddles two slices.
constexpr int64_t kApplyChunk = int64_t{1} << 15;

// Thread t's slice [begin, end) of a tensor of n elements split over `threads` threads: the selection
// and the apply passes cut a split tensor alike, so each thread applies the slice it selected (and kept
// the classes of).
inline int64_t slice_length(int64_t n, int64_t threads) {
  const int64_t fair = (n + threads - 1) / threads;
  return std::max<int64_t>(kApplyChunk, (fair + kApplyChunk - 1) / kApplyChunk * kApplyChunk);
}

inline std::pair<int64_t, int64_t> slice_of(int64_t n, int64_t threads, int64_t t) {
  const int64_t per = slice_length(n, threads);
  const int64_t begin = std::min(n, t * per);
  return {begin, std::min(n, begin + per)};
}

// What the bracket pass learned about every element of a tensor, kept so that the apply pass decides
// s < thr without reading g_nat and g_adv again. With the bracket keys lo <= hi, each element is
//   low     key <= lo        masked iff thr > lo (or, where no key is below lo, iff lo < thr: never)
//   mid     lo < key <= hi   its key is kept, in element order: masked iff key < thr
//   high    key > hi         kept (thr <= hi)
// which decides every element whenever lo <= thr <= hi and (thr > lo or no key is < lo): a bracket hit
// gives thr between the order statistics k and k+1, both in [lo, hi]; deciding_classes checks it, and
// the apply pass recomputes the scores where it fails. Per slice of the tensor (one slice unless the
// tensor was split over the threads): two bit planes (bit j of byte b is element 8b + j of the slice;
// zero past its end, padded to whole 64-bit words) and the mid keys, with the index of the first mid key
// of every kApplyChunk-chunk. 1/4 byte per element plus 4 bytes per mid element (about 3.6 % of them).
struct Classes {
  struct Slice {
    std::vector<uint8_t> low, mid;
    std::vector<uint32_t> keys;
    std::vector<int64_t> chunk_key;  // chunk c's first mid key is keys[chunk_key[c]]; one entry past the last
  };
  bool valid = false;  // set by a bracket hit only
  uint32_t lo = 0, hi = 0;
  bool any_below = false;  // some key < lo
  int64_t slice_len = 0;   // elements per slice (the last may be shorter): slice s starts at s * slice_len
  std::vector<Slice> slices;
};

// classes[i] if it decides s < thr for every element of tensor i (see Classes), else nullptr (tensor i
// took another path, no classes were kept, or thr == lo with keys below lo). Called once per tensor
// whose threshold masks something; counts which way its apply pass goes (cure::cpu_apply_counters).
const Classes* deciding_classes(const std::vector<Classes>& classes, int64_t i, float thr);

// For one apply chunk [begin, end) of a tensor whose classes c decide thr (begin a multiple of
// kApplyChunk from its slice's start): one byte per element, 1 where s < thr, in a buffer of the calling
// thread valid until its next call.
const uint8_t* masked_bytes(const Classes& c, int64_t begin, int64_t end, float thr);

// The same chunk of a float32 update, straight from the bits: update[j] = 0 where element begin + j has
// s < thr (update points at element begin). Returns the number of elements kept.
int64_t mask_f32(const Classes& c, int64_t begin, int64_t end, float thr, float* update);

// The classes of one op call's tensors, borrowed from a pool: their buffers are reused from call to
// call (no page faults on every step) and never shared by two calls at once.
class ClassesLease {
 public:
  ClassesLease();
  ~ClassesLease();
  ClassesLease(const ClassesLease&) = delete;
  ClassesLease& operator=(const ClassesLease&) = delete;
  std::vector<Classes>& operator*() { return *held_; }
  std::vector<Classes>* operator->() { return held_.get(); }
  std::vector<Classes>* get() { return held_.get(); }

 private:
  std::unique_ptr<std::vector<Classes>> held_;
};

// Called once per tensor right after its selection: on the thread that selected it (split = false), or,
// for a tensor that was split over all threads, outside any parallel region (split = true, so the
// callback may start its own). Running the apply pass of a tensor here reads its classes (or, off the
// bracket, its gradients again) while they are still in the cache.
using AfterSelect = std::function<void(int64_t index, const Selection& selection, bool split)>;

// Thresholds and non-finite counts of every tensor, exact. Tensors are handed to the OpenMP threads
// largest first; a tensor larger than its fair share is split over all threads. With `classes`, it is
// resized to one entry per tensor and a bracket hit keeps the tensor's classes there (valid until the
// next call with the same vector); other tensors get valid = false.
std::vector<Selection> select_thresholds(const std::vector<SelectInput>& inputs, Weights w, double p,
                                         const AfterSelect& after = nullptr, std::vector<Classes>* classes = nullptr);

// A range of one tensor's elements for the apply passes, which run over all tensors' chunks in one
// parallel loop (every chunk is independent once the thresholds are known).
struct Chunk {
  int64_t tensor, begin, end;
};

// The chunks of every tensor in about the reverse of the order select_thresholds read them (it hands
// out tensors largest first, each front to back): smallest tensor first, each one's chunks last to
// first, so the pass starts with what is still in the cache. Chunks start at multiples of kApplyChunk.
inline std::vector<Chunk> chunks_of(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> order(sizes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sizes[a] < sizes[b]; });
  std::vector<Chunk> out;
  for (const int64_t i : order) {
    if (sizes[i] == 0) continue;
    for (int64_t start = (sizes[i] - 1) / kApplyChunk * kApplyChunk; start >= 0; start -= kApplyChunk)
      out.push_back({i, start, std::min(sizes[i], start + kApplyChunk)});
  }
  return out;
}

// The apply pass of one tensor (or slice) [begin, end) right after its selection, in chunks of
// kApplyChunk elements from begin, last chunk first: the selection read the tensor front to back, so its
// end is the likeliest part to be still in the cache (ResNet-18 shapes, 2 threads: the fused step about
// 10 % faster than front to back; the mask alone the same on an idle machine and faster when another
// process competes for the cache). Returns the sum of fn(begin, end) over the chunks.
template <typename Fn>
int64_t apply_backwards(int64_t begin, int64_t end, Fn&& fn) {
  int64_t total = 0;
  if (end <= begin) return total;
  for (int64_t start = begin + (end - begin - 1) / kApplyChunk * kApplyChunk; start >= begin; start -= kApplyChunk)
    total += fn(start, std::min(end, start + kApplyChunk));
  return total;
}

// The same for a tensor whose selection was split over the threads: each thread takes back its slice.
template <typename Fn>
int64_t apply_backwards_split(int64_t n, Fn&& fn) {
  int64_t total = 0;
#pragma omp parallel reduction(+ : total)
  {
    const auto [begin, end] = slice_of(n, omp_get_num_threads(), omp_get_thread_num());
    total += apply_backwards(begin, end, fn);
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
