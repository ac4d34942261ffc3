// Launcher of the revise kernel (revise_kernels.cuh). No torch headers here: the caller checks
// cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK) after the launch.
//
// Resources (nvcc 13.0, sm_90, -O3 --fmad=false, -Xptxas -v): 76 registers, no shared memory, 0 bytes
// stack frame, no spills. 3 blocks of 256 threads per SM; each thread holds 32 elements of rev and of
// param in flight, plenty for a streaming kernel.
#include "launchers.h"
#include "revise_kernels.cuh"

namespace cure_cuda {

void launch_revise(const ReviseLaunch& L, cudaStream_t stream) {
  revise_kernel<<<dim3(L.num_chunks), kThreads, 0, stream>>>(L);
}

}  // namespace cure_cuda
