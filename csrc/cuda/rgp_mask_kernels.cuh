// The exact selection kernels and the mask kernel: per tensor, zero update[s < numpy.quantile(s, p)]
// with s = f32(alpha)*|g_nat| + f32(1-alpha)*|g_adv| (docs/method.md), for all tensors of a call in
// one launch per stage, never sorting and never synchronising with the host (graph-capturable).
//
// Tensor lists: tensors[i].nat, .adv (gradients of the natural / adversarial loss) are read by every
// data pass; tensors[i].upd (the update) is written (zeros) by the apply kernel only. Workspace:
// TensorWork per tensor (histograms, counts, state), candidate regions, one call-wide word.
//
// Ranks wanted: a = v[k], b = v[k+1] of numpy's interpolation (plan.h). Tensors of at least kBracketMin
// elements take the one-read sampling bracket; smaller ones the radix select directly:
//   0. sample (one block per bracket tensor): m = 16384 scores from 64 tiles of 256 contiguous elements;
//      an exact in-block radix select gives the keys lo <= hi at sample ranks around a and b (+-5 sigma).
//   1. count (one block per chunk). Bracket tensors: ONE pass over g_nat/g_adv counts keys < lo,
//      == lo, in (lo, hi), == hi, NaN, +inf, compacts the keys in (lo, hi) (capacity n/8) and builds
//      their level-1 histogram. The tensor's last block resolves ranks a and b from the counts: inside
//      the run of lo or hi -> that key; inside (lo, hi) -> the radix select continues over the
//      candidates only (a list ~3-4 % of n); below lo, above hi, or overflow -> a miss. Small tensors:
//      level-1 histogram of the scores and NaN/+inf counts (radix path).
//   2. fallback histogram: only tensors whose bracket missed (device flag); other blocks exit at once.
//   3. refine: keys of the selected level-1 bin compacted with a level-2 histogram (or, when a and b
//      lie in different bins, max/min by atomics). Reads the bracket candidates, or the scores for the
//      radix path.
//   4. resolve: level-3 histogram over the compacted keys (its bins are exact keys); threshold.
//   5. apply (rgp_mask): update[s < thr] = 0, kept = n - zeroed. The fused SGD step replaces this
//      kernel with sgd_step_kernels.cuh.
// A NaN score makes the threshold NaN (numpy's behaviour) and nothing is masked.
//
// Global traffic per element, float32 inputs (bf16/fp16: half), ESTIMATES from the code, not measured:
//   sample   16384 scores x 8 B per bracket tensor: ~0.06 B/element on a 2.4 M-element tensor
//   count    8 B read (g_nat, g_adv) + ~0.15 B written (candidates, ~4 % of n x 4 B)
//   refine/resolve over the candidates: ~0.5 B (read, compact, read again); 0 when the counts decide
//   fallback (misses only; rare on gradient-like data) +16 B: histogram 8, refine 8. Small tensors
//            (< 64 k elements) pay the same 8 + 8 on the radix path
//   apply    8 B read + the zeroed part of the update (a partly zeroed 32-byte sector costs a read and a
//            write: ~4-8 B at p = 0.3)
//   selection ~8.7 B/element (the radix path alone: 16 + candidates); mask in all ~21-25 B/element.
// Expected H100 time (~3.0 TB/s, ~3.7 us per B/element) for ResNet-18 (11.2 M parameters, 10.8 M of
// them in the 12 tensors of >= 64 k elements), ESTIMATE: sample ~10-15 us (one block per tensor, latency
// bound: 64 keys per thread, up to five in-block histogram levels), count ~32 us, fallback launch (all
// blocks exit) ~3 us, refine + resolve over ~0.4 M candidates ~6 us, apply ~45 us: ~95-105 us per
// rgp_mask call (six launches, no host synchronisation). The old radix-only path: ~135 us.
#pragma once

#include "mask_common.cuh"

namespace cure_cuda {

// ---------------------------------------------------------------------------------------------------
// Histogram helpers. The zero bin of a digit (bin 0) is counted in a register and summed per warp
// (add_warp_count): exact zeros are common in gradients and would serialise shared atomics on one bin.

// Adds digit(key) of the keys of `keys` selected by `take` to the shared histogram `hist` (zeroed by
// the caller and a barrier passed). Every thread of the block must call it; a barrier must follow
// before `hist` is read.
template <int N, class Take, class Digit>
__device__ __forceinline__ void count_digits(uint32_t* hist, const uint32_t (&keys)[N], Take take, Digit digit) {
  uint32_t zero = 0;
  RunCounter run;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (take(i)) {
      const uint32_t d = digit(keys[i]);
      if (d == 0) {
        ++zero;
      } else {
        run.add(hist, d);
      }
    }
  }
  run.flush(hist);
  add_warp_count(&hist[0], zero);
}

