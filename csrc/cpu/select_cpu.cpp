// Exact per-tensor threshold selection on the CPU (select_cpu.h; algorithm in docs/selection.md).
//
// Selection works on the uint32 bit patterns ("keys") of the float32 scores. Scores are >= +0 or
// NaN, so the keys of non-NaN scores are ordered like their values; a NaN anywhere makes the
// threshold NaN, so NaN keys never need an order. No sort of the data.
//
// Large tensors (n >= kBracketMin): the sampling bracket, reading the gradients once.
//   sample  kTiles tiles of kTile contiguous scores at fixed positions; the sample's order
//           statistics at ranks r_lo, r_hi (about 5 standard deviations either side of ranks k and
//           k+1) become the bracket keys lo <= hi.
//   pass    one pass over the gradients counts the keys < lo, == lo, inf/NaN, and compacts the keys
//           in (lo, hi] into a candidate buffer of n/16 entries (overflow: miss); for the mask and the
//           fused step it also writes each element's class (Classes in select_cpu.h), from which
//           masked_words decides s < thr in the apply pass without the gradients.
//   resolve each of ranks k, k+1 is lo (inside the run of keys equal to lo) or a candidate
//           (nth_element among the candidates); a rank below or above the bracket is a miss.
//   miss    the radix path below, on the same tensor: exact whatever the data.
// Smaller tensors, and the fallback (the pre-bracket kernel's selection, unchanged):
//   pass 1  s cached as keys in a thread-local buffer; histogram of key bits 30..19 (4096 bins,
//           16 KiB: stays in L1).
//   select  ranks k and k+1. When they fall in different bins they are the largest key of the first
//           bin and the smallest of the second: one scan of the cached keys. Otherwise the keys of
//           the shared bin are compacted into a small buffer and refined there by the next digits
//           (bits 18..7, then 6..0), or by nth_element once few are left.
//   Tensors below kDirect elements skip the histogram: nth_element on a copy of the keys.
// Scheduling: tensors are handed to threads largest first, no barrier between tensors. A tensor
// larger than its fair share of the total (n * threads > total) would leave the other threads
// idle, so it is split: every pass over its elements runs on per-thread slices.
//
// Compiled with -ffp-contract=off: the score and threshold arithmetic must not fuse into FMAs.
#include "select_cpu.h"

#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CURE_X86_AVX2 1
#endif

