// Host entry points of the CUDA kernels (defined in the *.cu files, which need no torch headers, so
// they compile quickly and in parallel with the ATen glue in cure_cuda_ops.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include "plan.h"

namespace cure_cuda {

// Stages: see MaskStage in plan.h.
void launch_rgp_mask_stage(int stage, const MaskLaunch& L, cudaStream_t stream);
void launch_sgd_step(const MaskLaunch& L, cudaStream_t stream);
void launch_revise(const ReviseLaunch& L, cudaStream_t stream);

}  // namespace cure_cuda
