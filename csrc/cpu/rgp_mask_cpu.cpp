// CPU kernel of cure::rgp_mask: exact per-tensor p-quantile masking of the update by Robust
// Gradient Prominence (paper Eq. 6), bit for bit equal to numpy.quantile (SPEC section 2).
//
// Selection works on the uint32 bit patterns of the float32 scores. Scores are >= 0 (or NaN), so
// their bits are ordered like their values; a NaN anywhere makes the threshold NaN and skips
// selection, so the order of NaN keys never matters. No sort of the data:
//   small tensors (< kSmallTensor elements): one thread per tensor; keys in a thread-local buffer,
//     std::nth_element for rank k, a min over the upper part for rank k+1, then the mask pass.
//   large tensors: all threads on one tensor.
//     pass 1  s = score, cached in a scratch buffer; per-thread histograms of the high 16 key bits.
//     pass 2  if ranks k and k+1 fall in different bins, they are the max of the first bin and the
//             min of the second; otherwise a histogram of the low 16 bits inside the shared bin.
//     pass 3  update[s < thr] = 0, counting kept entries.
// Memory moved per element of a large tensor: 8 B (grads) + 4 B (scores) in pass 1, 4 B in
// pass 2, 4 B + 2x the update's element size in pass 3.
//
// Compiled with -ffp-contract=off: the score and threshold arithmetic must not fuse into FMAs.
// Threads come from OpenMP (#pragma omp): the work splits unevenly (many tiny tensors next to a
// few large ones), which dynamic scheduling over tensors handles directly.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace cure {
namespace {

constexpr int64_t kSmallTensor = int64_t{1} << 17;  // below: nth_element in one thread
constexpr int kBits = 16;
constexpr int kBins = 1 << kBits;
constexpr uint32_t kLowMask = kBins - 1;

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

struct Weights {
  float nat;  // f32(alpha)
  float adv;  // f32(1 - alpha), 1 - alpha computed in double
};

// s = f32(alpha)*|g_nat| + f32(1-alpha)*|g_adv|, each product and the sum rounded to float.
template <typename T>
inline float score(const T* nat, const T* adv, int64_t i, Weights w) {
  const float x = w.nat * std::fabs(static_cast<float>(nat[i]));
  const float y = w.adv * std::fabs(static_cast<float>(adv[i]));
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

// numpy's _lerp in float32 with a float32 weight; NaN and inf propagate exactly as in numpy.
float threshold_from(uint32_t lo_key, uint32_t hi_key, double g) {
  const float a = float_of(lo_key);
  const float b = float_of(hi_key);
  const float d = b - a;
  if (g < 0.5) {
    const float step = d * static_cast<float>(g);
    return a + step;
  }
  const float step = d * static_cast<float>(1.0 - g);
  return b - step;
}

struct TensorResult {
  float threshold = std::numeric_limits<float>::quiet_NaN();
  int64_t kept = 0;
  int64_t nonfinite = 0;
};

// The three tensors of one entry, contiguous (copies where the caller's were not).
struct Entry {
  at::Tensor update, nat, adv;
  int64_t n;
};

template <typename T>
int64_t apply_mask(T* update, const T* nat, const T* adv, int64_t begin, int64_t end, Weights w, float thr) {
  int64_t kept = 0;
  for (int64_t i = begin; i < end; ++i) {
    if (score(nat, adv, i, w) < thr) {
      update[i] = T(0);
    } else {
      ++kept;
    }
  }
  return kept;
}

template <typename T>
TensorResult mask_small(const Entry& e, Weights w, double p) {
  TensorResult r;
  const int64_t n = e.n;
  if (n == 0) return r;
  T* update = e.update.data_ptr<T>();
  const T* nat = e.nat.data_ptr<T>();
  const T* adv = e.adv.data_ptr<T>();
  thread_local std::vector<uint32_t> keys;
  keys.resize(n);
  bool any_nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float s = score(nat, adv, i, w);
    keys[i] = key_of(s);
    if (!std::isfinite(s)) {
      ++r.nonfinite;
      any_nan = any_nan || std::isnan(s);
    }
  }
  if (any_nan) {  // numpy returns NaN; s < NaN is false everywhere: nothing masked
    r.kept = n;
    return r;
  }
  const Interpolation ip = interpolation(n, p);
  uint32_t lo, hi;
  if (ip.lo_rank == ip.hi_rank) {
    lo = hi = *std::max_element(keys.begin(), keys.begin() + n);
  } else {
    std::nth_element(keys.begin(), keys.begin() + ip.lo_rank, keys.begin() + n);
    lo = keys[ip.lo_rank];
    hi = *std::min_element(keys.begin() + ip.hi_rank, keys.begin() + n);
  }
  r.threshold = threshold_from(lo, hi, ip.g);
  r.kept = apply_mask(update, nat, adv, 0, n, w, r.threshold);
  return r;
}

// Smallest bin b with count(bins < b) + count(b) > rank; also returns the count below b.
std::pair<int, int64_t> bin_of_rank(const int64_t* hist, int64_t rank) {
  int64_t below = 0;
  for (int b = 0; b < kBins; ++b) {
    if (below + hist[b] > rank) return {b, below};
    below += hist[b];
  }
  TORCH_INTERNAL_ASSERT(false, "rank ", rank, " beyond the histogram total ", below);
}

template <typename T>
TensorResult mask_large(const Entry& e, Weights w, double p) {
  TensorResult r;
  const int64_t n = e.n;
  T* update = e.update.data_ptr<T>();
  const T* nat = e.nat.data_ptr<T>();
  const T* adv = e.adv.data_ptr<T>();
  const int threads = omp_get_max_threads();
  static std::vector<float> scores;  // reused across calls: no page faults on every step
  static std::vector<int64_t> hists;
  scores.resize(n);
  hists.resize(static_cast<size_t>(threads + 1) * kBins);
  float* s = scores.data();
  int64_t* total = hists.data() + static_cast<size_t>(threads) * kBins;

  int64_t nonfinite = 0, nans = 0;
#pragma omp parallel num_threads(threads) reduction(+ : nonfinite, nans)
  {
    int64_t* h = hists.data() + static_cast<size_t>(omp_get_thread_num()) * kBins;
    std::fill(h, h + kBins, 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float v = score(nat, adv, i, w);
      s[i] = v;
      ++h[key_of(v) >> kBits];
      if (!std::isfinite(v)) {
        ++nonfinite;
        nans += std::isnan(v);
      }
    }
  }
  r.nonfinite = nonfinite;
  if (nans > 0) {
    r.kept = n;
    return r;
  }
  std::fill(total, total + kBins, 0);
  for (int t = 0; t < threads; ++t) {
    const int64_t* h = hists.data() + static_cast<size_t>(t) * kBins;
    for (int b = 0; b < kBins; ++b) total[b] += h[b];
  }
  const Interpolation ip = interpolation(n, p);
  const auto [lo_bin, lo_below] = bin_of_rank(total, ip.lo_rank);
  const auto [hi_bin, hi_below] = bin_of_rank(total, ip.hi_rank);
  uint32_t lo_key, hi_key;
  if (lo_bin != hi_bin) {
    // Consecutive ranks in different bins: rank k is the largest key of its bin, k+1 the smallest of its bin.
    uint32_t lo_max = 0, hi_min = std::numeric_limits<uint32_t>::max();
#pragma omp parallel for num_threads(threads) reduction(max : lo_max) reduction(min : hi_min) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = key_of(s[i]);
      const uint32_t bin = key >> kBits;
      if (bin == static_cast<uint32_t>(lo_bin)) lo_max = std::max(lo_max, key);
      if (bin == static_cast<uint32_t>(hi_bin)) hi_min = std::min(hi_min, key);
    }
    lo_key = lo_max;
    hi_key = hi_min;
  } else {
    // Both ranks in one bin: histogram the low 16 bits of the keys in that bin.
#pragma omp parallel num_threads(threads)
    {
      int64_t* h = hists.data() + static_cast<size_t>(omp_get_thread_num()) * kBins;
      std::fill(h, h + kBins, 0);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t key = key_of(s[i]);
        if ((key >> kBits) == static_cast<uint32_t>(lo_bin)) ++h[key & kLowMask];
      }
    }
    std::fill(total, total + kBins, 0);
    for (int t = 0; t < threads; ++t) {
      const int64_t* h = hists.data() + static_cast<size_t>(t) * kBins;
      for (int b = 0; b < kBins; ++b) total[b] += h[b];
    }
    const uint32_t high = static_cast<uint32_t>(lo_bin) << kBits;
    lo_key = high | static_cast<uint32_t>(bin_of_rank(total, ip.lo_rank - lo_below).first);
    hi_key = high | static_cast<uint32_t>(bin_of_rank(total, ip.hi_rank - lo_below).first);
  }
  const float thr = threshold_from(lo_key, hi_key, ip.g);
  r.threshold = thr;
  int64_t kept = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : kept) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    if (s[i] < thr) {
      update[i] = T(0);
    } else {
      ++kept;
    }
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