namespace cure {
namespace cpu {
namespace {

constexpr int64_t kDirect = 4096;           // below: nth_element on a copy of the keys
constexpr int64_t kBracketMin = 1 << 16;    // from here on: the sampling bracket
constexpr int64_t kSplitMin = 1 << 18;      // never split a tensor smaller than this over threads
constexpr int64_t kRefineDirect = 2048;     // compacted candidates below this: nth_element

// The bracket's sample: kTiles tiles of kTile contiguous elements; tile t starts at
// floor(t * n / kTiles) rounded down to a multiple of kTile. kBracketMin >= kTiles * kTile * 4.
constexpr int64_t kTile = 64;
constexpr int64_t kTiles = 256;
constexpr int64_t kSample = kTile * kTiles;  // 16384
constexpr double kSigmas = 5.0;
constexpr int64_t kCandidateDivisor = 16;  // candidate capacity: n / 16 keys
constexpr int64_t kBlock = 256;            // elements per block of the counting pass

// Three digits of a non-NaN key, most significant first (bit 31, the sign, is always 0).
constexpr int kDigits = 3;
constexpr int kShift[kDigits] = {19, 7, 0};
constexpr uint32_t kDigitMask[kDigits] = {0xFFF, 0xFFF, 0x7F};
constexpr int kBins = 4096;
using Histogram = std::array<uint32_t, kBins>;

inline uint32_t digit(uint32_t key, int level) { return (key >> kShift[level]) & kDigitMask[level]; }
inline bool key_is_nan(uint32_t key) { return (key & 0x7FFFFFFFu) > 0x7F800000u; }
inline bool key_is_nonfinite(uint32_t key) { return (key & 0x7F800000u) == 0x7F800000u; }

std::array<std::atomic<int64_t>, 5> g_counters{};  // tensors selected per Path

void count_path(Path path) { g_counters[static_cast<int>(path)].fetch_add(1, std::memory_order_relaxed); }

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

Selection nan_selection(int64_t nonfinite) {
  Selection r;
  r.nonfinite = nonfinite;
  r.path = Path::kNonFinite;
  return r;
}

struct KeyPair {
  uint32_t lo, hi;  // keys of ranks lo_rank and hi_rank
};

// --- the radix path ---------------------------------------------------------------------------------

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

// Keys of ranks r0 <= r1 among keys[0, n), all of which lie in [base, base + span]; keys is not modified.
// A histogram of the top 12 bits of key - base, then nth_element inside the bin(s) holding the two
// ranks; adjacent ranks in different bins are the largest key of one bin and the smallest of the next.
KeyPair select_two(const uint32_t* keys, int64_t n, int64_t r0, int64_t r1, uint32_t base, uint32_t span,
                   Histogram& hist, std::vector<uint32_t>& tmp) {
  if (n <= kRefineDirect) {
    // On a copy: the bracket's candidates stay in element order for the apply pass (Classes).
    if (static_cast<int64_t>(tmp.size()) < n) tmp.resize(n);
    uint32_t* t = tmp.data();
    std::copy(keys, keys + n, t);
    std::nth_element(t, t + r0, t + n);
    if (r1 == r0) return {t[r0], t[r0]};
    std::nth_element(t + r0 + 1, t + r1, t + n);
    return {t[r0], t[r1]};
  }
  const int width = span == 0 ? 0 : 32 - __builtin_clz(span);
  const int shift = std::max(0, width - 12);
  std::fill(hist.begin(), hist.end(), 0u);
  for (int64_t i = 0; i < n; ++i) ++hist[(keys[i] - base) >> shift];
  const auto [b0, below0] = bin_of_rank(hist.data(), kBins, r0);
  const auto [b1, below1] = bin_of_rank(hist.data(), kBins, r1);
  if (b0 != b1 && r1 == r0 + 1) {
    uint32_t lo = 0, hi = std::numeric_limits<uint32_t>::max();
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t d = (keys[i] - base) >> shift;
      lo = d == b0 ? std::max(lo, keys[i]) : lo;
      hi = d == b1 ? std::min(hi, keys[i]) : hi;
    }
    return {lo, hi};
  }
  // The keys of one bin, compacted into tmp; then the rank(s) inside it.
  auto gather = [&](uint32_t bin) {
    const int64_t m = hist[bin];
    if (static_cast<int64_t>(tmp.size()) < m + 1) tmp.resize(m + 1);
    int64_t j = 0;
    for (int64_t i = 0; i < n; ++i) {
      tmp[j] = keys[i];
      j += ((keys[i] - base) >> shift) == bin;
    }
    return m;
  };
  const int64_t m0 = gather(b0);
  const int64_t i0 = r0 - below0;
  std::nth_element(tmp.begin(), tmp.begin() + i0, tmp.begin() + m0);
  const uint32_t k0 = tmp[i0];
  if (r1 == r0) return {k0, k0};
  if (b0 == b1) {
    const int64_t i1 = r1 - below0;
    std::nth_element(tmp.begin() + i0 + 1, tmp.begin() + i1, tmp.begin() + m0);
    return {k0, tmp[i1]};
  }
  const int64_t m1 = gather(b1);
  const int64_t i1 = r1 - below1;
  std::nth_element(tmp.begin(), tmp.begin() + i1, tmp.begin() + m1);
  return {k0, tmp[i1]};
}

struct Scratch {
  std::vector<uint32_t> keys, cand, sample, tmp;
  Histogram hist;
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Fills keys[0, n) and returns the number of non-finite scores; hist (if given) gets level 0.
template <typename T>
int64_t score_keys(const T* nat, const T* adv, int64_t n, Weights w, uint32_t* keys, Histogram* hist) {
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
    int64_t nonfinite_bins = 0;
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
Selection radix_serial(const T* nat, const T* adv, int64_t n, Weights w, double p, Path path) {
  Scratch& s = thread_scratch();
  if (static_cast<int64_t>(s.keys.size()) < n) s.keys.resize(n);
  uint32_t* keys = s.keys.data();
  const bool direct = n < kDirect;
  const int64_t nonfinite = score_keys(nat, adv, n, w, keys, direct ? nullptr : &s.hist);
  if (nonfinite > 0 && any_nan(keys, n)) return nan_selection(nonfinite);
  const Interpolation ip = interpolation(n, p);
  KeyPair pair;
  if (direct) {
    if (static_cast<int64_t>(s.cand.size()) < n) s.cand.resize(n);
    std::copy(keys, keys + n, s.cand.data());
    pair = select_direct(s.cand.data(), n, ip.lo_rank, ip.hi_rank);
  } else {
    pair = select_in_bins(keys, n, ip.lo_rank, ip.hi_rank, 0, s.hist, s.cand);
  }
  return {threshold_from(pair.lo, pair.hi, ip.g), nonfinite, path};
}

// Buffers of the split paths: shared by one call's threads and reused across calls (no page faults
// on every step); the lock serialises concurrent callers from different Python threads.
std::mutex g_split_lock;

template <typename T>
Selection radix_split(const T* nat, const T* adv, int64_t n, Weights w, double p, Path path) {
  const int threads = omp_get_max_threads();
  static std::vector<uint32_t> keys, cand;
  static std::vector<Histogram> hists;
  keys.resize(n);
  hists.resize(threads);

  int64_t nonfinite = 0;
#pragma omp parallel num_threads(threads) reduction(+ : nonfinite)
  {
    const int t = omp_get_thread_num();
    const auto [begin, end] = slice_of(n, threads, t);
    nonfinite += score_keys(nat + begin, adv + begin, end - begin, w, keys.data() + begin, &hists[t]);
  }
  if (nonfinite > 0 && any_nan(keys.data(), n)) return nan_selection(nonfinite);
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
      const auto [begin, end] = slice_of(n, threads, t);
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
      const auto [begin, end] = slice_of(n, threads, t);
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
  return {threshold_from(pair.lo, pair.hi, ip.g), nonfinite, path};
}

// --- the sampling bracket ---------------------------------------------------------------------------

struct Bracket {
  uint32_t lo, hi;
};

// Sample rank r_lo (or r_hi) for population rank `rank` of n, at fraction f = rank / n of the sample:
// f*m -+ kSigmas * sqrt(f*(1-f)*m), one further rank outwards.
int64_t sample_rank_below(int64_t rank, int64_t n) {
  const double f = static_cast<double>(rank) / static_cast<double>(n);
  const double m = static_cast<double>(kSample);
  return static_cast<int64_t>(std::floor(m * f - kSigmas * std::sqrt(m * f * (1.0 - f)))) - 1;
}

int64_t sample_rank_above(int64_t rank, int64_t n) {
  const double f = static_cast<double>(rank) / static_cast<double>(n);
  const double m = static_cast<double>(kSample);
  return static_cast<int64_t>(std::ceil(m * f + kSigmas * std::sqrt(m * f * (1.0 - f)))) + 1;
}

int64_t tile_start(int64_t t, int64_t n) { return (t * n / kTiles) / kTile * kTile; }

template <typename T>
Bracket sample_bracket(const T* nat, const T* adv, int64_t n, Weights w, const Interpolation& ip, Scratch& s) {
  s.sample.resize(kSample);
  uint32_t* out = s.sample.data();
  for (int64_t t = 0; t < kTiles; ++t) {
    const int64_t start = tile_start(t, n);
    for (int64_t j = 0; j < kTile; ++j) out[t * kTile + j] = key_of(score(nat[start + j], adv[start + j], w));
  }
  const int64_t r_lo = sample_rank_below(ip.lo_rank, n);
  const int64_t r_hi = sample_rank_above(ip.hi_rank, n);
  Bracket b{0u, std::numeric_limits<uint32_t>::max()};  // open at a clamped end
  const bool has_lo = r_lo >= 0, has_hi = r_hi <= kSample - 1;
  if (!has_lo && !has_hi) return b;
  uint32_t lo_key = std::numeric_limits<uint32_t>::max(), hi_key = 0;
  for (int64_t i = 0; i < kSample; ++i) {
    lo_key = std::min(lo_key, out[i]);
    hi_key = std::max(hi_key, out[i]);
  }
  const int64_t r0 = has_lo ? r_lo : r_hi, r1 = has_hi ? r_hi : r_lo;
  const KeyPair pair = select_two(out, kSample, r0, r1, lo_key, hi_key - lo_key, s.hist, s.tmp);
  if (has_lo) b.lo = pair.lo;
  if (has_hi) b.hi = pair.hi;
  return b;
}

struct BracketCounts {
  int64_t lt = 0, eq = 0, mid = 0, nonfinite = 0, nan = 0;
  bool overflow = false;
};

// One block of keys, starting at a multiple of 8 elements of its slice: counts (< lo, == lo, inf or NaN,
// NaN) added to counts[0..3], the keys in (lo, hi] appended to out[m...] (which has room for len + 8
// more), and, where low and mid are given, the class bits of its elements (Classes; low and mid point at
// the byte of the block's first element). Returns the new m.
int64_t count_block(const uint32_t* keys, int64_t len, Bracket b, uint32_t* out, int64_t m, int64_t* counts,
                    uint8_t* low, uint8_t* mid) {
  uint32_t lt = 0, eq = 0, nonfinite = 0, nan = 0;
  for (int64_t j = 0; j < len; ++j) {  // vectorised
    const uint32_t key = keys[j];
    lt += key < b.lo;
    eq += key == b.lo;
    nonfinite += (key & 0x7F800000u) == 0x7F800000u;
    nan += (key & 0x7FFFFFFFu) > 0x7F800000u;
  }
  for (int64_t j = 0; j < len; ++j) {  // branch-free compaction
    const uint32_t key = keys[j];
    out[m] = key;
    m += (key > b.lo) & (key <= b.hi);
  }
  if (low != nullptr) {
    for (int64_t g = 0; g < len; g += 8) {
      uint32_t l = 0, d = 0;
      for (int64_t j = g; j < std::min(len, g + 8); ++j) {
        l |= static_cast<uint32_t>(keys[j] <= b.lo) << (j - g);
        d |= static_cast<uint32_t>((keys[j] > b.lo) & (keys[j] <= b.hi)) << (j - g);
      }
      low[g / 8] = static_cast<uint8_t>(l);
      mid[g / 8] = static_cast<uint8_t>(d);
    }
  }
  counts[0] += lt;
  counts[1] += eq;
  counts[2] += nonfinite;
  counts[3] += nan;
  return m;
}

#ifdef CURE_X86_AVX2
// For every 8-bit mask, the lanes whose bit is set, in order: the permutation that packs them.
struct CompactTable {
  alignas(32) uint32_t lanes[256][8];
  CompactTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask >> lane & 1) lanes[mask][k++] = static_cast<uint32_t>(lane);
      for (; k < 8; ++k) lanes[mask][k] = 0;
    }
  }
};
const CompactTable g_compact_table;
const bool g_has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
const bool g_has_bmi2 = g_has_avx2 && __builtin_cpu_supports("bmi2");

// count_block with AVX2, 8 keys per step, compaction by a table-driven lane permutation. FLOATS: the keys
// are the scores of x and y (float32 g_nat, g_adv), computed in registers (no FMA: -ffp-contract=off, and
// the same operations as score()); otherwise they are read from keys. The inf/NaN counts are taken from a
// running maximum of the keys: only a block holding a key >= +inf (or a NaN) is counted key by key.
template <bool FLOATS>
__attribute__((target("avx2,popcnt"))) int64_t count_block_avx2(const uint32_t* keys, const float* x, const float* y,
                                                               Weights w, int64_t len, Bracket b, uint32_t* out,
                                                               int64_t m, int64_t* counts, uint8_t* low, uint8_t* mid) {
  const __m256i bias = _mm256_set1_epi32(static_cast<int>(0x80000000u));  // unsigned order as signed
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(b.lo ^ 0x80000000u));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(b.hi ^ 0x80000000u));
  const __m256i lo_raw = _mm256_set1_epi32(static_cast<int>(b.lo));
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 w_nat = _mm256_set1_ps(w.nat), w_adv = _mm256_set1_ps(w.adv);
  __m256i lt = _mm256_setzero_si256(), eq = lt, top = lt;
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256i k;
    if constexpr (FLOATS) {
      const __m256 sx = _mm256_mul_ps(w_nat, _mm256_and_ps(abs_mask, _mm256_loadu_ps(x + j)));
      const __m256 sy = _mm256_mul_ps(w_adv, _mm256_and_ps(abs_mask, _mm256_loadu_ps(y + j)));
      k = _mm256_castps_si256(_mm256_add_ps(sx, sy));
    } else {
      k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
    }
    const __m256i kb = _mm256_xor_si256(k, bias);
    lt = _mm256_sub_epi32(lt, _mm256_cmpgt_epi32(lo, kb));
    eq = _mm256_sub_epi32(eq, _mm256_cmpeq_epi32(k, lo_raw));
    top = _mm256_max_epu32(top, k);
    const __m256i above_lo = _mm256_cmpgt_epi32(kb, lo);
    const __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(kb, hi), above_lo);
    const unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(in)));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(g_compact_table.lanes[mask]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m), _mm256_permutevar8x32_epi32(k, perm));
    m += _mm_popcnt_u32(mask);
    if (low != nullptr) {
      low[j / 8] = static_cast<uint8_t>(~static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(above_lo))));
      mid[j / 8] = static_cast<uint8_t>(mask);
    }
  }
  alignas(32) uint32_t sums[3][8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums[0]), lt);
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums[1]), eq);
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums[2]), top);
  uint32_t largest = 0;
  for (int lane = 0; lane < 8; ++lane) {
    counts[0] += sums[0][lane];
    counts[1] += sums[1][lane];
    largest = std::max(largest, sums[2][lane]);
  }
  if (largest >= 0x7F800000u) {  // +inf, or a NaN (of either sign): count them
    for (int64_t i = 0; i < j; ++i) {
      const uint32_t key = FLOATS ? key_of(score(x[i], y[i], w)) : keys[i];
      counts[2] += (key & 0x7F800000u) == 0x7F800000u;
      counts[3] += (key & 0x7FFFFFFFu) > 0x7F800000u;
    }
  }
  if (j == len) return m;  // (a call with nothing left still costs a store-forwarding stall on counts)
  uint32_t rest[8];
  if constexpr (FLOATS) {
    for (int64_t i = j; i < len; ++i) rest[i - j] = key_of(score(x[i], y[i], w));
  } else {
    std::copy(keys + j, keys + len, rest);
  }
  return count_block(rest, len - j, b, out, m, counts, low == nullptr ? nullptr : low + j / 8,
                     mid == nullptr ? nullptr : mid + j / 8);
}
#endif

