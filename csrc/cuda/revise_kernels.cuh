// The revise kernel (paper Eq. 7): rev <- f32(decay)*rev + f32(1-decay)*param over all tensors of a
// call in one launch. Computed in float32, each product and the sum rounded separately, stored in
// rev's element type (round to nearest even), exactly like
// `rev.copy_(decay * rev.float() + (1 - decay) * param.float())`.
// Tensor lists read: tensors[i].rev (read and written), tensors[i].param (read).
// Bytes per element, float32: 8 read + 4 written = 12 (bf16/fp16: 6). Expected H100 time (~3.0 TB/s)
// for ResNet-18 (11.2 M parameters), ESTIMATE: ~45 us at the bandwidth limit, ~60 us at a typical 75 %.
#pragma once

#include "device_common.cuh"

namespace cure_cuda {

template <class E>
__device__ __forceinline__ void revise_body(const ReviseLaunch& L, const ReviseTensor& t, uint32_t chunk) {
  using Raw = typename E::Raw;
  constexpr int V = 16 / sizeof(Raw);
  const uint32_t lo = chunk * kChunk;
  const uint32_t m = t.n - lo < kChunk ? t.n - lo : kChunk;
  Raw* rev = static_cast<Raw*>(t.rev) + lo;
  const Raw* par = static_cast<const Raw*>(t.param) + lo;
  const bool vec = (t.flags & kVectorFlag) != 0;
  // Load everything first (kItems elements of each tensor per thread in flight), then compute and store.
  Raw rr[kItems], rp[kItems];
#pragma unroll
  for (int r = 0; r < kItems / V; ++r) {
    const uint32_t e0 = (static_cast<uint32_t>(r) * kThreads + threadIdx.x) * V;
    Raw a[V], b[V];
    if (vec && e0 + V <= m) {
      unpack(*reinterpret_cast<const uint4*>(rev + e0), a);
      unpack(*reinterpret_cast<const uint4*>(par + e0), b);
    } else {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        a[l] = e0 + l < m ? rev[e0 + l] : Raw(0);
        b[l] = e0 + l < m ? par[e0 + l] : Raw(0);
      }
    }
#pragma unroll
    for (int l = 0; l < V; ++l) {
      rr[r * V + l] = a[l];
      rp[r * V + l] = b[l];
    }
  }
  const float decay = L.decay;
  const float rest = L.one_minus_decay;
#pragma unroll
  for (int r = 0; r < kItems / V; ++r) {
    const uint32_t e0 = (static_cast<uint32_t>(r) * kThreads + threadIdx.x) * V;
    Raw out[V];
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const float x = __fadd_rn(__fmul_rn(decay, E::to_float(rr[r * V + l])), __fmul_rn(rest, E::to_float(rp[r * V + l])));
      out[l] = E::from_float(x);
    }
    if (vec && e0 + V <= m) {
      *reinterpret_cast<uint4*>(rev + e0) = pack(out);
    } else {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        if (e0 + l < m) rev[e0 + l] = out[l];
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) revise_kernel(const __grid_constant__ ReviseLaunch L) {
  const uint32_t i = find_tensor(L.chunk_begin, L.num_tensors, blockIdx.x);
  const ReviseTensor t = L.tensors[i];
  const uint32_t chunk = blockIdx.x - L.chunk_begin[i];
  switch (t.flags & kDTypeMask) {
    case kFloat32: revise_body<Float32>(L, t, chunk); break;
    case kBFloat16: revise_body<BFloat16>(L, t, chunk); break;
    default: revise_body<Float16>(L, t, chunk); break;
  }
}

}  // namespace cure_cuda
