// Launchers of the rgp_mask kernels (rgp_mask_kernels.cuh). No torch headers here: the caller checks
// cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK) after each launch.
//
// Resources (nvcc 13.0, sm_90, -O3 --fmad=false, -Xptxas -v), 256 threads per block:
//   rgp_histogram_kernel  54 registers, 10272 B shared (level-1 histogram 8 KB + scan buffer 2 KB)
//   rgp_refine_kernel     61 registers, 10272 B shared (level-2 histogram + scan buffer)
//   rgp_resolve_kernel    48 registers,  4128 B shared (level-3 histogram + scan buffer)
//   rgp_apply_kernel      64 registers,     8 B shared
// all with 0 bytes stack frame and no spills: the 32 scores per thread stay in registers, and the
// ~7.7 KB MaskLaunch argument is read in place (__grid_constant__) rather than copied to local memory.
// Registers limit residency to 4 blocks (1024 threads) per SM; with 32 elements of each input in flight
// per thread that is ~256 KB of loads in flight per SM, far above what HBM3 needs to stay busy.
// Compiles in ~5 s on 2 cores (no torch headers).
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