// One pass: counts of keys < lo, == lo, inf/NaN and NaN; the keys in (lo, hi] compacted into cand,
// which has room for cap + kBlock + 8 keys. Stops early (overflow) once more than cap keys were compacted.
// With keep, also the class planes of the n elements and the first candidate of every apply chunk
// (Classes; cand is then keep->keys).
template <typename T>
BracketCounts count_and_compact(const T* nat, const T* adv, int64_t n, Weights w, Bracket b, uint32_t* cand,
                                int64_t cap, Classes::Slice* keep) {
  BracketCounts c;
  alignas(32) uint32_t keys[kBlock];
  int64_t counts[4] = {0, 0, 0, 0};
  int64_t m = 0;
  uint8_t* low = nullptr;
  uint8_t* mid = nullptr;
  if (keep != nullptr) {
    const int64_t bytes = (n + 63) / 64 * 8;  // whole 64-bit words
    keep->low.resize(bytes);
    keep->mid.resize(bytes);
    // Bytes past the last element's read as "high": zero (the pass writes every byte before them).
    std::fill(keep->low.begin() + n / 8, keep->low.end(), uint8_t{0});
    std::fill(keep->mid.begin() + n / 8, keep->mid.end(), uint8_t{0});
    keep->chunk_key.assign((n + kApplyChunk - 1) / kApplyChunk + 1, 0);
    low = keep->low.data();
    mid = keep->mid.data();
  }
  static_assert(kApplyChunk % kBlock == 0, "apply chunks start at block boundaries");
  for (int64_t base = 0; base < n; base += kBlock) {
    const int64_t len = std::min(kBlock, n - base);
    const T* x = nat + base;
    const T* y = adv + base;
    if (keep != nullptr && base % kApplyChunk == 0) keep->chunk_key[base / kApplyChunk] = m;
    uint8_t* low_at = low == nullptr ? nullptr : low + base / 8;
    uint8_t* mid_at = mid == nullptr ? nullptr : mid + base / 8;
#ifdef CURE_X86_AVX2
    if (g_has_avx2) {
      if constexpr (std::is_same_v<T, float>) {
        m = count_block_avx2<true>(nullptr, x, y, w, len, b, cand, m, counts, low_at, mid_at);
      } else {
        for (int64_t j = 0; j < len; ++j) keys[j] = key_of(score(x[j], y[j], w));
        m = count_block_avx2<false>(keys, nullptr, nullptr, w, len, b, cand, m, counts, low_at, mid_at);
      }
    } else
#endif
    {
      for (int64_t j = 0; j < len; ++j) keys[j] = key_of(score(x[j], y[j], w));
      m = count_block(keys, len, b, cand, m, counts, low_at, mid_at);
    }
    if (m > cap) {
      c.overflow = true;
      break;
    }
  }
  if (keep != nullptr) keep->chunk_key.back() = m;
  c.lt = counts[0];
  c.eq = counts[1];
  c.nonfinite = counts[2];
  c.nan = counts[3];
  c.mid = m;
  return c;
}

