// The rgp_mask kernels: per tensor, zero update[s < numpy.quantile(s, p)] with
// s = f32(alpha)*|g_nat| + f32(1-alpha)*|g_adv| (SPEC section 2), for all tensors of a call in four
// launches, never sorting and never synchronising with the host.
//
// Multi-tensor layout (apex multi_tensor_apply style): every tensor is cut into chunks of kChunk
// elements, one block per chunk; block b finds its tensor by binary search in chunk_begin. Tensor lists
// read per kernel:
//   tensors[i].nat, .adv  -- gradients of the natural / adversarial loss (read by every data pass)
//   tensors[i].upd        -- the update, written (zeros) by the apply kernel only
//
// Exact selection is a radix select on the score bits (see plan.h for the three digits), AIR-top-k
// style: the ranks wanted are k and k+1 of numpy's interpolation.
//   1. histogram: scores of every element; a level-1 histogram per tensor (shared memory, then global
//      atomics) and the NaN / +inf counts. The last block of each tensor finds the bins of ranks k and
//      k+1: same bin -> kModeSame; different bins -> kModeSplit (then a is the largest key of its bin and
//      b the smallest of its bin, because nothing lies between them).
//   2. refine: scores again. kModeSame: the keys in the selected bin become candidates (compacted into
//      a per-tensor region of n slots, enough for the worst case, e.g. all-equal tensors) and get a
//      level-2 histogram; the last block selects level-2 bins. kModeSplit: max/min by atomics; the last
//      block writes the threshold.
//   3. resolve: over the candidates only. kModeSame: level-3 histogram, whose bins are exact keys;
//      kModeSplit: max/min. The last block writes the threshold.
//   4. apply: scores again; update[s < thr] = 0; kept = n - zeroed.
// A NaN score makes the threshold NaN at step 1 and nothing is masked (numpy's behaviour).
// Global traffic per element (float32): 8 + 8 + 4/candidate + 8 bytes read, zeros written.
#pragma once

#include "device_common.cuh"

namespace cure_cuda {

// Item i of a thread is element ((i / V) * kThreads + tid) * V + i % V of its chunk, V elements per
// 16-byte vector: consecutive threads read consecutive vectors.
template <int V>
__device__ __forceinline__ uint32_t item_offset(int i) {
  return (static_cast<uint32_t>(i / V) * kThreads + threadIdx.x) * V + static_cast<uint32_t>(i % V);
}

// The kItems scores of this thread in chunk [lo, hi) of tensor t. Items at or past hi get score 0 and
// must be skipped by the caller (item_offset(i) >= hi - lo).
template <class E>
__device__ __forceinline__ void load_scores(const MaskTensor& t, uint32_t lo, uint32_t hi, float alpha,
                                            float beta, float (&s)[kItems]) {
  using Raw = typename E::Raw;
  constexpr int V = 16 / sizeof(Raw);
  const Raw* nat = static_cast<const Raw*>(t.nat) + lo;
  const Raw* adv = static_cast<const Raw*>(t.adv) + lo;
  const uint32_t m = hi - lo;
  const bool vec = (t.flags & kVectorFlag) != 0;
#pragma unroll
  for (int r = 0; r < kItems / V; ++r) {
    const uint32_t e0 = item_offset<V>(r * V);
    Raw rn[V], ra[V];
    if (vec && e0 + V <= m) {
      unpack(*reinterpret_cast<const uint4*>(nat + e0), rn);
      unpack(*reinterpret_cast<const uint4*>(adv + e0), ra);
    } else {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        rn[l] = e0 + l < m ? nat[e0 + l] : Raw(0);
        ra[l] = e0 + l < m ? adv[e0 + l] : Raw(0);
      }
    }
#pragma unroll
    for (int l = 0; l < V; ++l) s[r * V + l] = rgp_score(E::to_float(rn[l]), E::to_float(ra[l]), alpha, beta);
  }
}

struct BlockTensor {
  MaskTensor t;
  uint32_t index;  // in the call (outputs, workspace)
  uint32_t chunk;  // chunk of this block within the tensor
};