// Adds a block's shared histogram to a global one (one atomic per nonzero bin).
template <uint32_t kBins>
__device__ __forceinline__ void flush_histogram(uint32_t* global, const uint32_t* hist) {
  for (uint32_t b = threadIdx.x; b < kBins; b += kThreads) {
    const uint32_t c = hist[b];
    if (c != 0) atomicAdd(&global[b], c);
  }
}

// Thread 0 of a tensor's finishing block: the threshold from keys a and b, where the counts of the
// bracket may already have fixed one or both of them.
__device__ __forceinline__ void write_threshold(const MaskLaunch& L, const BlockTensor& bt, TensorWork* w,
                                                uint32_t key_a, uint32_t key_b) {
  const uint32_t fixed = w->fixed;
  if (fixed & kFixedA) key_a = w->fixed_a;
  if (fixed & kFixedB) key_b = w->fixed_b;
  L.thresholds[bt.index] = quantile_from_keys(key_a, key_b, bt.t.weight, (bt.t.flags & kUpperFlag) != 0);
  w->mode = kModeDone;
}

// Thread 0: the radix state after a level-1 selection (ranks found in bins bin_a, bin_b).
__device__ __forceinline__ void set_level1_state(TensorWork* w, const RankBins& rb) {
  w->prefix_a = rb.bin_a;
  if (rb.bin_a == rb.bin_b) {
    w->mode = kModeSame;
    w->resid_a = rb.resid_a;
    w->resid_b = rb.resid_b;
  } else {
    w->mode = kModeSplit;
    w->prefix_b = rb.bin_b;
  }
}

// ---------------------------------------------------------------------------------------------------
// 0. sample: one block per tensor of the launch (blocks of tensors without a bracket exit).

// One digit level of an in-block radix select over the sample: the histogram of digit (key >> shift)
// & (kBins - 1) of the keys whose prefix (key >> (shift + digit bits)) is `prefix`, and the bins of
// ranks ra <= rb among them.
template <uint32_t kBins>
__device__ __forceinline__ RankBins sample_level(const uint32_t (&keys)[kSampleItems], int shift, uint32_t prefix,
                                                 uint32_t ra, uint32_t rb, uint32_t* sh_hist, uint32_t* sh_scan,
                                                 uint32_t* sh_out) {
  const int prefix_shift = shift + (kBins == kBins3 ? 9 : 11);  // digit bits: 2048 bins 11, 512 bins 9
  for (uint32_t b = threadIdx.x; b < kBins; b += kThreads) sh_hist[b] = 0;
  __syncthreads();
  count_digits(
      sh_hist, keys, [&](int i) { return prefix_shift >= 31 || (keys[i] >> prefix_shift) == prefix; },
      [&](uint32_t key) { return (key >> shift) & (kBins - 1); });
  __syncthreads();
  return find_rank_bins<kBins, false>(sh_hist, ra, rb, sh_scan, sh_out);
}

// The exact keys of sample ranks ra <= rb (radix select in three digit levels; two ranks in different
// bins take one histogram each at the next level).
__device__ __forceinline__ void sample_select(const uint32_t (&keys)[kSampleItems], uint32_t ra, uint32_t rb,
                                              uint32_t* sh_hist, uint32_t* sh_scan, uint32_t* sh_out,
                                              uint32_t& key_a, uint32_t& key_b) {
  RankBins r1 = sample_level<kBins1>(keys, kShift1, 0, ra, rb, sh_hist, sh_scan, sh_out);
  uint32_t pa = r1.bin_a, pb = r1.bin_b;
  uint32_t qa = r1.resid_a, qb = r1.resid_b;
  if (pa == pb) {
    const RankBins r = sample_level<kBins2>(keys, kShift2, pa, qa, qb, sh_hist, sh_scan, sh_out);
    pa = (pa << (kShift1 - kShift2)) | r.bin_a;
    pb = (pb << (kShift1 - kShift2)) | r.bin_b;
    qa = r.resid_a;
    qb = r.resid_b;
  } else {
    const RankBins x = sample_level<kBins2>(keys, kShift2, pa, qa, qa, sh_hist, sh_scan, sh_out);
    const RankBins y = sample_level<kBins2>(keys, kShift2, pb, qb, qb, sh_hist, sh_scan, sh_out);
    pa = (pa << (kShift1 - kShift2)) | x.bin_a;
    pb = (pb << (kShift1 - kShift2)) | y.bin_a;
    qa = x.resid_a;
    qb = y.resid_a;
  }
  if (pa == pb) {
    const RankBins r = sample_level<kBins3>(keys, 0, pa, qa, qb, sh_hist, sh_scan, sh_out);
    key_a = (pa << kShift2) | r.bin_a;
    key_b = (pb << kShift2) | r.bin_b;
  } else {
    const RankBins x = sample_level<kBins3>(keys, 0, pa, qa, qa, sh_hist, sh_scan, sh_out);
    const RankBins y = sample_level<kBins3>(keys, 0, pb, qb, qb, sh_hist, sh_scan, sh_out);
    key_a = (pa << kShift2) | x.bin_a;
    key_b = (pb << kShift2) | y.bin_a;
  }
}

