// CPU kernel of cure::rgp_mask: exact per-tensor p-quantile masking of the update by Robust
// Gradient Prominence (paper Eq. 6), bit for bit equal to numpy.quantile (SPEC section 2).
//
// Selection works on the uint32 bit patterns ("keys") of the float32 scores. Scores are >= +0 or
// NaN, so the keys of non-NaN scores are ordered like their values; a NaN anywhere makes the
// threshold NaN and skips selection, so NaN keys never need an order. No sort of the data.
//
// One tensor, one thread (the common case):
//   pass 1  s = score, cached as keys in a thread-local buffer; histogram of key bits 30..19
//           (4096 bins, 16 KiB: stays in L1).
//   select  ranks k and k+1 (numpy's linear interpolation needs both). When they fall in different
//           bins they are the largest key of the first bin and the smallest of the second: one scan
//           of the cached keys. Otherwise the keys of the shared bin are compacted into a small buffer
//           and refined there by the next digits (bits 18..7, then 6..0), or by nth_element once few
//           are left. Heavy ties (e.g. 30 % exact zeros) shrink through the digits, never re-read n.
//   pass 2  update[s < thr] = 0, reading the cached keys, counting kept entries.
//   Memory per element: 8 B of gradients read, 4 B of keys written, 4-8 B of keys read, and the
//   update read and written once.
// Scheduling: tensors are handed to threads largest first, no barrier between tensors. A tensor
// larger than its fair share of the total (n * threads > total) would leave the other threads
// idle, so it is split: all threads run pass 1 on slices with their own histograms, the shared bin
// is compacted slice by slice into one buffer, and pass 2 runs in parallel again.
// Tensors below kDirect elements skip the histogram: nth_element on a copy of the keys.
//
// Compiled with -ffp-contract=off: the score and threshold arithmetic must not fuse into FMAs.
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