__device__ __forceinline__ BlockTensor block_tensor(const MaskLaunch& L) {
  BlockTensor bt;
  const uint32_t i = find_tensor(L.chunk_begin, L.num_tensors, blockIdx.x);
  bt.t = L.tensors[i];
  bt.index = L.first_tensor + i;
  bt.chunk = blockIdx.x - L.chunk_begin[i];
  return bt;
}

// ---------------------------------------------------------------------------------------------------
// 1. histogram

template <class E>
__device__ __forceinline__ void histogram_body(const MaskLaunch& L, const BlockTensor& bt, uint32_t* sh_hist,
                                               uint32_t* sh_scan, uint32_t* sh_small) {
  constexpr int V = 16 / sizeof(typename E::Raw);
  const MaskTensor& t = bt.t;
  TensorWork* w = L.work + bt.index;
  const uint32_t lo = bt.chunk * kChunk;
  const uint32_t hi = t.n - lo < kChunk ? t.n : lo + kChunk;
  for (uint32_t b = threadIdx.x; b < kBins1; b += kThreads) sh_hist[b] = 0;
  if (threadIdx.x == 0) sh_small[0] = sh_small[1] = 0;
  __syncthreads();

  float s[kItems];
  load_scores<E>(t, lo, hi, L.alpha, L.beta, s);
  uint32_t nan = 0, inf = 0;
  RunCounter run;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (item_offset<V>(i) < hi - lo) {
      const uint32_t key = score_key(s[i]);
      nan += key > kInfKey ? 1u : 0u;
      inf += key == kInfKey ? 1u : 0u;
      run.add(sh_hist, key >> kShift1);
    }
  }
  run.flush(sh_hist);
  if (nan != 0) atomicAdd(&sh_small[0], nan);
  if (inf != 0) atomicAdd(&sh_small[1], inf);
  __syncthreads();
  for (uint32_t b = threadIdx.x; b < kBins1; b += kThreads) {
    const uint32_t c = sh_hist[b];
    if (c != 0) atomicAdd(&w->hist1[b], c);
  }
  if (threadIdx.x == 0) {
    if (sh_small[0] != 0) atomicAdd(&w->nan_count, sh_small[0]);
    if (sh_small[1] != 0) atomicAdd(&w->inf_count, sh_small[1]);
  }
  if (!last_block_of_tensor(&w->ticket[0], t.nchunks, &sh_small[2])) return;

  // Last block of the tensor: every histogram count and NaN/inf count is in.
  const uint32_t nan_total = __ldcg(&w->nan_count);
  const uint32_t inf_total = __ldcg(&w->inf_count);
  if (threadIdx.x == 0) {
    L.nonfinite[bt.index] = static_cast<long long>(nan_total) + static_cast<long long>(inf_total);
    L.kept[bt.index] = static_cast<long long>(t.n);  // the apply kernel subtracts the zeroed entries
  }
  if (nan_total != 0) {  // numpy: any NaN makes the quantile NaN; nothing is masked
    if (threadIdx.x == 0) {
      L.thresholds[bt.index] = quiet_nan();
      w->mode = kModeDone;
    }
    return;
  }
  const RankBins rb = find_rank_bins<kBins1>(w->hist1, t.rank_a, t.rank_b, sh_scan, &sh_small[4]);
  if (threadIdx.x == 0) {
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
}

