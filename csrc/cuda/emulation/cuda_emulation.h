// A CPU emulation of the small part of CUDA the kernels in csrc/cuda use, so their logic can be tested
// bit for bit on a machine without a GPU (build with -DCURE_CUDA_EMULATION; see emulated_ops.cpp).
//
// Model: the blocks of a launch run one after another, in a shuffled order; the threads of a block are
// coroutines (ucontext) switched only at barriers, resumed in a shuffled order after each barrier, so
// code that reads shared memory another thread wrote without a barrier in between sees varying results.
// __shared__ variables become function statics (one instance, shared by the block's threads).
// Global atomics are plain read-modify-writes (one OS thread). Full-warp collectives
// (__reduce_add_sync) are a barrier of the 32 threads of a warp: every lane must arrive, with the
// full mask, before any of them continues. What this cannot show: races between concurrently running
// blocks (memory fences, L1 staleness), lanes of a warp running apart between collectives, timing.
// A barrier that some threads skip (divergent __syncthreads, some threads returned, a warp collective
// that not every lane of the warp reaches) aborts.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __grid_constant__

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

namespace cure_emu {
struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};
}  // namespace cure_emu

inline cure_emu::Dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cure_emu {

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  bool waiting = false;  // at a barrier
  int barrier_kind = 0;
  int value = 0;
  unsigned warp_value = 0;  // a warp collective's operand, then its result
};

constexpr int kWarpCollective = 100;  // barrier_kind of a thread waiting in a warp collective

struct Scheduler {
  ucontext_t main;
  std::vector<Thread> threads;
  unsigned current = 0;
  int barrier_count = 0;  // threads with a nonzero value at the last released barrier
  std::function<void()>* body = nullptr;
  std::mt19937_64 rng{12345};
};

inline Scheduler& sched() {
  static Scheduler s;
  return s;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s (block %u, thread %u)\n", what, blockIdx.x, threadIdx.x);
  std::abort();
}

inline void trampoline() {
  Scheduler& s = sched();
  (*s.body)();
  s.threads[s.current].done = true;
  // returning switches to uc_link (the scheduler)
}

// Called by an emulated thread: wait until every thread of the block arrived.
inline int barrier(int kind, int value) {
  Scheduler& s = sched();
  Thread& t = s.threads[s.current];
  t.waiting = true;
  t.barrier_kind = kind;
  t.value = value;
  swapcontext(&t.ctx, &s.main);
  return s.barrier_count;
}

// Called by an emulated thread: a full-warp reduction (sum) of `value`.
inline unsigned warp_reduce_add(unsigned mask, unsigned value) {
  if (mask != 0xffffffffu) fail("warp collective with a partial mask");
  Scheduler& s = sched();
  Thread& t = s.threads[s.current];
  t.waiting = true;
  t.barrier_kind = kWarpCollective;
  t.warp_value = value;
  swapcontext(&t.ctx, &s.main);
  return s.threads[s.current].warp_value;
}

// Releases every warp whose 32 threads all wait in a warp collective; returns how many were released.
inline unsigned release_warps() {
  Scheduler& s = sched();
  unsigned released = 0;
  for (size_t w = 0; w + 32 <= s.threads.size(); w += 32) {
    bool all = true;
    unsigned sum = 0;
    for (size_t i = w; i < w + 32; ++i) {
      const Thread& t = s.threads[i];
      all = all && t.waiting && t.barrier_kind == kWarpCollective;
      sum += t.warp_value;
    }
    if (!all) continue;
    for (size_t i = w; i < w + 32; ++i) {
      s.threads[i].waiting = false;
      s.threads[i].warp_value = sum;
    }
    ++released;
  }
  return released;
}

inline void seed(uint64_t value) { sched().rng.seed(value); }

