// CUDA implementations of cure::rgp_mask, cure::rgp_sgd_step, cure::rgp_select and cure::revise (schemas in
// csrc/cure_ops.cpp): ATen glue around the kernels of rgp_mask_kernels.cu, sgd_step_kernels.cu and
// revise_kernels.cu. Every launch goes to the current
// stream of the tensors' device; nothing here waits for the GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream is this function (ATen/cuda/CUDAContext.h
                                  // would also pull in cuBLAS/cuSPARSE headers, which kernels do not need)
#include <torch/library.h>

#include "launchers.h"
#include "ops_host.h"

namespace cure_cuda {
namespace {

struct CudaExec {
  cudaStream_t stream;

  void zero(void* ptr, size_t bytes) { C10_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, stream)); }
  void mask_stage(int stage, const MaskLaunch& L) {
    launch_rgp_mask_stage(stage, L, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void sgd_step(const MaskLaunch& L) {
    launch_sgd_step(L, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void revise(const ReviseLaunch& L) {
    launch_revise(L, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void finished(const TensorWork*, size_t) {}
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_mask_cuda(at::TensorList updates, at::TensorList grads_nat,
                                                             at::TensorList grads_adv, double alpha, double p) {
  TORCH_CHECK(!updates.empty(), "rgp_mask: empty tensor lists carry no device; handle them before dispatch");
  const c10::cuda::CUDAGuard guard(updates[0].device());
  CudaExec exec{c10::cuda::getCurrentCUDAStream().stream()};
  return rgp_mask_run(updates, grads_nat, grads_adv, alpha, p, exec);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_sgd_step_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList grads_nat, at::TensorList grads_adv,
    at::TensorList momentum_buffers, at::TensorList revision, double lr, double momentum, double weight_decay,
    double alpha, double p, c10::string_view mask_mode, double decay, const std::optional<at::Tensor>& skip,
    const std::optional<at::Tensor>& thresholds, const std::optional<at::Tensor>& nonfinite) {
  TORCH_CHECK(!grads.empty(), "rgp_sgd_step: empty tensor lists carry no device; handle them before dispatch");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  CudaExec exec{c10::cuda::getCurrentCUDAStream().stream()};
  return rgp_sgd_step_run(params, grads, grads_nat, grads_adv, momentum_buffers, revision, lr, momentum,
                          weight_decay, alpha, p, std::string_view(mask_mode.data(), mask_mode.size()), decay, skip,
                          thresholds, nonfinite, exec);
}

std::tuple<at::Tensor, at::Tensor> rgp_select_cuda(at::TensorList grads_nat, at::TensorList grads_adv, double alpha,
                                                   double p) {
  TORCH_CHECK(!grads_nat.empty(), "rgp_select: empty tensor lists carry no device; handle them before dispatch");
  const c10::cuda::CUDAGuard guard(grads_nat[0].device());
  CudaExec exec{c10::cuda::getCurrentCUDAStream().stream()};
  return rgp_select_run(grads_nat, grads_adv, alpha, p, exec);
}

void revise_cuda(at::TensorList revision, at::TensorList params, double decay) {
  if (revision.empty()) return;
  const c10::cuda::CUDAGuard guard(revision[0].device());
  CudaExec exec{c10::cuda::getCurrentCUDAStream().stream()};
  revise_run(revision, params, decay, exec);
}

}  // namespace
}  // namespace cure_cuda

TORCH_LIBRARY_IMPL(cure, CUDA, m) {
  m.impl("rgp_mask", &cure_cuda::rgp_mask_cuda);
  m.impl("rgp_sgd_step", &cure_cuda::rgp_sgd_step_cuda);
  m.impl("rgp_select", &cure_cuda::rgp_select_cuda);
  m.impl("revise", &cure_cuda::revise_cuda);
}