TensorResult mask_entry(const Entry& e, Weights w, double p, bool large) {
  TensorResult r;
  dispatch_float(e.update.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    r = large ? mask_large<T>(e, w, p) : mask_small<T>(e, w, p);
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
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& u = updates[i];
    TORCH_CHECK(u.device().is_cpu() && grads_nat[i].device().is_cpu() && grads_adv[i].device().is_cpu(),
                "cure::rgp_mask (CPU kernel): tensor ", i, " is not on the CPU");
    TORCH_CHECK(grads_nat[i].sizes() == u.sizes() && grads_adv[i].sizes() == u.sizes(),
                "cure::rgp_mask: shapes of tensor ", i, " differ");
    TORCH_CHECK(grads_nat[i].scalar_type() == u.scalar_type() && grads_adv[i].scalar_type() == u.scalar_type(),
                "cure::rgp_mask: dtypes of tensor ", i, " differ");
    entries.push_back({u.contiguous(), grads_nat[i].contiguous(), grads_adv[i].contiguous(), u.numel()});
  }
  const Weights w{static_cast<float>(alpha), static_cast<float>(1.0 - alpha)};
  std::vector<TensorResult> results(count);
  std::vector<int64_t> small, large;
  for (int64_t i = 0; i < count; ++i) (entries[i].n < kSmallTensor ? small : large).push_back(i);

  const int64_t n_small = static_cast<int64_t>(small.size());
#pragma omp parallel for schedule(dynamic, 1) if (n_small > 1)
  for (int64_t j = 0; j < n_small; ++j) results[small[j]] = mask_entry(entries[small[j]], w, p, false);
  for (const int64_t i : large) results[i] = mask_entry(entries[i], w, p, true);

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
