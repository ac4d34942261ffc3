// Launchers of the rgp_mask kernels (rgp_mask_kernels.cuh). No torch headers here: the caller checks
// cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK) after each launch.
#include "launchers.h"
#include "rgp_mask_kernels.cuh"

namespace cure_cuda {

void launch_rgp_mask_stage(int stage, const MaskLaunch& L, cudaStream_t stream) {
  const dim3 grid(L.num_chunks);
  switch (stage) {
    case kStageHistogram: rgp_histogram_kernel<<<grid, kThreads, 0, stream>>>(L); break;
    case kStageRefine: rgp_refine_kernel<<<grid, kThreads, 0, stream>>>(L); break;
    case kStageResolve: rgp_resolve_kernel<<<grid, kThreads, 0, stream>>>(L); break;
    default: rgp_apply_kernel<<<grid, kThreads, 0, stream>>>(L); break;
  }
}

}  // namespace cure_cuda
