// Launchers of the selection and mask kernels (rgp_mask_kernels.cuh). No torch headers here: the
// caller checks cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK) after each launch.
//
// Built with -O3 --fmad=false; the kernels keep their keys in registers and read the ~13.9 KB
// MaskLaunch argument in place (__grid_constant__). Check registers and spills with -Xptxas -v.
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