int64_t candidate_capacity(int64_t n) { return n / kCandidateDivisor; }

// Resolves ranks k and k+1 from the bracket's counts and candidates; false on a miss.
bool resolve(const BracketCounts& c, Bracket b, const uint32_t* cand, const Interpolation& ip, Scratch& s,
             KeyPair& out) {
  if (c.overflow) return false;
  const int64_t eq_end = c.lt + c.eq, mid_end = eq_end + c.mid;
  const int64_t r0 = ip.lo_rank, r1 = ip.hi_rank;
  if (r0 < c.lt || r1 >= mid_end) return false;
  if (r1 < eq_end) {
    out = {b.lo, b.lo};
  } else if (r0 < eq_end) {
    const int64_t i1 = r1 - eq_end;
    out = {b.lo, select_two(cand, c.mid, i1, i1, b.lo + 1, b.hi - b.lo - 1, s.hist, s.tmp).hi};
  } else {
    out = select_two(cand, c.mid, r0 - eq_end, r1 - eq_end, b.lo + 1, b.hi - b.lo - 1, s.hist, s.tmp);
  }
  return true;
}

void keep_bracket(Classes* keep, Bracket b, const BracketCounts& c) {
  keep->valid = true;
  keep->lo = b.lo;
  keep->hi = b.hi;
  keep->any_below = c.lt > 0;
}

