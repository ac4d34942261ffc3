// Host entry points of the CUDA kernels (defined in the *.cu files, which need no torch headers, so
// they compile quickly and in parallel with the ATen glue in cure_cuda_ops.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include "plan.h"

namespace cure_cuda {

// The four kernels of rgp_mask, in order; each launch covers every tensor of `L`.
enum MaskStage : int { kStageHistogram = 0, kStageRefine = 1, kStageResolve = 2, kStageApply = 3 };
constexpr int kNumMaskStages = 4;

void launch_rgp_mask_stage(int stage, const MaskLaunch& L, cudaStream_t stream);
void launch_revise(const ReviseLaunch& L, cudaStream_t stream);

}  // namespace cure_cuda
