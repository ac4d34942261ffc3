// Launch plans of the CUDA kernels: the structs passed by value as kernel arguments, and the host
// code that fills them from tensor shapes. Plain C++ (no CUDA, no torch): the kernels (*.cu), the
// ATen glue (cure_cuda_ops.cpp) and the CPU emulation of the kernels (emulation/) all include it.
//
// Everything a kernel needs is computed here from shapes and pointers and passed as a kernel argument
// (a struct of up to kMaxTensorsPerLaunch tensors), so a launch needs no host-to-device copy and a
// captured CUDA graph keeps its arguments by value.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace cure_cuda {

// Build-time knobs. The emulation tests build with small values to exercise multi-chunk and
// multi-launch paths on small tensors; the extension uses the defaults.
#ifndef CURE_CUDA_THREADS
#define CURE_CUDA_THREADS 256
#endif
#ifndef CURE_CUDA_ITEMS
#define CURE_CUDA_ITEMS 32
#endif
#ifndef CURE_CUDA_MAX_TENSORS
#define CURE_CUDA_MAX_TENSORS 128
#endif
#ifndef CURE_CUDA_SAMPLE_ITEMS
#define CURE_CUDA_SAMPLE_ITEMS 64
#endif
#ifndef CURE_CUDA_BRACKET_MIN
#define CURE_CUDA_BRACKET_MIN 65536
#endif
#ifndef CURE_CUDA_CAND_SHIFT
#define CURE_CUDA_CAND_SHIFT 3
#endif

constexpr int kThreads = CURE_CUDA_THREADS;  // threads per block, a power of two in [32, 512]
constexpr int kItems = CURE_CUDA_ITEMS;      // elements per thread per chunk, a multiple of 8, at most 32
constexpr uint32_t kChunk = static_cast<uint32_t>(kThreads) * kItems;  // elements per block
// Tensors per launch. 128 tensors make a MaskLaunch of ~7.7 KB: above the classic 4 KB kernel-argument
// limit, within the 32 KB that CUDA >= 12.1 allows on Volta and newer (the extension needs CUDA 13).
constexpr int kMaxTensorsPerLaunch = CURE_CUDA_MAX_TENSORS;
static_assert(kThreads >= 32 && kThreads <= 512 && (kThreads & (kThreads - 1)) == 0, "kThreads");
static_assert(kItems % 8 == 0 && kItems <= 32, "kItems: whole 16-byte vectors, one bit per item in a uint32");

// The sampling bracket (one-read exact selection). A tensor of at least kBracketMin elements is
// sampled in kSampleItems tiles of kThreads contiguous elements each (m = kSampleItems * kThreads
// scores, 16384 by default), tile t starting at floor(t * n / kSampleItems) rounded down to a multiple
// of kThreads. Smaller tensors take the radix select directly. The keys strictly inside the bracket are
// compacted into a region of n >> kCandShift slots (12.5 % of n by default); more is a miss.
constexpr int kSampleItems = CURE_CUDA_SAMPLE_ITEMS;
constexpr uint32_t kSampleSize = static_cast<uint32_t>(kThreads) * kSampleItems;
constexpr int64_t kBracketMin = CURE_CUDA_BRACKET_MIN;
constexpr int kCandShift = CURE_CUDA_CAND_SHIFT;
static_assert(kSampleItems >= 1 && kSampleItems <= 64, "kSampleItems: sample keys live in registers");
static_assert(kBracketMin >= static_cast<int64_t>(kSampleSize), "tiles must not overlap: n >= m");

// Exact selection: radix select on the 31 low bits of a score's float32 bit pattern (scores are >= 0
// or NaN, so the sign bit is clear and the bits order like the values; +inf 0x7f800000 is above every
// finite score, NaN above +inf). Three digits, most significant first:
//   level 1: bits 30..20 (11 bits, 2048 bins)   level 2: bits 19..9 (11 bits)   level 3: bits 8..0 (9 bits)
constexpr int kShift1 = 20;
constexpr int kShift2 = 9;
constexpr uint32_t kBins1 = 2048;
constexpr uint32_t kBins2 = 2048;
constexpr uint32_t kBins3 = 512;
constexpr uint32_t kInfKey = 0x7f800000u;
static_assert(kBins1 % kThreads == 0 && kBins2 % kThreads == 0 && kBins3 % kThreads == 0, "bins per thread");