template <typename T>
Selection bracket_serial(const T* nat, const T* adv, int64_t n, Weights w, double p, Classes* keep) {
  Scratch& s = thread_scratch();
  const Interpolation ip = interpolation(n, p);
  const Bracket b = sample_bracket(nat, adv, n, w, ip, s);
  const int64_t cap = candidate_capacity(n);
  Classes::Slice* slice = nullptr;
  if (keep != nullptr) {
    keep->slices.resize(1);
    keep->slice_len = n;
    slice = &keep->slices[0];
  }
  std::vector<uint32_t>& cand = slice != nullptr ? slice->keys : s.cand;
  if (static_cast<int64_t>(cand.size()) < cap + kBlock + 8) cand.resize(cap + kBlock + 8);
  const BracketCounts c = count_and_compact(nat, adv, n, w, b, cand.data(), cap, slice);
  if (!c.overflow && c.nan > 0) return nan_selection(c.nonfinite);
  KeyPair pair;
  if (!resolve(c, b, cand.data(), ip, s, pair)) return radix_serial(nat, adv, n, w, p, Path::kFallback);
  if (keep != nullptr) keep_bracket(keep, b, c);
  return {threshold_from(pair.lo, pair.hi, ip.g), c.nonfinite, Path::kBracket};
}

template <typename T>
Selection bracket_split(const T* nat, const T* adv, int64_t n, Weights w, double p, Classes* keep) {
  const int threads = omp_get_max_threads();
  static std::vector<std::vector<uint32_t>> slices;
  static std::vector<uint32_t> cand;
  Scratch& s = thread_scratch();
  const Interpolation ip = interpolation(n, p);
  const Bracket b = sample_bracket(nat, adv, n, w, ip, s);
  const int64_t cap = candidate_capacity(n);
  slices.resize(threads);
  if (keep != nullptr) {
    keep->slices.resize(threads);
    keep->slice_len = slice_length(n, threads);
  }
  std::vector<BracketCounts> parts(threads);
  auto buffer_of = [&](int t) -> std::vector<uint32_t>& { return keep != nullptr ? keep->slices[t].keys : slices[t]; };
#pragma omp parallel num_threads(threads)
  // Every slice is counted even if the team has fewer threads than asked for.
  for (int t = omp_get_thread_num(); t < threads; t += omp_get_num_threads()) {
    const auto [begin, end] = slice_of(n, threads, t);
    std::vector<uint32_t>& mine = buffer_of(t);
    if (static_cast<int64_t>(mine.size()) < cap + kBlock + 8) mine.resize(cap + kBlock + 8);
    parts[t] = count_and_compact(nat + begin, adv + begin, end - begin, w, b, mine.data(), cap,
                                 keep != nullptr ? &keep->slices[t] : nullptr);
  }
  BracketCounts c;
  for (const BracketCounts& q : parts) {
    c.lt += q.lt;
    c.eq += q.eq;
    c.mid += q.mid;
    c.nonfinite += q.nonfinite;
    c.nan += q.nan;
    c.overflow |= q.overflow;
  }
  c.overflow |= c.mid > cap;
  if (!c.overflow && c.nan > 0) return nan_selection(c.nonfinite);
  KeyPair pair;
  if (!c.overflow) {
    cand.resize(c.mid);
    int64_t offset = 0;
    for (int t = 0; t < threads; ++t) {
      std::copy(buffer_of(t).begin(), buffer_of(t).begin() + parts[t].mid, cand.begin() + offset);
      offset += parts[t].mid;
    }
  }
  if (!resolve(c, b, cand.data(), ip, s, pair)) return radix_split(nat, adv, n, w, p, Path::kFallback);
  if (keep != nullptr) keep_bracket(keep, b, c);
  return {threshold_from(pair.lo, pair.hi, ip.g), c.nonfinite, Path::kBracket};
}