template <class E>
__device__ __forceinline__ void sample_body(const MaskLaunch& L, const MaskTensor& t, TensorWork* w,
                                            uint32_t* sh_hist, uint32_t* sh_scan, uint32_t* sh_out) {
  using Raw = typename E::Raw;
  const Raw* nat = static_cast<const Raw*>(t.nat);
  const Raw* adv = static_cast<const Raw*>(t.adv);
  uint32_t keys[kSampleItems];
#pragma unroll
  for (int j = 0; j < kSampleItems; ++j) {
    // Tile j: kThreads contiguous elements from floor(j * n / kSampleItems), rounded down to kThreads.
    const uint64_t start = (static_cast<uint64_t>(j) * t.n / kSampleItems) / kThreads * kThreads;
    const uint32_t e = static_cast<uint32_t>(start) + threadIdx.x;
    keys[j] = score_key(rgp_score(E::to_float(nat[e]), E::to_float(adv[e]), L.alpha, L.beta));
  }
  const bool open_lo = t.sample_lo < 0;
  const bool open_hi = t.sample_hi >= static_cast<int32_t>(kSampleSize);
  const uint32_t ra = open_lo ? 0u : static_cast<uint32_t>(t.sample_lo);
  const uint32_t rb = open_hi ? kSampleSize - 1 : static_cast<uint32_t>(t.sample_hi);
  uint32_t key_a = 0, key_b = kInfKey;
  if (!(open_lo && open_hi)) sample_select(keys, ra, rb, sh_hist, sh_scan, sh_out, key_a, key_b);
  if (threadIdx.x == 0) {
    // A NaN key (> +inf's) in the sample means a NaN score: the count pass then ends with a NaN
    // threshold whatever lo and hi are; capping keeps lo <= hi <= +inf's key.
    const uint32_t hi = open_hi ? kInfKey : (key_b < kInfKey ? key_b : kInfKey);
    const uint32_t lo = open_lo ? 0u : (key_a < hi ? key_a : hi);
    w->lo = lo;
    w->hi = hi;
  }
}

__global__ void __launch_bounds__(kThreads) rgp_sample_kernel(const __grid_constant__ MaskLaunch L) {
  __shared__ uint32_t sh_hist[kBins1];
  __shared__ uint32_t sh_scan[2 * kThreads];
  __shared__ uint32_t sh_out[4];
  if (blockIdx.x >= L.num_tensors) return;
  const MaskTensor& t = L.tensors[blockIdx.x];
  if ((t.flags & kBracketFlag) == 0) return;
  TensorWork* w = L.work + L.first_tensor + blockIdx.x;
  switch (t.flags & kDTypeMask) {
    case kFloat32: sample_body<Float32>(L, t, w, sh_hist, sh_scan, sh_out); break;
    case kBFloat16: sample_body<BFloat16>(L, t, w, sh_hist, sh_scan, sh_out); break;
    default: sample_body<Float16>(L, t, w, sh_hist, sh_scan, sh_out); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// 1. count (bracket tensors) or level-1 histogram (radix path); 2. fallback histogram.

// Level-1 histogram of the scores of one chunk. kFallback: the tensor's bracket missed, its NaN/+inf
// counts and outputs are already written by the count kernel (and it has no NaN).
template <class E, bool kFallback>
__device__ __forceinline__ void histogram_body(const MaskLaunch& L, const BlockTensor& bt, uint32_t* sh_hist,
                                               uint32_t* sh_scan, uint32_t* sh_small) {
  const MaskTensor& t = bt.t;
  TensorWork* w = L.work + bt.index;
  const uint32_t lo = bt.chunk * kChunk;
  const uint32_t hi = t.n - lo < kChunk ? t.n : lo + kChunk;
  for (uint32_t b = threadIdx.x; b < kBins1; b += kThreads) sh_hist[b] = 0;
  if (threadIdx.x == 0) sh_small[0] = sh_small[1] = 0;
  __syncthreads();

  uint32_t keys[kItems];
  uint32_t valid;
  load_keys<E>(t, lo, hi, L.alpha, L.beta, keys, valid);
  uint32_t nan = 0, inf = 0;
  if (!kFallback) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if ((valid >> i) & 1u) {
        nan += keys[i] > kInfKey ? 1u : 0u;
        inf += keys[i] == kInfKey ? 1u : 0u;
      }
    }
  }
  count_digits(
      sh_hist, keys, [&](int i) { return ((valid >> i) & 1u) != 0; }, [](uint32_t key) { return key >> kShift1; });
  if (!kFallback) {
    add_warp_count(&sh_small[0], nan);
    add_warp_count(&sh_small[1], inf);
  }
  __syncthreads();
  flush_histogram<kBins1>(w->hist1, sh_hist);
  if (!kFallback && threadIdx.x == 0) {
    if (sh_small[0] != 0) atomicAdd(&w->nan_count, sh_small[0]);
    if (sh_small[1] != 0) atomicAdd(&w->inf_count, sh_small[1]);
  }
  if (!last_block_of_tensor(&w->ticket[kFallback ? 3 : 0], t.nchunks, &sh_small[2])) return;

  // Last block of the tensor: every histogram count and NaN/inf count is in.
  if (!kFallback) {
    const uint32_t nan_total = __ldcg(&w->nan_count);
    const uint32_t inf_total = __ldcg(&w->inf_count);
    if (threadIdx.x == 0) {
      L.nonfinite[bt.index] = static_cast<long long>(nan_total) + static_cast<long long>(inf_total);
      L.kept[bt.index] = static_cast<long long>(t.n);  // the apply kernel subtracts the zeroed entries
      if (nan_total + inf_total != 0) atomicAdd(L.call_nonfinite, 1u);
      w->path = kPathRadix;
    }
    if (nan_total != 0) {  // numpy: any NaN makes the quantile NaN; nothing is masked
      if (threadIdx.x == 0) {
        L.thresholds[bt.index] = quiet_nan();
        w->mode = kModeDone;
      }
      return;
    }
  }
  const RankBins rb = find_rank_bins<kBins1>(w->hist1, t.rank_a, t.rank_b, sh_scan, &sh_small[4]);
  if (threadIdx.x == 0) {
    w->source = kSourceData;
    set_level1_state(w, rb);
  }
}