__global__ void __launch_bounds__(kThreads) rgp_histogram_kernel(const __grid_constant__ MaskLaunch L) {
  __shared__ uint32_t sh_hist[kBins1];
  __shared__ uint32_t sh_scan[2 * kThreads];
  __shared__ uint32_t sh_small[8];
  const BlockTensor bt = block_tensor(L);
  if (bt.t.n == 0) {  // an empty tensor has one block, which writes its results
    if (threadIdx.x == 0) {
      L.thresholds[bt.index] = quiet_nan();
      L.kept[bt.index] = 0;
      L.nonfinite[bt.index] = 0;
    }
    return;
  }
  switch (bt.t.flags & kDTypeMask) {
    case kFloat32: histogram_body<Float32>(L, bt, sh_hist, sh_scan, sh_small); break;
    case kBFloat16: histogram_body<BFloat16>(L, bt, sh_hist, sh_scan, sh_small); break;
    default: histogram_body<Float16>(L, bt, sh_hist, sh_scan, sh_small); break;
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
                                             uint32_t ticket, uint32_t max_a, uint32_t max_not_b,
                                             uint32_t* sh_small) {
  if (max_a != 0) atomicMax(&sh_small[0], max_a);
  if (max_not_b != 0) atomicMax(&sh_small[1], max_not_b);
  __syncthreads();
  if (threadIdx.x == 0) {
    if (sh_small[0] != 0) atomicMax(&w->max_a, sh_small[0]);
    if (sh_small[1] != 0) atomicMax(&w->max_not_b, sh_small[1]);
  }
  if (!last_block_of_tensor(&w->ticket[ticket], bt.t.nchunks, &sh_small[2])) return;
  if (threadIdx.x == 0) {
    // Both bins hold at least one key, so both folds saw one (key 0, +0.0, leaves max_a at 0 correctly;
    // ~key >= 0x80000000 for every key, so max_not_b is set).
    const uint32_t key_a = __ldcg(&w->max_a);
    const uint32_t key_b = ~__ldcg(&w->max_not_b);
    L.thresholds[bt.index] = quantile_from_keys(key_a, key_b, bt.t.weight, (bt.t.flags & kUpperFlag) != 0);
    w->mode = kModeDone;
  }
}

// ---------------------------------------------------------------------------------------------------
// 2. refine

template <class E>
__device__ __forceinline__ void refine_body(const MaskLaunch& L, const BlockTensor& bt, uint32_t mode,
                                            uint32_t* sh_hist, uint32_t* sh_scan, uint32_t* sh_small) {
  constexpr int V = 16 / sizeof(typename E::Raw);
  const MaskTensor& t = bt.t;
  TensorWork* w = L.work + bt.index;
  // Read the selection state before this kernel's last block overwrites it.
  const uint32_t prefix_a = w->prefix_a;
  const uint32_t prefix_b = w->prefix_b;
  const uint32_t resid_a = w->resid_a;
  const uint32_t resid_b = w->resid_b;
  const uint32_t lo = bt.chunk * kChunk;
  const uint32_t hi = t.n - lo < kChunk ? t.n : lo + kChunk;
  if (mode == kModeSame) {
    for (uint32_t b = threadIdx.x; b < kBins2; b += kThreads) sh_hist[b] = 0;
  }
  if (threadIdx.x == 0) sh_small[0] = sh_small[1] = 0;
  __syncthreads();

  float s[kItems];
  load_scores<E>(t, lo, hi, L.alpha, L.beta, s);

  if (mode == kModeSplit) {
    uint32_t max_a = 0, max_not_b = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (item_offset<V>(i) < hi - lo) split_fold(score_key(s[i]), kShift1, prefix_a, prefix_b, max_a, max_not_b);
    }
    split_finish(L, bt, w, 1, max_a, max_not_b, sh_small);
    return;
  }

  // kModeSame: the keys with level-1 prefix prefix_a are the candidates.
  uint32_t match = 0;  // bit i: item i is a candidate
  RunCounter run;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const uint32_t key = score_key(s[i]);
    if (item_offset<V>(i) < hi - lo && (key >> kShift1) == prefix_a) {
      match |= 1u << i;
      run.add(sh_hist, (key >> kShift2) & (kBins2 - 1));
    }
  }
  run.flush(sh_hist);
  const uint32_t count = static_cast<uint32_t>(__popc(match));
  if (__syncthreads_or(count != 0)) {  // (also orders the shared histogram atomics above)
    const ScanResult scan = block_exclusive_scan(count, sh_scan);
    if (threadIdx.x == 0) sh_small[3] = atomicAdd(&w->cand_count, scan.total);
    __syncthreads();
    uint32_t* out = L.candidates + t.cand_offset + sh_small[3] + scan.exclusive;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if ((match >> i) & 1u) *out++ = score_key(s[i]);
    }
  }
  for (uint32_t b = threadIdx.x; b < kBins2; b += kThreads) {
    const uint32_t c = sh_hist[b];
    if (c != 0) atomicAdd(&w->hist2[b], c);
  }
  if (!last_block_of_tensor(&w->ticket[1], t.nchunks, &sh_small[2])) return;

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