// Runs kernel() for every thread of a grid of `grid` blocks of `block` threads.
template <class F>
void launch(unsigned grid, unsigned block, F&& kernel) {
  Scheduler& s = sched();
  std::function<void()> body = std::forward<F>(kernel);
  s.body = &body;
  gridDim = Dim3{grid, 1, 1};
  blockDim = Dim3{block, 1, 1};
  std::vector<unsigned> blocks(grid);
  for (unsigned b = 0; b < grid; ++b) blocks[b] = b;
  std::shuffle(blocks.begin(), blocks.end(), s.rng);
  s.threads.resize(block);
  std::vector<unsigned> order(block);
  for (unsigned b : blocks) {
    blockIdx = Dim3{b, 0, 0};
    for (unsigned i = 0; i < block; ++i) {
      Thread& t = s.threads[i];
      t.done = t.waiting = false;
      t.stack.resize(256 * 1024);
      getcontext(&t.ctx);
      t.ctx.uc_stack.ss_sp = t.stack.data();
      t.ctx.uc_stack.ss_size = t.stack.size();
      t.ctx.uc_link = &s.main;
      makecontext(&t.ctx, trampoline, 0);
      order[i] = i;
    }
    for (;;) {
      std::shuffle(order.begin(), order.end(), s.rng);
      for (unsigned i : order) {
        Thread& t = s.threads[i];
        if (t.done || t.waiting) continue;
        s.current = i;
        threadIdx = Dim3{i, 0, 0};
        swapcontext(&s.main, &t.ctx);
      }
      unsigned done = 0, waiting = 0, count = 0;
      for (Thread& t : s.threads) {
        done += t.done ? 1u : 0u;
        waiting += t.waiting ? 1u : 0u;
        count += t.waiting && t.value != 0 ? 1u : 0u;
      }
      if (done == block) break;
      if (release_warps() != 0) continue;
      if (done != 0) fail("barrier reached by only part of the block (some threads returned)");
      for (Thread& t : s.threads) {
        if (t.barrier_kind == kWarpCollective) fail("a warp collective not reached by every lane of the warp");
        if (t.barrier_kind != s.threads[0].barrier_kind) fail("threads wait at different kinds of barrier");
      }
      s.barrier_count = static_cast<int>(count);
      for (Thread& t : s.threads) t.waiting = false;
    }
  }
  s.body = nullptr;
}

}  // namespace cure_emu

// --- intrinsics ----------------------------------------------------------------------------------------
inline void __syncthreads() { cure_emu::barrier(0, 0); }
inline int __syncthreads_or(int v) { return cure_emu::barrier(1, v != 0) != 0 ? 1 : 0; }
inline int __syncthreads_count(int v) { return cure_emu::barrier(2, v != 0); }
inline void __threadfence() {}
inline unsigned int __reduce_add_sync(unsigned int mask, unsigned int value) {
  return cure_emu::warp_reduce_add(mask, value);
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  const unsigned int old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline unsigned int atomicMax(unsigned int* p, unsigned int v) {
  const unsigned int old = *p;
  *p = std::max(old, v);
  return old;
}
inline int __popc(unsigned int v) { return __builtin_popcount(v); }

// float32 arithmetic on the host is IEEE single with round to nearest even (SSE); this file must be
// compiled with -ffp-contract=off so that nothing is fused.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bfloat16 / half through c10's conversions (exact upcasts, round-to-nearest-even downcasts).
inline c10::BFloat16 __ushort_as_bfloat16(unsigned short bits) { return c10::BFloat16(bits, c10::BFloat16::from_bits()); }
inline float __bfloat162float(c10::BFloat16 x) { return static_cast<float>(x); }
inline c10::BFloat16 __float2bfloat16_rn(float x) { return c10::BFloat16(x); }
inline unsigned short __bfloat16_as_ushort(c10::BFloat16 x) { return x.x; }
inline c10::Half __ushort_as_half(unsigned short bits) { return c10::Half(bits, c10::Half::from_bits()); }
inline float __half2float(c10::Half x) { return static_cast<float>(x); }
inline c10::Half __float2half_rn(float x) { return c10::Half(x); }
inline unsigned short __half_as_ushort(c10::Half x) { return x.x; }
