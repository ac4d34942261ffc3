// The apply kernel of the fused CURE step, cure::rgp_sgd_step (formula: cure_kernels/sgd_step.py,
// rgp_sgd_step_reference): after the selection kernels of rgp_mask_kernels.cuh (stages 0-4, all tensors
// of the call done, so the call-wide non-finite flag is known), one pass per element
//   s = f32(alpha)*|g_nat| + f32(1-alpha)*|g_adv|;  below = s < thr;  g = below ? +0 : g   (stored)
//   d = g + f32(wd)*w;  v' = rnd(f32(mom)*v + d);  w' = rnd(w - f32(lr)*v')
//   mask_mode "update": v' = v, w' = w where below
//   skipped (skip flag nonzero, or any score of the call not finite, with a skip tensor given):
//     w, v keep their bits (not stored)
//   rev' = rnd(f32(decay)*rev + f32(1 - decay)*w_final)            (revision given)
// in float32 with every product and sum rounded separately (__fmul_rn/__fadd_rn: never contracted),
// bf16/fp16 upcast exactly and stored round-to-nearest-even. rnd() is the rounding to the tensor's type.
//
// Tensor lists: reads tensors[i].nat, .adv (only when thr > 0: otherwise nothing can be below it),
// .upd (the gradient; not when skipped), .param, .buf (not when skipped; param also when revising),
// .rev (when revising); writes .upd (zeros where below), .param and .buf (unless skipped), .rev.
// Each thread loads all its operands of a round before it stores anything,
// so the loads of a round are in flight together (no store-then-reload; the lists may alias). A round
// is one 16-byte vector of each list per thread (4 float32 or 8 bf16/fp16 elements).
//
// Bytes per element, float32 (bf16/fp16: half), ESTIMATE from the code: reads nat 4 + adv 4 + g 4 +
// w 4 + v 4 (+ rev 4) = 20 (24); writes w 4 + v 4 (+ rev 4) + the zeroed part of g (~4 B at p = 0.3: a
// partly zeroed sector is read and written) = 12 (16): ~32 B/element, ~40 with revision. With the
// selection (~8.7 B, rgp_mask_kernels.cuh) the fused step moves ~41-49 B/element; reading and writing
// what the formula needs once, after a one-read selection, is ~40-48.
// Expected H100 time (~3.0 TB/s, ~3.7 us per B/element) for ResNet-18 (11.2 M parameters), ESTIMATE:
// apply ~120 us without revision, ~150 us with; with the selection kernels (~55 us) ~175-205 us per
// step; with the selection overlapped with the last backward (cure::rgp_select on a side stream, then
// this kernel with the given thresholds: rgp_sgd_step_run), the apply pass alone after it.
#pragma once

#include "mask_common.cuh"

