// Launcher of the revise kernel (revise_kernels.cuh). No torch headers here: the caller checks
// cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK) after the launch.
#include "launchers.h"
#include "revise_kernels.cuh"

namespace cure_cuda {

void launch_revise(const ReviseLaunch& L, cudaStream_t stream) {
  revise_kernel<<<dim3(L.num_chunks), kThreads, 0, stream>>>(L);
}

}  // namespace cure_cuda