// Where rank r lies among the bracket counts.
enum : uint32_t { kRankMiss = 0, kRankFixed = 1, kRankCandidate = 2 };

__device__ __forceinline__ uint32_t classify_rank(uint32_t r, uint32_t c_lt, uint32_t c_eq, uint32_t c_mid,
                                                  uint32_t c_hi, uint32_t lo, uint32_t hi, uint32_t& key,
                                                  uint32_t& resid) {
  if (r < c_lt) return kRankMiss;
  r -= c_lt;
  if (r < c_eq) {
    key = lo;
    return kRankFixed;
  }
  r -= c_eq;
  if (r < c_mid) {
    resid = r;
    return kRankCandidate;
  }
  r -= c_mid;
  if (r < c_hi) {
    key = hi;
    return kRankFixed;
  }
  return kRankMiss;
}

// The bracket count pass over one chunk, then (last block) the ranks resolved from the counts.
template <class E>
__device__ __forceinline__ void count_body(const MaskLaunch& L, const BlockTensor& bt, uint32_t* sh_hist,
                                           uint32_t* sh_scan, uint32_t* sh_small) {
  const MaskTensor& t = bt.t;
  TensorWork* w = L.work + bt.index;
  const uint32_t key_lo = w->lo;  // written by the sample kernel
  const uint32_t key_hi = w->hi;
  const uint32_t lo = bt.chunk * kChunk;
  const uint32_t hi = t.n - lo < kChunk ? t.n : lo + kChunk;
  for (uint32_t b = threadIdx.x; b < kBins1; b += kThreads) sh_hist[b] = 0;
  if (threadIdx.x < 8) sh_small[threadIdx.x] = 0;
  __syncthreads();

  uint32_t keys[kItems];
  uint32_t valid;
  load_keys<E>(t, lo, hi, L.alpha, L.beta, keys, valid);
  uint32_t c_lt = 0, c_eq = 0, c_hi = 0, nan = 0, inf = 0;
  uint32_t match = 0;  // bit i: item i is a candidate (lo < key < hi)
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if ((valid >> i) & 1u) {
      const uint32_t key = keys[i];
      nan += key > kInfKey ? 1u : 0u;
      inf += key == kInfKey ? 1u : 0u;
      // NaN keys are above hi (<= +inf's key): none of the four counts takes them.
      if (key < key_lo) {
        ++c_lt;
      } else if (key == key_lo) {
        ++c_eq;
      } else if (key < key_hi) {
        match |= 1u << i;
      } else if (key == key_hi) {
        ++c_hi;
      }
    }
  }
  // Level-1 histogram of the candidates (the radix select continues over them if a rank is inside).
  count_digits(
      sh_hist, keys, [&](int i) { return ((match >> i) & 1u) != 0; }, [](uint32_t key) { return key >> kShift1; });
  add_warp_count(&sh_small[0], c_lt);
  add_warp_count(&sh_small[1], c_eq);
  add_warp_count(&sh_small[2], c_hi);
  add_warp_count(&sh_small[3], nan);
  add_warp_count(&sh_small[4], inf);
  const uint32_t count = static_cast<uint32_t>(__popc(match));
  if (__syncthreads_or(count != 0)) {  // (also orders the shared atomics above)
    const ScanResult scan = block_exclusive_scan(count, sh_scan);
    if (threadIdx.x == 0) sh_small[8] = atomicAdd(&w->c_mid, scan.total);
    __syncthreads();
    uint32_t pos = sh_small[8] + scan.exclusive;
    uint32_t* out = L.candidates + t.bracket_offset;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if ((match >> i) & 1u) {
        if (pos < t.bracket_cap) out[pos] = keys[i];  // beyond the capacity: counted only (a miss)
        ++pos;
      }
    }
    flush_histogram<kBins1>(w->hist1, sh_hist);
  }
  if (threadIdx.x == 0) {
    if (sh_small[0] != 0) atomicAdd(&w->c_lt, sh_small[0]);
    if (sh_small[1] != 0) atomicAdd(&w->c_eq, sh_small[1]);
    if (sh_small[2] != 0) atomicAdd(&w->c_hi, sh_small[2]);
    if (sh_small[3] != 0) atomicAdd(&w->nan_count, sh_small[3]);
    if (sh_small[4] != 0) atomicAdd(&w->inf_count, sh_small[4]);
  }
  if (!last_block_of_tensor(&w->ticket[0], t.nchunks, &sh_small[9])) return;

  // Last block of the tensor: resolve ranks a and b from the counts.
  const uint32_t nan_total = __ldcg(&w->nan_count);
  const uint32_t inf_total = __ldcg(&w->inf_count);
  const uint32_t n_lt = __ldcg(&w->c_lt);
  const uint32_t n_eq = __ldcg(&w->c_eq);
  const uint32_t n_mid = __ldcg(&w->c_mid);
  const uint32_t n_hi = __ldcg(&w->c_hi);
  if (threadIdx.x == 0) {
    L.nonfinite[bt.index] = static_cast<long long>(nan_total) + static_cast<long long>(inf_total);
    L.kept[bt.index] = static_cast<long long>(t.n);  // the apply kernel subtracts the zeroed entries
    if (nan_total + inf_total != 0) atomicAdd(L.call_nonfinite, 1u);
  }
  if (nan_total != 0) {
    if (threadIdx.x == 0) {
      L.thresholds[bt.index] = quiet_nan();
      w->mode = kModeDone;
      w->path = kPathBracketCounts;
    }
    return;
  }
  uint32_t key_a = 0, key_b = 0, resid_a = 0, resid_b = 0;
  const uint32_t kind_a = classify_rank(t.rank_a, n_lt, n_eq, n_mid, n_hi, key_lo, key_hi, key_a, resid_a);
  const uint32_t kind_b = classify_rank(t.rank_b, n_lt, n_eq, n_mid, n_hi, key_lo, key_hi, key_b, resid_b);
  if (kind_a == kRankFixed && kind_b == kRankFixed) {  // (whether or not the candidates overflowed)
    if (threadIdx.x == 0) {
      w->path = kPathBracketCounts;
      write_threshold(L, bt, w, key_a, key_b);
    }
    return;
  }
  if (kind_a == kRankMiss || kind_b == kRankMiss || n_mid > t.bracket_cap) {
    // The radix path starts over on the scores: clear the candidates' histogram for it.
    for (uint32_t b = threadIdx.x; b < kBins1; b += kThreads) w->hist1[b] = 0;
    if (threadIdx.x == 0) {
      w->mode = kModeMiss;
      w->path = kPathBracketMiss;
    }
    return;
  }
  // At least one rank among the candidates; a fixed rank borrows the other's so both select the same.
  const uint32_t ra = kind_a == kRankCandidate ? resid_a : resid_b;
  const uint32_t rb = kind_b == kRankCandidate ? resid_b : resid_a;
  const RankBins bins = find_rank_bins<kBins1>(w->hist1, ra, rb, sh_scan, &sh_small[12]);
  if (threadIdx.x == 0) {
    w->fixed = (kind_a == kRankFixed ? kFixedA : 0u) | (kind_b == kRankFixed ? kFixedB : 0u);
    w->fixed_a = key_a;
    w->fixed_b = key_b;
    w->source = kSourceBracket;
    w->path = kPathBracketSelect;
    set_level1_state(w, bins);
  }
}