__global__ void __launch_bounds__(kThreads) rgp_refine_kernel(const __grid_constant__ MaskLaunch L) {
  __shared__ uint32_t sh_hist[kBins2];
  __shared__ uint32_t sh_scan[2 * kThreads];
  __shared__ uint32_t sh_small[8];
  const BlockTensor bt = block_tensor(L);
  if (bt.t.n == 0) return;
  const uint32_t mode = L.work[bt.index].mode;  // written by the previous kernel
  if (mode == kModeDone) return;
  switch (bt.t.flags & kDTypeMask) {
    case kFloat32: refine_body<Float32>(L, bt, mode, sh_hist, sh_scan, sh_small); break;
    case kBFloat16: refine_body<BFloat16>(L, bt, mode, sh_hist, sh_scan, sh_small); break;
    default: refine_body<Float16>(L, bt, mode, sh_hist, sh_scan, sh_small); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// 3. resolve, over the candidates (keys sharing the level-1 prefix). Block j of a tensor takes
// candidates [j * kChunk, (j + 1) * kChunk): as many blocks as data chunks, enough for n candidates.
__global__ void __launch_bounds__(kThreads) rgp_resolve_kernel(const __grid_constant__ MaskLaunch L) {
  __shared__ uint32_t sh_hist[kBins3];
  __shared__ uint32_t sh_scan[2 * kThreads];
  __shared__ uint32_t sh_small[8];
  const BlockTensor bt = block_tensor(L);
  const MaskTensor& t = bt.t;
  if (t.n == 0) return;
  TensorWork* w = L.work + bt.index;
  const uint32_t mode = w->mode;
  if (mode == kModeDone) return;
  const uint32_t prefix_a = w->prefix_a;
  const uint32_t prefix_b = w->prefix_b;
  const uint32_t resid_a = w->resid_a;
  const uint32_t resid_b = w->resid_b;
  const uint32_t count = w->cand_count;
  const uint32_t lo = bt.chunk * kChunk;
  const uint32_t hi = count <= lo ? lo : (count - lo < kChunk ? count : lo + kChunk);
  const uint32_t* cand = L.candidates + t.cand_offset;
  if (mode == kModeSame) {
    for (uint32_t b = threadIdx.x; b < kBins3; b += kThreads) sh_hist[b] = 0;
  }
  if (threadIdx.x == 0) sh_small[0] = sh_small[1] = 0;
  __syncthreads();

  uint32_t keys[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const uint32_t pos = lo + static_cast<uint32_t>(i) * kThreads + threadIdx.x;
    keys[i] = pos < hi ? cand[pos] : 0xffffffffu;  // 0xffffffff: no candidate (keys are < 2^31)
  }

  if (mode == kModeSplit) {
    uint32_t max_a = 0, max_not_b = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (keys[i] != 0xffffffffu) split_fold(keys[i], kShift2, prefix_a, prefix_b, max_a, max_not_b);
    }
    split_finish(L, bt, w, 2, max_a, max_not_b, sh_small);
    return;
  }

  // kModeSame: level-3 digits of the keys with level-2 prefix prefix_a; bins are exact keys.
  RunCounter run;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (keys[i] != 0xffffffffu && (keys[i] >> kShift2) == prefix_a) run.add(sh_hist, keys[i] & (kBins3 - 1));
  }
  run.flush(sh_hist);
  __syncthreads();
  for (uint32_t b = threadIdx.x; b < kBins3; b += kThreads) {
    const uint32_t c = sh_hist[b];
    if (c != 0) atomicAdd(&w->hist3[b], c);
  }
  if (!last_block_of_tensor(&w->ticket[2], t.nchunks, &sh_small[2])) return;

  const RankBins rb = find_rank_bins<kBins3>(w->hist3, resid_a, resid_b, sh_scan, &sh_small[4]);
  if (threadIdx.x == 0) {
    const uint32_t key_a = (prefix_a << kShift2) | rb.bin_a;
    const uint32_t key_b = (prefix_a << kShift2) | rb.bin_b;
    L.thresholds[bt.index] = quantile_from_keys(key_a, key_b, t.weight, (t.flags & kUpperFlag) != 0);
    w->mode = kModeDone;
  }
}

// ---------------------------------------------------------------------------------------------------
// 4. apply: update[s < thr] = 0; kept[i] -= number zeroed.

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