namespace cure {
namespace {

constexpr int64_t kDirect = 4096;           // below: nth_element on a copy of the keys
constexpr int64_t kSplitMin = 1 << 18;      // never split a tensor smaller than this over threads
constexpr int64_t kRefineDirect = 2048;     // compacted candidates below this: nth_element
constexpr int64_t kMaxElements = (int64_t{1} << 32) - 1;  // per tensor: uint32 histogram counts

// Three digits of a non-NaN key, most significant first (bit 31, the sign, is always 0).
constexpr int kDigits = 3;
constexpr int kShift[kDigits] = {19, 7, 0};
constexpr uint32_t kDigitMask[kDigits] = {0xFFF, 0xFFF, 0x7F};
constexpr int kBins = 4096;
using Histogram = std::array<uint32_t, kBins>;

inline uint32_t digit(uint32_t key, int level) { return (key >> kShift[level]) & kDigitMask[level]; }

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

inline bool key_is_nan(uint32_t key) { return (key & 0x7FFFFFFFu) > 0x7F800000u; }
inline bool key_is_nonfinite(uint32_t key) { return (key & 0x7F800000u) == 0x7F800000u; }

struct Weights {
  float nat;  // f32(alpha)
  float adv;  // f32(1 - alpha), 1 - alpha computed in double
};

// s = f32(alpha)*|g_nat| + f32(1-alpha)*|g_adv|, each product and the sum rounded to float.
template <typename T>
inline float score(T nat, T adv, Weights w) {
  const float x = w.nat * std::fabs(static_cast<float>(nat));
  const float y = w.adv * std::fabs(static_cast<float>(adv));
  return x + y;
}

// numpy's 'linear' quantile: virtual index h = (n-1)*p in double, k = floor(h), g = h - k.
struct Interpolation {
  int64_t lo_rank;  // k, or n-1 when k >= n-1
  int64_t hi_rank;  // k+1, or n-1 when k >= n-1
  double g;
};

Interpolation interpolation(int64_t n, double p) {
  const double h = static_cast<double>(n - 1) * p;
  const double k = std::floor(h);
  const double g = h - k;
  const int64_t ki = static_cast<int64_t>(k);
  if (ki >= n - 1) return {n - 1, n - 1, g};
  return {ki, ki + 1, g};
}

// numpy's _lerp in float32 with a float32 weight; inf propagates exactly as in numpy.
float threshold_from(uint32_t lo_key, uint32_t hi_key, double g) {
  const float a = float_of(lo_key);
  const float b = float_of(hi_key);
  const float d = b - a;
  if (g < 0.5) return a + d * static_cast<float>(g);
  return b - d * static_cast<float>(1.0 - g);
}

struct TensorResult {
  float threshold = std::numeric_limits<float>::quiet_NaN();
  int64_t kept = 0;
  int64_t nonfinite = 0;
};

struct Entry {
  at::Tensor update, nat, adv;  // contiguous (copies where the caller's were not)
  int64_t n;
};

// --- selection ------------------------------------------------------------------------------------

struct KeyPair {
  uint32_t lo, hi;  // keys of ranks lo_rank and hi_rank
};

// The bin holding rank `rank` of a histogram, and the number of keys in bins below it.
std::pair<uint32_t, int64_t> bin_of_rank(const uint32_t* hist, int bins, int64_t rank) {
  int64_t below = 0;
  for (int b = 0; b < bins; ++b) {
    if (below + hist[b] > rank) return {static_cast<uint32_t>(b), below};
    below += hist[b];
  }
  TORCH_INTERNAL_ASSERT(false, "rank ", rank, " beyond the histogram total ", below);
}

void histogram(const uint32_t* keys, int64_t n, int level, Histogram& hist) {
  std::fill(hist.begin(), hist.end(), 0u);
  for (int64_t i = 0; i < n; ++i) ++hist[digit(keys[i], level)];
}

// Largest key whose `level` digit is lo_bin and smallest whose digit is hi_bin (lo_bin < hi_bin).
KeyPair max_min_of_bins(const uint32_t* keys, int64_t n, int level, uint32_t lo_bin, uint32_t hi_bin) {
  uint32_t lo = 0, hi = std::numeric_limits<uint32_t>::max();
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t d = digit(keys[i], level);
    lo = d == lo_bin ? std::max(lo, keys[i]) : lo;
    hi = d == hi_bin ? std::min(hi, keys[i]) : hi;
  }
  return {lo, hi};
}

// Copies the keys whose `level` digit is `bin` to out (which holds at least their count + 1).
int64_t compact(const uint32_t* keys, int64_t n, int level, uint32_t bin, uint32_t* out) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[m] = keys[i];  // branch-free: always write, advance only on a match
    m += digit(keys[i], level) == bin;
  }
  return m;
}

// Keys of ranks lo and hi (hi is lo or lo + 1) among keys[0, n), in place (keys is reordered).
KeyPair select_direct(uint32_t* keys, int64_t n, int64_t lo, int64_t hi) {
  std::nth_element(keys, keys + lo, keys + n);
  const uint32_t lo_key = keys[lo];
  const uint32_t hi_key = hi == lo ? lo_key : *std::min_element(keys + hi, keys + n);
  return {lo_key, hi_key};
}