// Element types (upcast to float32 in the kernels).
enum : uint32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// MaskTensor::flags: bits 0-1 element type; bit 2 all pointers 16-byte aligned (vector loads);
// bit 3 interpolate down from b (numpy's g >= 0.5 branch); bit 4 selected through the sampling bracket.
constexpr uint32_t kDTypeMask = 3u;
constexpr uint32_t kVectorFlag = 4u;
constexpr uint32_t kUpperFlag = 8u;
constexpr uint32_t kBracketFlag = 16u;

// Selection state of one tensor between kernels (TensorWork::mode).
enum : uint32_t {
  kModeSame = 1,   // ranks a and b share the selected prefix; residual ranks resid_a/resid_b inside it
  kModeSplit = 2,  // they do not: a is the largest key with prefix_a, b the smallest with prefix_b
  kModeDone = 3,   // the threshold is written
  kModeMiss = 4,   // the bracket missed: the fallback histogram kernel starts the radix select
};

// What the radix kernels (refine, resolve) select from (TensorWork::source).
enum : uint32_t {
  kSourceData = 0,     // the scores of the tensor (small tensors, bracket misses)
  kSourceBracket = 1,  // the bracket's candidates (keys strictly between lo and hi)
};

// How a tensor's threshold was found (TensorWork::path; diagnostics, read by the emulation tests).
enum : uint32_t {
  kPathRadix = 1,          // small tensor: radix select over the scores
  kPathBracketCounts = 2,  // bracket hit, both ranks resolved by the counts (runs of lo / hi, or NaN)
  kPathBracketSelect = 3,  // bracket hit, at least one rank selected among the candidates
  kPathBracketMiss = 4,    // bracket missed (rank outside, or candidate overflow): radix over the scores
};

// TensorWork::fixed: bit 0 key a is fixed_a, bit 1 key b is fixed_b (ranks resolved by the counts).
constexpr uint32_t kFixedA = 1u;
constexpr uint32_t kFixedB = 2u;

// One tensor of a launch (104 bytes). param/buf/rev are used by the fused SGD step only.
struct MaskTensor {
  const void* nat;          // grads_nat (contiguous)
  const void* adv;          // grads_adv (contiguous)
  void* upd;                // update / gradient (contiguous), zeroed where score < threshold
  void* param;              // rgp_sgd_step: parameter (contiguous)
  void* buf;                // rgp_sgd_step: momentum buffer (contiguous)
  void* rev;                // rgp_sgd_step: revision parameter (contiguous), or nullptr
  uint64_t cand_offset;     // start of this tensor's radix candidate region (n entries) in candidates
  uint64_t bracket_offset;  // start of this tensor's bracket candidate region (bracket_cap entries)
  uint32_t n;               // elements; 0 is allowed
  uint32_t nchunks;         // blocks of this tensor per kernel: max(1, ceil(n / kChunk))
  uint32_t rank_a;          // rank of a = v[k] in the sorted scores (0-based)
  uint32_t rank_b;          // rank of b = v[k+1]; equal to rank_a when k >= n - 1
  float weight;             // f32(g) for the g < 0.5 branch, f32(1 - g) (1 - g in double) otherwise
  uint32_t flags;           // see kDTypeMask, kVectorFlag, kUpperFlag, kBracketFlag
  uint32_t bracket_cap;     // n >> kCandShift
  int32_t sample_lo;        // sample rank of the bracket's lo key; -1: lo = key 0 (open below)
  int32_t sample_hi;        // sample rank of hi; kSampleSize: hi = +inf's key (open above)
  uint32_t pad;
};