__global__ void __launch_bounds__(kThreads) rgp_count_kernel(const __grid_constant__ MaskLaunch L) {
  __shared__ uint32_t sh_hist[kBins1];
  __shared__ uint32_t sh_scan[2 * kThreads];
  __shared__ uint32_t sh_small[16];
  const BlockTensor bt = block_tensor(L);
  if (bt.t.n == 0) {  // an empty tensor has one block, which writes its results
    if (threadIdx.x == 0) {
      L.thresholds[bt.index] = quiet_nan();
      L.kept[bt.index] = 0;
      L.nonfinite[bt.index] = 0;
    }
    return;
  }
  if (bt.t.flags & kBracketFlag) {
    switch (bt.t.flags & kDTypeMask) {
      case kFloat32: count_body<Float32>(L, bt, sh_hist, sh_scan, sh_small); break;
      case kBFloat16: count_body<BFloat16>(L, bt, sh_hist, sh_scan, sh_small); break;
      default: count_body<Float16>(L, bt, sh_hist, sh_scan, sh_small); break;
    }
  } else {
    switch (bt.t.flags & kDTypeMask) {
      case kFloat32: histogram_body<Float32, false>(L, bt, sh_hist, sh_scan, sh_small); break;
      case kBFloat16: histogram_body<BFloat16, false>(L, bt, sh_hist, sh_scan, sh_small); break;
      default: histogram_body<Float16, false>(L, bt, sh_hist, sh_scan, sh_small); break;
    }
  }
}