// Keys of ranks lo and hi among src[0, n), whose digits above `level` are all equal and whose
// `level` digits are counted in hist. When the two ranks fall in different bins, one scan of src
// finds them. Otherwise the shared bin's keys are compacted into cand and refined there, in place,
// by the next digit (or by nth_element once few are left). src may be cand itself.
KeyPair select_in_bins(const uint32_t* src, int64_t n, int64_t lo, int64_t hi, int level, Histogram& hist,
                       std::vector<uint32_t>& cand) {
  while (true) {
    const int bins = static_cast<int>(kDigitMask[level]) + 1;
    const auto [lo_bin, below] = bin_of_rank(hist.data(), bins, lo);
    const uint32_t hi_bin = hi == lo ? lo_bin : bin_of_rank(hist.data(), bins, hi).first;
    if (lo_bin != hi_bin) return max_min_of_bins(src, n, level, lo_bin, hi_bin);
    const int64_t m = hist[lo_bin];
    if (src != cand.data() && static_cast<int64_t>(cand.size()) < m + 1) cand.resize(m + 1);
    // In place (src == cand) the write index never passes the read index.
    compact(src, n, level, lo_bin, cand.data());
    src = cand.data();
    n = m;
    lo -= below;
    hi -= below;
    if (level == kDigits - 1) return {src[0], src[0]};  // every digit fixed: all candidates are equal
    if (n <= kRefineDirect) return select_direct(cand.data(), n, lo, hi);
    ++level;
    histogram(src, n, level, hist);
  }
}

// --- one tensor, one thread -------------------------------------------------------------------------

struct Scratch {
  std::vector<uint32_t> keys, cand;
  Histogram hist;
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

template <typename T>
int64_t mask_with_keys(T* update, const uint32_t* keys, int64_t n, float thr) {
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = !(float_of(keys[i]) < thr);
    update[i] = keep ? update[i] : T(0);
    kept += keep;
  }
  return kept;
}

// Fills keys[0, n) and returns the number of non-finite scores; hist (if given) gets level 0.
template <typename T>
int64_t score_keys(const T* nat, const T* adv, int64_t n, Weights w, uint32_t* keys, Histogram* hist) {
  uint32_t nonfinite_bins = 0;
  if (hist != nullptr) {
    Histogram& h = *hist;
    std::fill(h.begin(), h.end(), 0u);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = key_of(score(nat[i], adv[i], w));
      keys[i] = key;
      ++h[digit(key, 0)];
    }
    // Digit 0 drops the sign bit, so every key with an all-ones exponent (inf or NaN) lands in the
    // top 16 bins and nothing else does.
    for (int b = kBins - 16; b < kBins; ++b) nonfinite_bins += h[b];
    return nonfinite_bins;
  }
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = key_of(score(nat[i], adv[i], w));
    keys[i] = key;
    nonfinite += key_is_nonfinite(key);
  }
  return nonfinite;
}

bool any_nan(const uint32_t* keys, int64_t n) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) nan |= key_is_nan(keys[i]);
  return nan;
}

template <typename T>
TensorResult mask_serial(const Entry& e, Weights w, double p) {
  TensorResult r;
  const int64_t n = e.n;
  if (n == 0) return r;
  T* update = e.update.data_ptr<T>();
  Scratch& s = thread_scratch();
  if (static_cast<int64_t>(s.keys.size()) < n) s.keys.resize(n);
  uint32_t* keys = s.keys.data();
  const bool direct = n < kDirect;
  r.nonfinite = score_keys(e.nat.data_ptr<T>(), e.adv.data_ptr<T>(), n, w, keys, direct ? nullptr : &s.hist);
  if (r.nonfinite > 0 && any_nan(keys, n)) {  // numpy returns NaN; s < NaN is false: nothing masked
    r.kept = n;
    return r;
  }
  const Interpolation ip = interpolation(n, p);
  KeyPair pair;
  if (direct) {
    if (static_cast<int64_t>(s.cand.size()) < n) s.cand.resize(n);
    std::copy(keys, keys + n, s.cand.data());
    pair = select_direct(s.cand.data(), n, ip.lo_rank, ip.hi_rank);
  } else {
    pair = select_in_bins(keys, n, ip.lo_rank, ip.hi_rank, 0, s.hist, s.cand);
  }
  r.threshold = threshold_from(pair.lo, pair.hi, ip.g);
  r.kept = mask_with_keys(update, keys, n, r.threshold);
  return r;
}

// --- one tensor, all threads ------------------------------------------------------------------------