namespace cure_cuda {


template <class E>
__device__ __forceinline__ void sgd_step_body(const MaskLaunch& L, const BlockTensor& bt, float thr, bool skipped,
                                              uint32_t* sh_small) {
  using Raw = typename E::Raw;
  constexpr int V = 16 / sizeof(Raw);  // elements of each list per thread per round: one 16-byte vector
  constexpr int R = 1;                  // vectors per round (more raise registers, lower residency)
  const MaskTensor& t = bt.t;
  const uint32_t lo = bt.chunk * kChunk;
  const uint32_t m = t.n - lo < kChunk ? t.n - lo : kChunk;
  const bool vec = (t.flags & kVectorFlag) != 0;
  const bool scores = thr > 0.0f;  // thr <= 0 or NaN: no score is below it, the mask is empty
  const bool frozen_mode = (L.step_flags & kStepUpdateMode) != 0;
  const bool revise = (L.step_flags & kStepRevise) != 0;
  const Raw* nat = static_cast<const Raw*>(t.nat) + lo;
  const Raw* adv = static_cast<const Raw*>(t.adv) + lo;
  Raw* grad = static_cast<Raw*>(t.upd) + lo;
  Raw* param = static_cast<Raw*>(t.param) + lo;
  Raw* buf = static_cast<Raw*>(t.buf) + lo;
  Raw* rev = revise ? static_cast<Raw*>(t.rev) + lo : nullptr;
  const float alpha = L.alpha, beta = L.beta;
  const float lr = L.lr, mom = L.momentum, wd = L.weight_decay, decay = L.decay, keep = L.keep;
  if (threadIdx.x == 0) sh_small[0] = 0;
  __syncthreads();

  uint32_t zeroed = 0;
#pragma unroll 1
  for (int q = 0; q < kItems / (R * V); ++q) {
    const uint32_t base = static_cast<uint32_t>(q) * kThreads * (R * V);
    Raw rn[R][V], ra[R][V], rg[R][V], rw[R][V], rv[R][V], rr[R][V];
    // Loads (everything this round needs), then arithmetic, then stores.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t e0 = base + (static_cast<uint32_t>(r) * kThreads + threadIdx.x) * V;
      if (scores) {
        load_vector<Raw, V>(nat, e0, m, vec, rn[r]);
        load_vector<Raw, V>(adv, e0, m, vec, ra[r]);
      }
      if (!skipped) {
        load_vector<Raw, V>(grad, e0, m, vec, rg[r]);
        load_vector<Raw, V>(buf, e0, m, vec, rv[r]);
      }
      if (!skipped || revise) load_vector<Raw, V>(param, e0, m, vec, rw[r]);
      if (revise) load_vector<Raw, V>(rev, e0, m, vec, rr[r]);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t e0 = base + (static_cast<uint32_t>(r) * kThreads + threadIdx.x) * V;
      uint32_t below = 0;  // bit l: lane l is in the chunk and its score is below the threshold
      Raw w_out[V], v_out[V], r_out[V];
#pragma unroll
      for (int l = 0; l < V; ++l) {
        if (scores && e0 + l < m && rgp_score(E::to_float(rn[r][l]), E::to_float(ra[r][l]), alpha, beta) < thr) {
          below |= 1u << l;
        }
        const bool masked = ((below >> l) & 1u) != 0;
        Raw w_new = rw[r][l];
        if (!skipped) {
          const float g = masked ? 0.0f : E::to_float(rg[r][l]);  // the masked gradient is +0
          const float w = E::to_float(rw[r][l]);
          const float d = __fadd_rn(g, __fmul_rn(wd, w));
          Raw v_new = E::from_float(__fadd_rn(__fmul_rn(mom, E::to_float(rv[r][l])), d));
          w_new = E::from_float(__fsub_rn(w, __fmul_rn(lr, E::to_float(v_new))));
          if (frozen_mode && masked) {
            v_new = rv[r][l];
            w_new = rw[r][l];
          }
          v_out[l] = v_new;
          w_out[l] = w_new;
        }
        if (revise) {
          r_out[l] = E::from_float(__fadd_rn(__fmul_rn(decay, E::to_float(rr[r][l])), __fmul_rn(keep, E::to_float(w_new))));
        }
      }
      zeroed += static_cast<uint32_t>(__popc(below));
      if (vec && below == (1u << V) - 1u) {
        *reinterpret_cast<uint4*>(grad + e0) = make_uint4(0u, 0u, 0u, 0u);  // whole vector zeroed
      } else if (below != 0) {
#pragma unroll
        for (int l = 0; l < V; ++l) {
          if ((below >> l) & 1u) grad[e0 + l] = Raw(0);  // +0.0 in every element type
        }
      }
      if (!skipped) {
        store_vector<Raw, V>(buf, e0, m, vec, v_out);
        store_vector<Raw, V>(param, e0, m, vec, w_out);
      }
      if (revise) store_vector<Raw, V>(rev, e0, m, vec, r_out);
    }
  }
  if (zeroed != 0) atomicAdd(&sh_small[0], zeroed);
  __syncthreads();
  // kept: the selection kernels set it to n and each block subtracts its zeroed entries; with given
  // thresholds (kStepCountKept) it starts at 0 and each block adds its kept ones.
  const long long delta = (L.step_flags & kStepCountKept) != 0
                              ? static_cast<long long>(m) - static_cast<long long>(sh_small[0])
                              : -static_cast<long long>(sh_small[0]);
  if (threadIdx.x == 0 && delta != 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(&L.kept[bt.index]), static_cast<unsigned long long>(delta));
  }
}

__global__ void __launch_bounds__(kThreads, 2) rgp_sgd_step_kernel(const __grid_constant__ MaskLaunch L) {
  __shared__ uint32_t sh_small[2];
  const BlockTensor bt = block_tensor(L);
  if (bt.t.n == 0) return;
  const float thr = L.thresholds[bt.index];  // written by the selection kernels
  // The skip decision, on the device: the flag given, or any score of the call not finite (counted by
  // the selection kernels of every launch of the call, all finished before this kernel).
  // With given thresholds there is no call_nonfinite word: the skip flag already holds that decision.
  const bool skipped =
      L.skip != nullptr && (*L.skip != 0 || (L.call_nonfinite != nullptr && *L.call_nonfinite != 0));
  switch (bt.t.flags & kDTypeMask) {
    case kFloat32: sgd_step_body<Float32>(L, bt, thr, skipped, sh_small); break;
    case kBFloat16: sgd_step_body<BFloat16>(L, bt, thr, skipped, sh_small); break;
    default: sgd_step_body<Float16>(L, bt, thr, skipped, sh_small); break;
  }
}

}  // namespace cure_cuda