// --- the apply pass from the classes ----------------------------------------------------------------

// masked_words for one chunk of a slice, element by element: low/mid its class bytes, keys its mid keys.
int64_t masked_words_generic(const uint8_t* low, const uint8_t* mid, const uint32_t* keys, int64_t len,
                             bool low_masked, float thr, uint64_t* words) {
  int64_t total = 0;
  std::fill(words, words + (len + 63) / 64, uint64_t{0});
  for (int64_t i = 0; i < len; ++i) {
    const int bit = static_cast<int>(i & 7);
    bool masked = low_masked && ((low[i >> 3] >> bit) & 1);
    if ((mid[i >> 3] >> bit) & 1) masked = float_of(*keys++) < thr;
    words[i >> 6] |= static_cast<uint64_t>(masked) << (i & 63);
    total += masked;
  }
  return total;
}

#ifdef CURE_X86_AVX2
// The same, 64 elements at a time: the mid keys' decisions packed into a bit stream (8 compares per
// step), then per 64-element word masked = (low if thr > lo) | pdep(next popcount(mid) decisions, mid).
__attribute__((target("avx2,bmi2,popcnt"))) int64_t masked_words_bmi2(const uint8_t* low, const uint8_t* mid,
                                                                     const uint32_t* keys, int64_t count,
                                                                     int64_t len, bool low_masked, float thr,
                                                                     uint64_t* words) {
  uint64_t decisions[kApplyChunk / 64 + 2];
  auto* packed = reinterpret_cast<uint8_t*>(decisions);
  const int64_t groups = (count + 7) / 8;
  const __m256 t = _mm256_set1_ps(thr);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k = 8 * g;
    __m256 v;
    if (k + 8 <= count) {
      v = _mm256_loadu_ps(reinterpret_cast<const float*>(keys + k));
    } else {  // the last keys: no read past them
      alignas(32) uint32_t rest[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::copy(keys + k, keys + count, rest);
      v = _mm256_load_ps(reinterpret_cast<const float*>(rest));
    }
    packed[g] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_LT_OQ)));
  }
  std::fill(packed + groups, packed + sizeof decisions, uint8_t{0});
  const uint64_t low_fill = low_masked ? ~uint64_t{0} : 0;
  int64_t at = 0;  // bits of `decisions` consumed
  int64_t total = 0;
  for (int64_t word = 0; word * 64 < len; ++word) {
    uint64_t l, m;
    std::memcpy(&l, low + 8 * word, 8);
    std::memcpy(&m, mid + 8 * word, 8);
    const int64_t w = at >> 6, shift = at & 63;
    uint64_t next = decisions[w] >> shift;
    if (shift != 0) next |= decisions[w + 1] << (64 - shift);
    at += _mm_popcnt_u64(m);
    words[word] = (l & low_fill) | _pdep_u64(next, m);  // (past the chunk's end: zero planes, zero bits)
    total += _mm_popcnt_u64(words[word]);
  }
  return total;
}

// For every 8-bit mask, its bits as eight all-ones/all-zeros 32-bit lanes.
struct LaneTable {
  alignas(32) uint32_t lanes[256][8];
  LaneTable() {
    for (int mask = 0; mask < 256; ++mask)
      for (int lane = 0; lane < 8; ++lane) lanes[mask][lane] = (mask >> lane & 1) ? ~0u : 0u;
  }
};
const LaneTable g_lane_table;