// Per-tensor global workspace, zeroed before the first kernel of a call.
struct TensorWork {
  uint32_t hist1[kBins1];  // level-1 histogram: of the scores (radix path) or of the bracket's candidates
  uint32_t hist2[kBins2];
  uint32_t hist3[kBins3];
  uint32_t ticket[4];    // blocks finished: count/histogram, refine, resolve, fallback histogram
  uint32_t nan_count;    // scores that are NaN
  uint32_t inf_count;    // scores that are +inf
  uint32_t cand_count;   // candidates written by the refine kernel (radix candidate region)
  uint32_t mode;         // kModeSame / kModeSplit / kModeDone / kModeMiss, written by a last block
  uint32_t prefix_a;     // key prefix holding rank a (kModeSame: both ranks)
  uint32_t prefix_b;     // key prefix holding rank b (kModeSplit)
  uint32_t resid_a;      // rank of a among the keys with the prefix (kModeSame)
  uint32_t resid_b;      // rank of b among the keys with the prefix (kModeSame)
  uint32_t max_a;        // kModeSplit: largest key with prefix_a (atomicMax; 0 is the smallest key)
  uint32_t max_not_b;    // kModeSplit: largest ~key with prefix_b, i.e. ~(smallest key)
  // Sampling bracket.
  uint32_t lo;           // bracket keys lo <= hi (sample kernel)
  uint32_t hi;
  uint32_t c_lt;         // keys < lo
  uint32_t c_eq;         // keys == lo
  uint32_t c_mid;        // keys in (lo, hi): candidates reserved (may exceed the region: overflow)
  uint32_t c_hi;         // keys == hi (when hi > lo)
  uint32_t source;       // kSourceData / kSourceBracket
  uint32_t fixed;        // kFixedA / kFixedB
  uint32_t fixed_a;      // key a when kFixedA
  uint32_t fixed_b;      // key b when kFixedB
  uint32_t path;         // kPath*
  uint32_t pad[2];
};

// The kernels of a selection, in order; each launch covers every tensor of a MaskLaunch. Stages 0-4
// select the thresholds; rgp_mask then runs kStageApply, rgp_sgd_step the fused step's kernel instead.
enum MaskStage : int {
  kStageSample = 0,
  kStageCount = 1,
  kStageFallback = 2,
  kStageRefine = 3,
  kStageResolve = 4,
  kStageApply = 5,
};
constexpr int kNumSelectStages = 5;

// MaskLaunch::step_flags
constexpr uint32_t kStepUpdateMode = 1u;  // mask_mode "update": freeze param and buffer where s < thr
constexpr uint32_t kStepRevise = 2u;      // revision EMA after the update
constexpr uint32_t kStepCountKept = 4u;   // thresholds given (no selection kernels ran): kept starts at 0 and
                                          // every block adds its kept entries (else it subtracts its zeroed ones)

// Arguments of the selection and apply kernels for up to kMaxTensorsPerLaunch tensors.
struct MaskLaunch {
  MaskTensor tensors[kMaxTensorsPerLaunch];
  uint32_t chunk_begin[kMaxTensorsPerLaunch + 1];  // first block of each tensor; [num_tensors] = num_chunks
  uint32_t num_tensors;
  uint32_t num_chunks;   // grid size
  uint32_t first_tensor; // index of tensors[0] in the call (outputs and workspace are per call)
  float alpha;           // f32(alpha)
  float beta;            // f32(1 - alpha), 1 - alpha computed in double
  TensorWork* work;      // [T] for the whole call
  uint32_t* candidates;  // sum of n over the call
  float* thresholds;     // [T]
  long long* kept;       // [T]
  long long* nonfinite;  // [T]
  uint32_t* call_nonfinite;  // one word for the call: nonzero when any score of the call is not finite
                             // (nullptr when the thresholds were given: skip then holds that decision too)
  // rgp_sgd_step only.
  const unsigned char* skip;  // nullptr, or one bool on the device: skip the SGD update when true
  float lr;              // f32(lr)
  float momentum;        // f32(momentum)
  float weight_decay;    // f32(weight_decay)
  float decay;           // f32(decay)
  float keep;            // f32(1 - decay), 1 - decay computed in double
  uint32_t step_flags;   // kStepUpdateMode, kStepRevise
};

// Kernel arguments may take 32764 bytes (CUDA >= 12.1, Volta and newer); 128 tensors use ~13.9 KB.
static_assert(sizeof(MaskLaunch) <= 32764, "MaskLaunch exceeds the kernel argument limit");

// One tensor of a revise launch.
struct ReviseTensor {
  void* rev;          // revision parameter (contiguous), updated in place
  const void* param;  // model parameter (contiguous)
  uint32_t n;
  uint32_t flags;     // element type and kVectorFlag
};

