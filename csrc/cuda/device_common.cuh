// Device building blocks shared by the rgp_mask and revise kernels: element types, 16-byte vector
// access, exact float arithmetic, block-wide scan, "last block" detection.
//
// Only __syncthreads-family barriers, shared/global atomics, __threadfence and full-warp
// __reduce_add_sync (sm_80 and newer) are used, all of which the CPU emulation of
// emulation/cuda_emulation.h provides, so the same source also runs there.
#pragma once

#ifdef CURE_CUDA_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "plan.h"

namespace cure_cuda {

// --- element types: raw bits <-> float32 ------------------------------------------------------------
// Upcasts are exact; downcasts round to nearest even (like torch's float -> bfloat16/half copy_).
struct Float32 {
  using Raw = uint32_t;
  static __device__ __forceinline__ float to_float(Raw r) { return __uint_as_float(r); }
  static __device__ __forceinline__ Raw from_float(float x) { return __float_as_uint(x); }
};
struct BFloat16 {
  using Raw = uint16_t;
  static __device__ __forceinline__ float to_float(Raw r) { return __bfloat162float(__ushort_as_bfloat16(r)); }
  static __device__ __forceinline__ Raw from_float(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};
struct Float16 {
  using Raw = uint16_t;
  static __device__ __forceinline__ float to_float(Raw r) { return __half2float(__ushort_as_half(r)); }
  static __device__ __forceinline__ Raw from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

// 16-byte vectors of raw elements (little-endian lanes, as in memory).
__device__ __forceinline__ void unpack(const uint4& v, uint32_t (&e)[4]) {
  e[0] = v.x;
  e[1] = v.y;
  e[2] = v.z;
  e[3] = v.w;
}
__device__ __forceinline__ void unpack(const uint4& v, uint16_t (&e)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    e[2 * i] = static_cast<uint16_t>(w[i] & 0xffffu);
    e[2 * i + 1] = static_cast<uint16_t>(w[i] >> 16);
  }
}
__device__ __forceinline__ uint4 pack(const uint32_t (&e)[4]) {
  uint4 v;
  v.x = e[0];
  v.y = e[1];
  v.z = e[2];
  v.w = e[3];
  return v;
}
__device__ __forceinline__ uint4 pack(const uint16_t (&e)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = static_cast<uint32_t>(e[2 * i]) | (static_cast<uint32_t>(e[2 * i + 1]) << 16);
  uint4 v;
  v.x = w[0];
  v.y = w[1];
  v.z = w[2];
  v.w = w[3];
  return v;
}

// --- exact arithmetic ---------------------------------------------------------------------------------
// __fmul_rn/__fadd_rn/__fsub_rn are never contracted into FMA, whatever --fmad says. They keep
// denormals unless the build flushes them (-ftz=true or --use_fast_math, which this project never sets).

// Robust Gradient Prominence (paper Eq. 6): s = f32(alpha)*|g_nat| + f32(1-alpha)*|g_adv|, every
// product and the sum rounded separately, exactly like `alpha * a.abs() + (1 - alpha) * b.abs()`.
__device__ __forceinline__ float rgp_score(float g_nat, float g_adv, float alpha, float beta) {
  return __fadd_rn(__fmul_rn(alpha, fabsf(g_nat)), __fmul_rn(beta, fabsf(g_adv)));
}

// The selection key of a score: its bits without the sign (scores are never -0.0; a NaN keeps a key
// above +inf whatever its sign bit).
__device__ __forceinline__ uint32_t score_key(float s) { return __float_as_uint(s) & 0x7fffffffu; }

// numpy's linear interpolation between a = v[k] and b = v[k+1] (docs/method.md section 2), NaN/inf propagating
// as in numpy: d = f32(b - a); thr = f32(a + f32(d * w)) or, for g >= 0.5, f32(b - f32(d * w)).
__device__ __forceinline__ float quantile_from_keys(uint32_t key_a, uint32_t key_b, float weight, bool upper) {
  const float a = __uint_as_float(key_a);
  const float b = __uint_as_float(key_b);
  const float d = __fsub_rn(b, a);
  return upper ? __fsub_rn(b, __fmul_rn(d, weight)) : __fadd_rn(a, __fmul_rn(d, weight));
}

__device__ __forceinline__ float quiet_nan() { return __uint_as_float(0x7fc00000u); }

// --- block-level helpers ------------------------------------------------------------------------------

// The tensor owning block `block`: the largest i with begin[i] <= block (begin strictly increasing).
__device__ __forceinline__ uint32_t find_tensor(const uint32_t* begin, uint32_t count, uint32_t block) {
  uint32_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const uint32_t mid = (lo + hi + 1) >> 1;
    if (begin[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

struct ScanResult {
  uint32_t exclusive;  // sum of the values of threads 0 .. tid-1
  uint32_t total;      // sum over the block
};

// Block-wide exclusive prefix sum (Hillis-Steele, double-buffered). `buf` holds 2 * kThreads words.
// Every thread of the block must call it.
__device__ __forceinline__ ScanResult block_exclusive_scan(uint32_t value, uint32_t* buf) {
  const int tid = static_cast<int>(threadIdx.x);
  __syncthreads();  // buf may still be read by a previous use
  buf[tid] = value;
  __syncthreads();
  int in = 0;
#pragma unroll
  for (int offset = 1; offset < kThreads; offset <<= 1) {
    uint32_t x = buf[in * kThreads + tid];
    if (tid >= offset) x += buf[in * kThreads + tid - offset];
    buf[(1 - in) * kThreads + tid] = x;
    in ^= 1;
    __syncthreads();
  }
  ScanResult r;
  r.exclusive = buf[in * kThreads + tid] - value;
  r.total = buf[in * kThreads + kThreads - 1];
  return r;
}

// "Last block" detection (threadFenceReduction pattern): every block of a tensor calls this after its
// global atomics; it returns true in exactly one block, the last to arrive, which then sees every other
// block's atomics. `flag` is one word of shared memory.
__device__ __forceinline__ bool last_block_of_tensor(uint32_t* ticket, uint32_t nblocks, uint32_t* flag) {
  __threadfence();  // this thread's global atomics are visible device-wide before the ticket is taken
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicAdd(ticket, 1u) == nblocks - 1 ? 1u : 0u;
  __syncthreads();
  const bool last = *flag != 0;
  if (last) __threadfence();
  return last;
}

// Per-thread run-length counting into a shared histogram: consecutive equal bins cost one atomic,
// which keeps contention low on tied or sorted data (all-equal tensors hit a single bin).
struct RunCounter {
  uint32_t bin = 0xffffffffu;
  uint32_t count = 0;
  __device__ __forceinline__ void add(uint32_t* hist, uint32_t b) {
    if (b == bin) {
      ++count;
    } else {
      if (count != 0) atomicAdd(hist + bin, count);
      bin = b;
      count = 1;
    }
  }
  __device__ __forceinline__ void flush(uint32_t* hist) {
    if (count != 0) atomicAdd(hist + bin, count);
    count = 0;
  }
};

// Sum of `value` over the 32 lanes of the calling warp (every lane must call it, converged).
__device__ __forceinline__ uint32_t warp_sum(uint32_t value) { return __reduce_add_sync(0xffffffffu, value); }

// Adds a per-thread count to one shared-memory word with one atomic per warp. Used for the zero bin of
// a histogram: with many exact zeros (30 % is common in gradients) 8-10 lanes of a warp would hit that
// bin with per-element shared atomics, which the hardware serialises; counting it in a register and
// summing per warp costs one atomic per warp per chunk. Every thread of the block must call it.
__device__ __forceinline__ void add_warp_count(uint32_t* word, uint32_t count) {
  const uint32_t total = warp_sum(count);
  if ((threadIdx.x & 31u) == 0 && total != 0) atomicAdd(word, total);
}

struct RankBins {
  uint32_t bin_a, resid_a, bin_b, resid_b;
};

// Given a global histogram (the keys of one prefix, counted by their next digit) and two ranks among
// those keys, finds the bin holding each rank and the rank inside that bin. Every thread of the block
// must call it; `scan` holds 2 * kThreads words, `out` 4 words of shared memory.
// kGlobal: `hist` is in global memory, written by other blocks' atomics (read through L2); else it is
// a shared-memory histogram of this block (a barrier must separate its last atomic from this call).
template <uint32_t kBins, bool kGlobal = true>
__device__ __forceinline__ RankBins find_rank_bins(const uint32_t* hist, uint32_t rank_a, uint32_t rank_b,
                                                   uint32_t* scan, uint32_t* out) {
  constexpr uint32_t kPer = kBins / kThreads;
  const uint32_t first = threadIdx.x * kPer;
  uint32_t counts[kPer];
  uint32_t sum = 0;
#pragma unroll
  for (uint32_t j = 0; j < kPer; ++j) {
    counts[j] = kGlobal ? __ldcg(hist + first + j) : hist[first + j];
    sum += counts[j];
  }
  if (threadIdx.x == 0) out[0] = out[1] = out[2] = out[3] = 0;
  uint32_t below = block_exclusive_scan(sum, scan).exclusive;  // (its barriers order the writes above)
#pragma unroll
  for (uint32_t j = 0; j < kPer; ++j) {
    if (rank_a >= below && rank_a - below < counts[j]) {
      out[0] = first + j;
      out[1] = rank_a - below;
    }
    if (rank_b >= below && rank_b - below < counts[j]) {
      out[2] = first + j;
      out[3] = rank_b - below;
    }
    below += counts[j];
  }
  __syncthreads();
  RankBins r;
  r.bin_a = out[0];
  r.resid_a = out[1];
  r.bin_b = out[2];
  r.resid_b = out[3];
  __syncthreads();  // out may be reused
  return r;
}

}  // namespace cure_cuda
