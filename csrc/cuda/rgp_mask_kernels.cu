// Launchers of the selection and mask kernels (rgp_mask_kernels.cuh). No torch headers here: the
// caller checks cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK) after each launch.
//
// Resources (nvcc 13.0, sm_90, -O3 --fmad=false, -Xptxas -v), 256 threads per block, all with 0 bytes
// stack frame and no spills (keys stay in registers; the ~13.9 KB MaskLaunch argument is read in place,
// __grid_constant__):
//   rgp_sample_kernel    254 registers, 10256 B shared (one block per tensor: 64 sample keys per thread)
//   rgp_count_kernel      80 registers, 10304 B shared (level-1 histogram 8 KB + scan buffer 2 KB)
//   rgp_fallback_kernel   55 registers, 10260 B shared
//   rgp_refine_kernel     80 registers, 10272 B shared
//   rgp_resolve_kernel    80 registers,  4128 B shared
//   rgp_apply_kernel      64 registers,     8 B shared
// 80 registers allow 3 blocks (768 threads) per SM, each thread with 32 elements of g_nat and g_adv in
// flight: ~190 KB of loads per SM, far above what HBM3 needs to stay busy.
#include "launchers.h"
#include "rgp_mask_kernels.cuh"

namespace cure_cuda {

void launch_rgp_mask_stage(int stage, const MaskLaunch& L, cudaStream_t stream) {
  const dim3 grid(L.num_chunks);
  switch (stage) {
    case kStageSample: rgp_sample_kernel<<<dim3(L.num_tensors), kThreads, 0, stream>>>(L); break;
    case kStageCount: rgp_count_kernel<<<grid, kThreads, 0, stream>>>(L); break;
    case kStageFallback: rgp_fallback_kernel<<<grid, kThreads, 0, stream>>>(L); break;
    case kStageRefine: rgp_refine_kernel<<<grid, kThreads, 0, stream>>>(L); break;
    case kStageResolve: rgp_resolve_kernel<<<grid, kThreads, 0, stream>>>(L); break;
    default: rgp_apply_kernel<<<grid, kThreads, 0, stream>>>(L); break;
  }
}

}  // namespace cure_cuda
