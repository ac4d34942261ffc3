// Launcher of the fused SGD step's apply kernel (sgd_step_kernels.cuh). No torch headers here: the
// caller checks cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK) after the launch.
#include "launchers.h"
#include "sgd_step_kernels.cuh"

namespace cure_cuda {

void launch_sgd_step(const MaskLaunch& L, cudaStream_t stream) {
  rgp_sgd_step_kernel<<<dim3(L.num_chunks), kThreads, 0, stream>>>(L);
}

}  // namespace cure_cuda
