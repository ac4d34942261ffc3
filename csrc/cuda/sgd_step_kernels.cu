// Launcher of the fused SGD step's apply kernel (sgd_step_kernels.cuh). No torch headers here: the
// caller checks cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK) after the launch.
//
// Resources (nvcc 13.0, sm_90, -O3 --fmad=false, -Xptxas -v), 256 threads per block: 128 registers
// (__launch_bounds__(256, 2): two blocks, 16 warps per SM), 8 B shared, no stack frame, no spills. Each
// thread has one 16-byte vector of up to six lists in flight per round: ~48 KB of loads per SM, above the
// ~15-20 KB that HBM3 latency x bandwidth per SM needs. Forcing three blocks per SM spills.
#include "launchers.h"
#include "sgd_step_kernels.cuh"

namespace cure_cuda {

void launch_sgd_step(const MaskLaunch& L, cudaStream_t stream) {
  rgp_sgd_step_kernel<<<dim3(L.num_chunks), kThreads, 0, stream>>>(L);
}

}  // namespace cure_cuda