// Eight elements' bits to eight bytes at a time: pdep with 0x0101...01.
__attribute__((target("bmi2"))) void bytes_of_words_bmi2(const uint64_t* words, int64_t len, uint8_t* bytes) {
  const auto* bits = reinterpret_cast<const uint8_t*>(words);  // byte b: elements 8b .. 8b + 7
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const uint64_t spread = _pdep_u64(bits[j / 8], 0x0101010101010101ull);
    std::memcpy(bytes + j, &spread, 8);
  }
  for (; j < len; ++j) bytes[j] = static_cast<uint8_t>((words[j >> 6] >> (j & 63)) & 1);
}

__attribute__((target("avx2"))) void zero_f32_avx2(float* update, const uint64_t* words, int64_t len) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(words);  // byte b: elements 8b .. 8b + 7
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m256 lanes = _mm256_load_ps(reinterpret_cast<const float*>(g_lane_table.lanes[bytes[j / 8]]));
    _mm256_storeu_ps(update + j, _mm256_andnot_ps(lanes, _mm256_loadu_ps(update + j)));
  }
  for (; j < len; ++j) update[j] = (words[j >> 6] >> (j & 63)) & 1 ? 0.0f : update[j];
}
#endif

// --- scheduling -------------------------------------------------------------------------------------

template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "cure (CPU kernel): unsupported dtype ", dtype, "; use float32, bfloat16 or float16");
  }
}

Selection select_one(const SelectInput& in, Weights w, double p, bool split, Classes* keep) {
  Selection r;
  if (keep != nullptr) keep->valid = false;
  if (in.n == 0) return r;
  dispatch_float(in.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* nat = static_cast<const T*>(in.nat);
    const T* adv = static_cast<const T*>(in.adv);
    if (in.n < kBracketMin) {
      r = radix_serial(nat, adv, in.n, w, p, Path::kDirect);
    } else if (split) {
      const std::lock_guard<std::mutex> guard(g_split_lock);
      r = bracket_split(nat, adv, in.n, w, p, keep);
    } else {
      r = bracket_serial(nat, adv, in.n, w, p, keep);
    }
  });
  count_path(r.path);
  return r;
}

}  // namespace

std::vector<Selection> select_thresholds(const std::vector<SelectInput>& inputs, Weights w, double p,
                                         const AfterSelect& after, std::vector<Classes>* classes) {
  const int64_t count = static_cast<int64_t>(inputs.size());
  if (classes != nullptr) classes->resize(count);
  auto keep_of = [&](int64_t i) { return classes != nullptr ? &(*classes)[i] : nullptr; };
  int64_t total = 0;
  for (const SelectInput& in : inputs) total += in.n;
  const int threads = omp_get_max_threads();
  std::vector<Selection> results(count);
  std::vector<int64_t> split, serial;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = inputs[i].n;
    const bool big = threads > 1 && n >= kSplitMin && n * threads > total;
    (big ? split : serial).push_back(i);
  }
  for (const int64_t i : split) {
    results[i] = select_one(inputs[i], w, p, true, keep_of(i));
    if (after) after(i, results[i], true);
  }
  // Largest first: the greedy hand-out then balances the threads to within one small tensor.
  std::stable_sort(serial.begin(), serial.end(), [&](int64_t a, int64_t b) { return inputs[a].n > inputs[b].n; });
  const int64_t n_serial = static_cast<int64_t>(serial.size());
#pragma omp parallel for schedule(dynamic, 1) if (n_serial > 1)
  for (int64_t j = 0; j < n_serial; ++j) {
    const int64_t i = serial[j];
    results[i] = select_one(inputs[i], w, p, false, keep_of(i));
    if (after) after(i, results[i], false);
  }
  return results;
}

namespace {
std::array<std::atomic<int64_t>, 2> g_apply_counters{};  // [from the classes, from the scores]
std::mutex g_pool_lock;
std::vector<std::unique_ptr<std::vector<Classes>>> g_pool;  // idle leases

bool decides(const Classes& c, float thr) {
  if (!c.valid || !(thr >= 0.0f)) return false;  // NaN (masks nothing anyway) or -0
  const uint32_t t = key_of(thr);
  return t >= c.lo && t <= c.hi && (t > c.lo || !c.any_below);
}

// Bit j of words[w] = 1 where element begin + 64w + j has s < thr, for one apply chunk (bits past end
// are 0); decides(c, thr) holds. Returns the number of elements masked.
int64_t masked_words(const Classes& c, int64_t begin, int64_t end, float thr, uint64_t* words) {
  const int64_t s = begin / c.slice_len, offset = begin - s * c.slice_len;
  const Classes::Slice& slice = c.slices[s];
  const int64_t chunk = offset / kApplyChunk;
  TORCH_INTERNAL_ASSERT(offset % kApplyChunk == 0 && end - begin <= kApplyChunk, "not an apply chunk: [", begin,
                        ", ", end, ")");
  const uint8_t* low = slice.low.data() + offset / 8;
  const uint8_t* mid = slice.mid.data() + offset / 8;
  const uint32_t* keys = slice.keys.data() + slice.chunk_key[chunk];
  const int64_t count = slice.chunk_key[chunk + 1] - slice.chunk_key[chunk];
  const bool low_masked = float_of(c.lo) < thr;
#ifdef CURE_X86_AVX2
  if (g_has_bmi2) return masked_words_bmi2(low, mid, keys, count, end - begin, low_masked, thr, words);
#endif
  return masked_words_generic(low, mid, keys, end - begin, low_masked, thr, words);
}

uint64_t* chunk_words() {
  thread_local std::vector<uint64_t> buffer(kApplyChunk / 64);
  return buffer.data();
}

}  // namespace