__global__ void __launch_bounds__(kThreads) rgp_fallback_kernel(const __grid_constant__ MaskLaunch L) {
  __shared__ uint32_t sh_hist[kBins1];
  __shared__ uint32_t sh_scan[2 * kThreads];
  __shared__ uint32_t sh_small[8];
  const BlockTensor bt = block_tensor(L);
  if (bt.t.n == 0 || L.work[bt.index].mode != kModeMiss) return;  // the bracket hit (or no bracket)
  switch (bt.t.flags & kDTypeMask) {
    case kFloat32: histogram_body<Float32, true>(L, bt, sh_hist, sh_scan, sh_small); break;
    case kBFloat16: histogram_body<BFloat16, true>(L, bt, sh_hist, sh_scan, sh_small); break;
    default: histogram_body<Float16, true>(L, bt, sh_hist, sh_scan, sh_small); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// kModeSplit, at any level: a = the largest key whose prefix (key >> shift) is prefix_a, b = the
// smallest key whose prefix is prefix_b. Each block folds its keys; the last block writes the threshold.
__device__ __forceinline__ void split_fold(uint32_t key, uint32_t shift, uint32_t prefix_a, uint32_t prefix_b,
                                           uint32_t& max_a, uint32_t& max_not_b) {
  const uint32_t prefix = key >> shift;
  if (prefix == prefix_a && key > max_a) max_a = key;
  if (prefix == prefix_b && ~key > max_not_b) max_not_b = ~key;
}

// sh_small[0..1] must be zero and a barrier passed before any thread calls this.
__device__ __forceinline__ void split_finish(const MaskLaunch& L, const BlockTensor& bt, TensorWork* w,
                                             uint32_t ticket, uint32_t nblocks, uint32_t max_a, uint32_t max_not_b,
                                             uint32_t* sh_small) {
  if (max_a != 0) atomicMax(&sh_small[0], max_a);
  if (max_not_b != 0) atomicMax(&sh_small[1], max_not_b);
  __syncthreads();
  if (threadIdx.x == 0) {
    if (sh_small[0] != 0) atomicMax(&w->max_a, sh_small[0]);
    if (sh_small[1] != 0) atomicMax(&w->max_not_b, sh_small[1]);
  }
  if (!last_block_of_tensor(&w->ticket[ticket], nblocks, &sh_small[2])) return;
  if (threadIdx.x == 0) {
    // Both bins hold at least one key, so both folds saw one (key 0, +0.0, leaves max_a at 0 correctly;
    // ~key >= 0x80000000 for every key, so max_not_b is set).
    write_threshold(L, bt, w, __ldcg(&w->max_a), ~__ldcg(&w->max_not_b));
  }
}

// ---------------------------------------------------------------------------------------------------
// 3. refine: over the scores (radix path) or the bracket's candidates.

__device__ __forceinline__ void refine_keys(const MaskLaunch& L, const BlockTensor& bt, TensorWork* w, uint32_t mode,
                                            uint32_t nblocks, const uint32_t (&keys)[kItems], uint32_t valid,
                                            uint32_t prefix_a, uint32_t prefix_b, uint32_t resid_a, uint32_t resid_b,
                                            uint32_t* sh_hist, uint32_t* sh_scan, uint32_t* sh_small) {
  const MaskTensor& t = bt.t;
  if (mode == kModeSplit) {
    uint32_t max_a = 0, max_not_b = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if ((valid >> i) & 1u) split_fold(keys[i], kShift1, prefix_a, prefix_b, max_a, max_not_b);
    }
    split_finish(L, bt, w, 1, nblocks, max_a, max_not_b, sh_small);
    return;
  }

  // kModeSame: the keys with level-1 prefix prefix_a are the candidates.
  uint32_t match = 0;  // bit i: item i is a candidate
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (((valid >> i) & 1u) && (keys[i] >> kShift1) == prefix_a) match |= 1u << i;
  }
  count_digits(
      sh_hist, keys, [&](int i) { return ((match >> i) & 1u) != 0; },
      [](uint32_t key) { return (key >> kShift2) & (kBins2 - 1); });
  const uint32_t count = static_cast<uint32_t>(__popc(match));
  if (__syncthreads_or(count != 0)) {  // (also orders the shared histogram atomics above)
    const ScanResult scan = block_exclusive_scan(count, sh_scan);
    if (threadIdx.x == 0) sh_small[3] = atomicAdd(&w->cand_count, scan.total);
    __syncthreads();
    uint32_t* out = L.candidates + t.cand_offset + sh_small[3] + scan.exclusive;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if ((match >> i) & 1u) *out++ = keys[i];
    }
    flush_histogram<kBins2>(w->hist2, sh_hist);
  }
  if (!last_block_of_tensor(&w->ticket[1], nblocks, &sh_small[2])) return;

  const RankBins rb = find_rank_bins<kBins2>(w->hist2, resid_a, resid_b, sh_scan, &sh_small[4]);
  if (threadIdx.x == 0) {
    w->prefix_a = (prefix_a << (kShift1 - kShift2)) | rb.bin_a;
    if (rb.bin_a == rb.bin_b) {
      w->mode = kModeSame;
      w->resid_a = rb.resid_a;
      w->resid_b = rb.resid_b;
    } else {
      w->mode = kModeSplit;
      w->prefix_b = (prefix_a << (kShift1 - kShift2)) | rb.bin_b;
    }
  }
}