struct ReviseLaunch {
  ReviseTensor tensors[kMaxTensorsPerLaunch];
  uint32_t chunk_begin[kMaxTensorsPerLaunch + 1];
  uint32_t num_tensors;
  uint32_t num_chunks;
  float decay;            // f32(decay)
  float one_minus_decay;  // f32(1 - decay), 1 - decay computed in double
};
static_assert(sizeof(ReviseLaunch) <= 32764, "ReviseLaunch exceeds the kernel argument limit");

// ---------------------------------------------------------------------------------------------------
// Host-side planning.

// The largest tensor the kernels take: element indices, ranks and counts are uint32, and
// chunk_begin must stay below 2^32.
constexpr int64_t kMaxElements = (int64_t{1} << 31) - 1;

inline uint32_t chunks_of(int64_t n) {
  return n == 0 ? 1u : static_cast<uint32_t>((n + kChunk - 1) / kChunk);
}

inline bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

// numpy.quantile's 'linear' method for n > 0 sorted values v and fraction p (docs/method.md section 2):
// h = (n - 1) * p in double, k = floor(h), g = h - k; a = v[k], b = v[k + 1] (both v[n - 1] when
// k >= n - 1); thr = f32(a + d * f32(g)) if g < 0.5 else f32(b - d * f32(1 - g)), d = f32(b - a).
struct QuantilePlan {
  uint32_t rank_a;
  uint32_t rank_b;
  float weight;
  bool upper;
};

inline QuantilePlan plan_quantile(int64_t n, double p) {
  const double h = static_cast<double>(n - 1) * p;
  const double k = std::floor(h);
  const double g = h - k;
  QuantilePlan q;
  const int64_t kk = static_cast<int64_t>(k);
  q.rank_a = static_cast<uint32_t>(kk >= n - 1 ? n - 1 : kk);
  q.rank_b = static_cast<uint32_t>(kk >= n - 1 ? n - 1 : kk + 1);
  q.upper = g >= 0.5;
  q.weight = q.upper ? static_cast<float>(1.0 - g) : static_cast<float>(g);
  return q;
}

struct MaskInput {
  const void* nat;
  const void* adv;
  void* upd;
  int64_t n;
  uint32_t dtype;
  void* param = nullptr;  // rgp_sgd_step only
  void* buf = nullptr;
  void* rev = nullptr;
};

// Sample ranks of the bracket keys for ranks a <= b of n: the sample positions of a and b widened by
// five standard deviations of a sample quantile plus one, clamped (-1 / kSampleSize: open end). Any
// choice gives exact results (the counts decide); this one makes a miss rare on iid-like data.
struct SampleRanks {
  int32_t lo;
  int32_t hi;
};

inline SampleRanks plan_sample_ranks(int64_t n, uint32_t rank_a, uint32_t rank_b) {
  const double m = static_cast<double>(kSampleSize);
  const double fa = static_cast<double>(rank_a) / static_cast<double>(n - 1);
  const double fb = static_cast<double>(rank_b) / static_cast<double>(n - 1);
  const double lo = std::floor(fa * (m - 1.0) - 5.0 * std::sqrt(m * fa * (1.0 - fa))) - 1.0;
  const double hi = std::ceil(fb * (m - 1.0) + 5.0 * std::sqrt(m * fb * (1.0 - fb))) + 1.0;
  SampleRanks r;
  r.lo = lo < 0.0 ? -1 : static_cast<int32_t>(lo);
  r.hi = hi > m - 1.0 ? static_cast<int32_t>(kSampleSize) : static_cast<int32_t>(hi);
  return r;
}

// The region sizes of one call's candidates: the radix region (n per tensor) then the bracket regions.
inline uint64_t bracket_capacity(int64_t n) {
  return n >= kBracketMin ? static_cast<uint64_t>(n) >> kCandShift : 0;
}