template <typename T>
TensorResult mask_split(const Entry& e, Weights w, double p) {
  TensorResult r;
  const int64_t n = e.n;
  T* update = e.update.data_ptr<T>();
  const T* nat = e.nat.data_ptr<T>();
  const T* adv = e.adv.data_ptr<T>();
  const int threads = omp_get_max_threads();
  // Shared by this call's threads and reused across calls (no page faults on every step); the lock
  // serialises concurrent callers from different Python threads.
  static std::mutex lock;
  static std::vector<uint32_t> keys, cand;
  static std::vector<Histogram> hists;
  const std::lock_guard<std::mutex> guard(lock);
  keys.resize(n);
  hists.resize(threads);
  auto slice = [&](int t) {
    const int64_t chunk = (n + threads - 1) / threads;
    const int64_t begin = std::min(n, t * chunk);
    return std::pair<int64_t, int64_t>{begin, std::min(n, begin + chunk)};
  };

  int64_t nonfinite = 0;
#pragma omp parallel num_threads(threads) reduction(+ : nonfinite)
  {
    const int t = omp_get_thread_num();
    const auto [begin, end] = slice(t);
    nonfinite += score_keys(nat + begin, adv + begin, end - begin, w, keys.data() + begin, &hists[t]);
  }
  r.nonfinite = nonfinite;
  if (nonfinite > 0 && any_nan(keys.data(), n)) {
    r.kept = n;
    return r;
  }
  Histogram total{};
  for (int t = 0; t < threads; ++t)
    for (int b = 0; b < kBins; ++b) total[b] += hists[t][b];
  const Interpolation ip = interpolation(n, p);
  const auto [lo_bin, below] = bin_of_rank(total.data(), kBins, ip.lo_rank);
  const uint32_t hi_bin = bin_of_rank(total.data(), kBins, ip.hi_rank).first;
  KeyPair pair;
  if (lo_bin != hi_bin) {
    std::vector<KeyPair> parts(threads);
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      const auto [begin, end] = slice(t);
      parts[t] = max_min_of_bins(keys.data() + begin, end - begin, 0, lo_bin, hi_bin);
    }
    pair = parts[0];
    for (const KeyPair& q : parts) pair = {std::max(pair.lo, q.lo), std::min(pair.hi, q.hi)};
  } else {
    // Each slice's matches go to its own range of cand: offsets from the per-slice histograms.
    std::vector<int64_t> offset(threads + 1, 0);
    for (int t = 0; t < threads; ++t) offset[t + 1] = offset[t] + hists[t][lo_bin];
    cand.resize(offset[threads] + 1);
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      const auto [begin, end] = slice(t);
      std::vector<uint32_t> local(hists[t][lo_bin] + 1);  // the branch-free compact writes one past
      compact(keys.data() + begin, end - begin, 0, lo_bin, local.data());
      std::copy(local.begin(), local.end() - 1, cand.begin() + offset[t]);
    }
    const int64_t m = offset[threads];
    const int64_t lo = ip.lo_rank - below, hi = ip.hi_rank - below;
    if (m <= kRefineDirect) {
      pair = select_direct(cand.data(), m, lo, hi);
    } else {
      histogram(cand.data(), m, 1, total);
      pair = select_in_bins(cand.data(), m, lo, hi, 1, total, cand);
    }
  }
  const float thr = threshold_from(pair.lo, pair.hi, ip.g);
  r.threshold = thr;
  int64_t kept = 0;
#pragma omp parallel num_threads(threads) reduction(+ : kept)
  {
    const auto [begin, end] = slice(omp_get_thread_num());
    kept += mask_with_keys(update + begin, keys.data() + begin, end - begin, thr);
  }
  r.kept = kept;
  return r;
}

template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "cure::rgp_mask: unsupported dtype ", dtype, "; use float32, bfloat16 or float16");
  }
}