// kItems keys of list[begin .. count), strided by thread (coalesced); bit i of `valid` when inside.
__device__ __forceinline__ void load_list(const uint32_t* list, uint32_t begin, uint32_t count,
                                          uint32_t (&keys)[kItems], uint32_t& valid) {
  valid = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const uint32_t pos = begin + static_cast<uint32_t>(i) * kThreads + threadIdx.x;
    keys[i] = pos < count ? list[pos] : 0u;
    if (pos < count) valid |= 1u << i;
  }
}

__global__ void __launch_bounds__(kThreads) rgp_refine_kernel(const __grid_constant__ MaskLaunch L) {
  __shared__ uint32_t sh_hist[kBins2];
  __shared__ uint32_t sh_scan[2 * kThreads];
  __shared__ uint32_t sh_small[8];
  const BlockTensor bt = block_tensor(L);
  const MaskTensor& t = bt.t;
  if (t.n == 0) return;
  TensorWork* w = L.work + bt.index;
  const uint32_t mode = w->mode;  // written by a previous kernel
  if (mode != kModeSame && mode != kModeSplit) return;
  const bool from_bracket = w->source == kSourceBracket;
  const uint32_t listed = from_bracket ? w->c_mid : 0u;  // <= bracket_cap, or the bracket missed
  const uint32_t nblocks = from_bracket ? list_blocks(listed) : t.nchunks;
  if (bt.chunk >= nblocks) return;
  // Read the selection state before this kernel's last block overwrites it.
  const uint32_t prefix_a = w->prefix_a;
  const uint32_t prefix_b = w->prefix_b;
  const uint32_t resid_a = w->resid_a;
  const uint32_t resid_b = w->resid_b;
  if (mode == kModeSame) {
    for (uint32_t b = threadIdx.x; b < kBins2; b += kThreads) sh_hist[b] = 0;
  }
  if (threadIdx.x == 0) sh_small[0] = sh_small[1] = 0;
  __syncthreads();

  uint32_t keys[kItems];
  uint32_t valid;
  const uint32_t lo = bt.chunk * kChunk;
  if (from_bracket) {
    load_list(L.candidates + t.bracket_offset, lo, listed, keys, valid);
  } else {
    const uint32_t hi = t.n - lo < kChunk ? t.n : lo + kChunk;
    switch (t.flags & kDTypeMask) {
      case kFloat32: load_keys<Float32>(t, lo, hi, L.alpha, L.beta, keys, valid); break;
      case kBFloat16: load_keys<BFloat16>(t, lo, hi, L.alpha, L.beta, keys, valid); break;
      default: load_keys<Float16>(t, lo, hi, L.alpha, L.beta, keys, valid); break;
    }
  }
  refine_keys(L, bt, w, mode, nblocks, keys, valid, prefix_a, prefix_b, resid_a, resid_b, sh_hist, sh_scan, sh_small);
}

