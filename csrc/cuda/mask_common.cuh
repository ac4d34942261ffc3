// Helpers shared by the selection/mask kernels (rgp_mask_kernels.cuh) and the fused SGD step
// (sgd_step_kernels.cuh): multi-tensor block mapping and score loading.
//
// Multi-tensor layout (apex multi_tensor_apply style): every tensor is cut into chunks of kChunk
// elements, one block per chunk; block b finds its tensor by binary search in chunk_begin.
#pragma once

#include "device_common.cuh"

namespace cure_cuda {

// Item i of a thread is element ((i / V) * kThreads + tid) * V + i % V of its chunk, V elements per
// 16-byte vector: consecutive threads read consecutive vectors.
template <int V>
__device__ __forceinline__ uint32_t item_offset(int i) {
  return (static_cast<uint32_t>(i / V) * kThreads + threadIdx.x) * V + static_cast<uint32_t>(i % V);
}

// V raw elements at p[e0 .. e0 + V) (one 16-byte load when `vec` and the vector is inside [0, m));
// lanes at or past m read as 0.
template <class Raw, int V>
__device__ __forceinline__ void load_vector(const Raw* p, uint32_t e0, uint32_t m, bool vec, Raw (&out)[V]) {
  if (vec && e0 + V <= m) {
    unpack(*reinterpret_cast<const uint4*>(p + e0), out);
  } else {
#pragma unroll
    for (int l = 0; l < V; ++l) out[l] = e0 + l < m ? p[e0 + l] : Raw(0);
  }
}

// Stores the lanes of `in` inside [0, m) (one 16-byte store when `vec` and the vector is inside).
template <class Raw, int V>
__device__ __forceinline__ void store_vector(Raw* p, uint32_t e0, uint32_t m, bool vec, const Raw (&in)[V]) {
  if (vec && e0 + V <= m) {
    *reinterpret_cast<uint4*>(p + e0) = pack(in);
  } else {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      if (e0 + l < m) p[e0 + l] = in[l];
    }
  }
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
    load_vector<Raw, V>(nat, e0, m, vec, rn);
    load_vector<Raw, V>(adv, e0, m, vec, ra);
#pragma unroll
    for (int l = 0; l < V; ++l) s[r * V + l] = rgp_score(E::to_float(rn[l]), E::to_float(ra[l]), alpha, beta);
  }
}

// The keys of load_scores, and bit i of `valid` set when item i lies inside the chunk.
template <class E>
__device__ __forceinline__ void load_keys(const MaskTensor& t, uint32_t lo, uint32_t hi, float alpha, float beta,
                                          uint32_t (&keys)[kItems], uint32_t& valid) {
  constexpr int V = 16 / sizeof(typename E::Raw);
  float s[kItems];
  load_scores<E>(t, lo, hi, alpha, beta, s);
  valid = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    keys[i] = score_key(s[i]);
    if (item_offset<V>(i) < hi - lo) valid |= 1u << i;
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

// Blocks needed for `count` entries of a list, kChunk per block (at least one: it finishes the tensor).
__device__ __forceinline__ uint32_t list_blocks(uint32_t count) {
  return count == 0 ? 1u : (count - 1u) / kChunk + 1u;
}

}  // namespace cure_cuda