const Classes* deciding_classes(const std::vector<Classes>& classes, int64_t i, float thr) {
  const bool by_classes = i < static_cast<int64_t>(classes.size()) && decides(classes[i], thr);
  g_apply_counters[by_classes ? 0 : 1].fetch_add(1, std::memory_order_relaxed);
  return by_classes ? &classes[i] : nullptr;
}

const uint8_t* masked_bytes(const Classes& c, int64_t begin, int64_t end, float thr) {
  uint64_t* words = chunk_words();
  masked_words(c, begin, end, thr, words);
  thread_local std::vector<uint8_t> bytes(kApplyChunk);
  const int64_t len = end - begin;
#ifdef CURE_X86_AVX2
  if (g_has_bmi2) {
    bytes_of_words_bmi2(words, len, bytes.data());
    return bytes.data();
  }
#endif
  for (int64_t j = 0; j < len; ++j) bytes[j] = static_cast<uint8_t>((words[j >> 6] >> (j & 63)) & 1);
  return bytes.data();
}

int64_t mask_f32(const Classes& c, int64_t begin, int64_t end, float thr, float* update) {
  uint64_t* words = chunk_words();
  const int64_t len = end - begin, masked = masked_words(c, begin, end, thr, words);
#ifdef CURE_X86_AVX2
  if (g_has_avx2) {
    zero_f32_avx2(update, words, len);
    return len - masked;
  }
#endif
  for (int64_t j = 0; j < len; ++j) update[j] = (words[j >> 6] >> (j & 63)) & 1 ? 0.0f : update[j];
  return len - masked;
}


ClassesLease::ClassesLease() {
  const std::lock_guard<std::mutex> guard(g_pool_lock);
  if (g_pool.empty()) {
    held_ = std::make_unique<std::vector<Classes>>();
  } else {
    held_ = std::move(g_pool.back());
    g_pool.pop_back();
  }
}

ClassesLease::~ClassesLease() {
  const std::lock_guard<std::mutex> guard(g_pool_lock);
  g_pool.push_back(std::move(held_));
}

at::Tensor apply_counters_cpu(bool reset) {
  auto out = at::empty({static_cast<int64_t>(g_apply_counters.size())}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t i = 0; i < g_apply_counters.size(); ++i)
    o[i] = reset ? g_apply_counters[i].exchange(0) : g_apply_counters[i].load();
  return out;
}

// Tensors selected so far by each path: [empty, direct, bracket, fallback, nonfinite]. With reset,
// the counters restart from zero after being read. For benchmarks and tests of the fallback rate.
at::Tensor selection_counters_cpu(bool reset) {
  auto out = at::empty({static_cast<int64_t>(g_counters.size())}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t i = 0; i < g_counters.size(); ++i) o[i] = reset ? g_counters[i].exchange(0) : g_counters[i].load();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_stats(const std::vector<Selection>& selections,
                                                          const std::vector<int64_t>& kept_count) {
  const int64_t count = static_cast<int64_t>(selections.size());
  auto thresholds = at::empty({count}, at::TensorOptions().dtype(at::kFloat));
  auto kept = at::empty({count}, at::TensorOptions().dtype(at::kLong));
  auto nonfinite = at::empty({count}, at::TensorOptions().dtype(at::kLong));
  float* thr_out = thresholds.data_ptr<float>();
  int64_t* kept_out = kept.data_ptr<int64_t>();
  int64_t* nonfinite_out = nonfinite.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    thr_out[i] = selections[i].threshold;
    kept_out[i] = kept_count[i];
    nonfinite_out[i] = selections[i].nonfinite;
  }
  return {thresholds, kept, nonfinite};
}

}  // namespace cpu
}  // namespace cure

TORCH_LIBRARY_FRAGMENT(cure, m) {
  // Counts of tensors selected by each path of the CPU kernels since the last reset:
  // int64[5] = [empty, direct (small tensors), bracket hit, bracket miss (radix fallback), NaN score].
  m.def("cpu_selection_counters(bool reset=False) -> Tensor");
  // Apply passes of the CPU kernels that compared scores with a threshold, since the last reset:
  // int64[2] = [decided from the bracket pass's classes, by recomputing the scores].
  m.def("cpu_apply_counters(bool reset=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(cure, CompositeExplicitAutograd, m) {
  m.impl("cpu_selection_counters", &cure::cpu::selection_counters_cpu);
  m.impl("cpu_apply_counters", &cure::cpu::apply_counters_cpu);
}