// Splits the tensors of one call into launches of at most kMaxTensorsPerLaunch tensors.
// `candidates` holds sum(n) + sum(bracket_capacity(n)) entries.
inline std::vector<MaskLaunch> plan_rgp_mask(const std::vector<MaskInput>& inputs, double alpha, double p,
                                             TensorWork* work, uint32_t* candidates, float* thresholds,
                                             long long* kept, long long* nonfinite, uint32_t* call_nonfinite) {
  std::vector<MaskLaunch> launches;
  uint64_t cand_offset = 0;
  uint64_t bracket_offset = 0;
  for (const MaskInput& in : inputs) bracket_offset += static_cast<uint64_t>(in.n);
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (i % kMaxTensorsPerLaunch == 0) {
      launches.emplace_back();
      MaskLaunch& L = launches.back();
      std::memset(&L, 0, sizeof(L));
      L.first_tensor = static_cast<uint32_t>(i);
      L.alpha = static_cast<float>(alpha);
      L.beta = static_cast<float>(1.0 - alpha);
      L.work = work;
      L.candidates = candidates;
      L.thresholds = thresholds;
      L.kept = kept;
      L.nonfinite = nonfinite;
      L.call_nonfinite = call_nonfinite;
    }
    MaskLaunch& L = launches.back();
    const MaskInput& in = inputs[i];
    MaskTensor& t = L.tensors[L.num_tensors];
    t.nat = in.nat;
    t.adv = in.adv;
    t.upd = in.upd;
    t.param = in.param;
    t.buf = in.buf;
    t.rev = in.rev;
    t.cand_offset = cand_offset;
    t.n = static_cast<uint32_t>(in.n);
    t.nchunks = chunks_of(in.n);
    t.flags = in.dtype;
    bool aligned = aligned16(in.nat) && aligned16(in.adv) && aligned16(in.upd);
    for (const void* ptr : {static_cast<const void*>(in.param), static_cast<const void*>(in.buf),
                            static_cast<const void*>(in.rev)}) {
      if (ptr != nullptr) aligned = aligned && aligned16(ptr);
    }
    if (aligned) t.flags |= kVectorFlag;
    if (in.n > 0) {
      const QuantilePlan q = plan_quantile(in.n, p);
      t.rank_a = q.rank_a;
      t.rank_b = q.rank_b;
      t.weight = q.weight;
      if (q.upper) t.flags |= kUpperFlag;
    }
    const uint64_t cap = bracket_capacity(in.n);
    if (cap > 0) {
      t.flags |= kBracketFlag;
      t.bracket_offset = bracket_offset;
      t.bracket_cap = static_cast<uint32_t>(cap);
      const SampleRanks r = plan_sample_ranks(in.n, t.rank_a, t.rank_b);
      t.sample_lo = r.lo;
      t.sample_hi = r.hi;
      bracket_offset += cap;
    }
    L.chunk_begin[L.num_tensors] = L.num_chunks;
    L.num_chunks += t.nchunks;
    L.num_tensors += 1;
    L.chunk_begin[L.num_tensors] = L.num_chunks;
    cand_offset += static_cast<uint64_t>(in.n);
  }
  return launches;
}

struct ReviseInput {
  void* rev;
  const void* param;
  int64_t n;
  uint32_t dtype;
};

inline std::vector<ReviseLaunch> plan_revise(const std::vector<ReviseInput>& inputs, double decay) {
  std::vector<ReviseLaunch> launches;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].n == 0) continue;  // nothing to do; no block needed
    if (launches.empty() || launches.back().num_tensors == kMaxTensorsPerLaunch) {
      launches.emplace_back();
      ReviseLaunch& L = launches.back();
      std::memset(&L, 0, sizeof(L));
      L.decay = static_cast<float>(decay);
      L.one_minus_decay = static_cast<float>(1.0 - decay);
    }
    ReviseLaunch& L = launches.back();
    ReviseTensor& t = L.tensors[L.num_tensors];
    t.rev = inputs[i].rev;
    t.param = inputs[i].param;
    t.n = static_cast<uint32_t>(inputs[i].n);
    t.flags = inputs[i].dtype;
    if (aligned16(inputs[i].rev) && aligned16(inputs[i].param)) t.flags |= kVectorFlag;
    L.chunk_begin[L.num_tensors] = L.num_chunks;
    L.num_chunks += chunks_of(inputs[i].n);
    L.num_tensors += 1;
    L.chunk_begin[L.num_tensors] = L.num_chunks;
  }
  return launches;
}

}  // namespace cure_cuda