TensorResult mask_entry(const Entry& e, Weights w, double p, bool split) {
  TensorResult r;
  dispatch_float(e.update.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    r = split ? mask_split<T>(e, w, p) : mask_serial<T>(e, w, p);
  });
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_mask_cpu(at::TensorList updates, at::TensorList grads_nat,
                                                            at::TensorList grads_adv, double alpha, double p) {
  const int64_t count = static_cast<int64_t>(updates.size());
  TORCH_CHECK(static_cast<int64_t>(grads_nat.size()) == count && static_cast<int64_t>(grads_adv.size()) == count,
              "cure::rgp_mask: updates, grads_nat and grads_adv must have equal lengths");
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, "cure::rgp_mask: alpha must lie in [0, 1], got ", alpha);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "cure::rgp_mask: p must lie in [0, 1], got ", p);
  std::vector<Entry> entries;
  entries.reserve(count);
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& u = updates[i];
    TORCH_CHECK(u.device().is_cpu() && grads_nat[i].device().is_cpu() && grads_adv[i].device().is_cpu(),
                "cure::rgp_mask (CPU kernel): tensor ", i, " is not on the CPU");
    TORCH_CHECK(grads_nat[i].sizes() == u.sizes() && grads_adv[i].sizes() == u.sizes(),
                "cure::rgp_mask: shapes of tensor ", i, " differ");
    TORCH_CHECK(grads_nat[i].scalar_type() == u.scalar_type() && grads_adv[i].scalar_type() == u.scalar_type(),
                "cure::rgp_mask: dtypes of tensor ", i, " differ");
    TORCH_CHECK(u.numel() <= kMaxElements, "cure::rgp_mask (CPU kernel): tensor ", i, " has ", u.numel(),
                " elements; at most 2^32 - 1 per tensor are supported");
    entries.push_back({u.contiguous(), grads_nat[i].contiguous(), grads_adv[i].contiguous(), u.numel()});
    total += u.numel();
  }
  const Weights w{static_cast<float>(alpha), static_cast<float>(1.0 - alpha)};
  const int threads = omp_get_max_threads();
  std::vector<TensorResult> results(count);
  std::vector<int64_t> split, serial;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = entries[i].n;
    const bool big = threads > 1 && n >= kSplitMin && n * threads > total;
    (big ? split : serial).push_back(i);
  }
  for (const int64_t i : split) results[i] = mask_entry(entries[i], w, p, true);
  // Largest first: the greedy hand-out then balances the threads to within one small tensor.
  std::stable_sort(serial.begin(), serial.end(), [&](int64_t a, int64_t b) { return entries[a].n > entries[b].n; });
  const int64_t n_serial = static_cast<int64_t>(serial.size());
#pragma omp parallel for schedule(dynamic, 1) if (n_serial > 1)
  for (int64_t j = 0; j < n_serial; ++j) results[serial[j]] = mask_entry(entries[serial[j]], w, p, false);

  auto thresholds = at::empty({count}, at::TensorOptions().dtype(at::kFloat));
  auto kept = at::empty({count}, at::TensorOptions().dtype(at::kLong));
  auto nonfinite = at::empty({count}, at::TensorOptions().dtype(at::kLong));
  float* thr_out = thresholds.data_ptr<float>();
  int64_t* kept_out = kept.data_ptr<int64_t>();
  int64_t* nonfinite_out = nonfinite.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    thr_out[i] = results[i].threshold;
    kept_out[i] = results[i].kept;
    nonfinite_out[i] = results[i].nonfinite;
    // The kernel wrote into a contiguous copy where the caller's update was strided: write it back.
    if (!entries[i].update.is_same(updates[i])) updates[i].copy_(entries[i].update);
  }
  return {thresholds, kept, nonfinite};
}

}  // namespace cure

TORCH_LIBRARY_IMPL(cure, CPU, m) { m.impl("rgp_mask", &cure::rgp_mask_cpu); }