// ---------------------------------------------------------------------------------------------------
// 4. resolve, over the keys compacted by the refine kernel (sharing a level-1 prefix). Block j of a
// tensor takes entries [j * kChunk, (j + 1) * kChunk); blocks past the list exit at once.
__global__ void __launch_bounds__(kThreads) rgp_resolve_kernel(const __grid_constant__ MaskLaunch L) {
  __shared__ uint32_t sh_hist[kBins3];
  __shared__ uint32_t sh_scan[2 * kThreads];
  __shared__ uint32_t sh_small[8];
  const BlockTensor bt = block_tensor(L);
  const MaskTensor& t = bt.t;
  if (t.n == 0) return;
  TensorWork* w = L.work + bt.index;
  const uint32_t mode = w->mode;
  if (mode != kModeSame && mode != kModeSplit) return;
  const uint32_t count = w->cand_count;
  const uint32_t nblocks = list_blocks(count);
  if (bt.chunk >= nblocks) return;
  const uint32_t prefix_a = w->prefix_a;
  const uint32_t prefix_b = w->prefix_b;
  const uint32_t resid_a = w->resid_a;
  const uint32_t resid_b = w->resid_b;
  if (mode == kModeSame) {
    for (uint32_t b = threadIdx.x; b < kBins3; b += kThreads) sh_hist[b] = 0;
  }
  if (threadIdx.x == 0) sh_small[0] = sh_small[1] = 0;
  __syncthreads();

  uint32_t keys[kItems];
  uint32_t valid;
  load_list(L.candidates + t.cand_offset, bt.chunk * kChunk, count, keys, valid);

  if (mode == kModeSplit) {
    uint32_t max_a = 0, max_not_b = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if ((valid >> i) & 1u) split_fold(keys[i], kShift2, prefix_a, prefix_b, max_a, max_not_b);
    }
    split_finish(L, bt, w, 2, nblocks, max_a, max_not_b, sh_small);
    return;
  }

  // kModeSame: level-3 digits of the keys with level-2 prefix prefix_a; bins are exact keys.
  count_digits(
      sh_hist, keys, [&](int i) { return ((valid >> i) & 1u) != 0 && (keys[i] >> kShift2) == prefix_a; },
      [](uint32_t key) { return key & (kBins3 - 1); });
  __syncthreads();
  flush_histogram<kBins3>(w->hist3, sh_hist);
  if (!last_block_of_tensor(&w->ticket[2], nblocks, &sh_small[2])) return;

  const RankBins rb = find_rank_bins<kBins3>(w->hist3, resid_a, resid_b, sh_scan, &sh_small[4]);
  if (threadIdx.x == 0) write_threshold(L, bt, w, (prefix_a << kShift2) | rb.bin_a, (prefix_a << kShift2) | rb.bin_b);
}

// ---------------------------------------------------------------------------------------------------
// 5. apply: update[s < thr] = 0; kept[i] -= number zeroed.

template <class E>
__device__ __forceinline__ void apply_body(const MaskLaunch& L, const BlockTensor& bt, float thr, uint32_t* sh_small) {
  using Raw = typename E::Raw;
  constexpr int V = 16 / sizeof(Raw);
  const MaskTensor& t = bt.t;
  const uint32_t lo = bt.chunk * kChunk;
  const uint32_t hi = t.n - lo < kChunk ? t.n : lo + kChunk;
  const uint32_t m = hi - lo;
  if (threadIdx.x == 0) sh_small[0] = 0;
  __syncthreads();

  float s[kItems];
  load_scores<E>(t, lo, hi, L.alpha, L.beta, s);
  Raw* upd = static_cast<Raw*>(t.upd) + lo;
  const bool vec = (t.flags & kVectorFlag) != 0;
  uint32_t zeroed = 0;
#pragma unroll
  for (int r = 0; r < kItems / V; ++r) {
    const uint32_t e0 = item_offset<V>(r * V);
    uint32_t below = 0;  // bit l: lane l is in the chunk and its score is below the threshold
#pragma unroll
    for (int l = 0; l < V; ++l) {
      if (e0 + l < m && s[r * V + l] < thr) below |= 1u << l;
    }
    zeroed += static_cast<uint32_t>(__popc(below));
    if (vec && below == (1u << V) - 1u) {
      *reinterpret_cast<uint4*>(upd + e0) = make_uint4(0u, 0u, 0u, 0u);  // whole vector zeroed
    } else if (below != 0) {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        if ((below >> l) & 1u) upd[e0 + l] = Raw(0);  // +0.0 in every element type
      }
    }
  }
  if (zeroed != 0) atomicAdd(&sh_small[0], zeroed);
  __syncthreads();
  if (threadIdx.x == 0 && sh_small[0] != 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(&L.kept[bt.index]),
              static_cast<unsigned long long>(-static_cast<long long>(sh_small[0])));
  }
}

__global__ void __launch_bounds__(kThreads) rgp_apply_kernel(const __grid_constant__ MaskLaunch L) {
  __shared__ uint32_t sh_small[2];
  const BlockTensor bt = block_tensor(L);
  if (bt.t.n == 0) return;
  const float thr = L.thresholds[bt.index];  // written by a previous kernel
  if (!(thr > 0.0f)) return;  // NaN, or no score (all >= +0) can be below it
  switch (bt.t.flags & kDTypeMask) {
    case kFloat32: apply_body<Float32>(L, bt, thr, sh_small); break;
    case kBFloat16: apply_body<BFloat16>(L, bt, thr, sh_small); break;
    default: apply_body<Float16>(L, bt, thr, sh_small); break;
  }
}

}  // namespace cure_cuda
