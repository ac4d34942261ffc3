// The CUDA kernels of csrc/cuda compiled for the CPU emulation (cuda_emulation.h) and bound as Python
// functions on CPU tensors, with the same host code as the real ops (ops_host.h). Built on demand by
// csrc/cuda/emulation/check_emulated.py; not part of the extension.
#ifndef CURE_CUDA_EMULATION
#error "build with -DCURE_CUDA_EMULATION"
#endif

#include <torch/extension.h>

#include "../ops_host.h"
#include "../revise_kernels.cuh"
#include "../rgp_mask_kernels.cuh"
#include "../sgd_step_kernels.cuh"

// c10's CPU allocator fills new allocations with a NaN pattern when this is set: outputs or workspaces
// that a kernel forgets to write then show up as differences instead of passing by luck.
extern bool FLAGS_caffe2_cpu_allocator_do_junk_fill;

namespace cure_cuda {
namespace {

// How each tensor of the last call found its threshold (TensorWork::path; 0 for empty tensors).
std::vector<int64_t>& last_paths() {
  static std::vector<int64_t> paths;
  return paths;
}

struct EmulatedExec {
  void zero(void* ptr, size_t bytes) { std::memset(ptr, 0, bytes); }
  void mask_stage(int stage, const MaskLaunch& L) {
    switch (stage) {
      case kStageSample: cure_emu::launch(L.num_tensors, kThreads, [&L] { rgp_sample_kernel(L); }); break;
      case kStageCount: cure_emu::launch(L.num_chunks, kThreads, [&L] { rgp_count_kernel(L); }); break;
      case kStageFallback: cure_emu::launch(L.num_chunks, kThreads, [&L] { rgp_fallback_kernel(L); }); break;
      case kStageRefine: cure_emu::launch(L.num_chunks, kThreads, [&L] { rgp_refine_kernel(L); }); break;
      case kStageResolve: cure_emu::launch(L.num_chunks, kThreads, [&L] { rgp_resolve_kernel(L); }); break;
      default: cure_emu::launch(L.num_chunks, kThreads, [&L] { rgp_apply_kernel(L); }); break;
    }
  }
  void sgd_step(const MaskLaunch& L) { cure_emu::launch(L.num_chunks, kThreads, [&L] { rgp_sgd_step_kernel(L); }); }
  void revise(const ReviseLaunch& L) { cure_emu::launch(L.num_chunks, kThreads, [&L] { revise_kernel(L); }); }
  void finished(const TensorWork* work, size_t T) {
    last_paths().assign(T, 0);
    for (size_t i = 0; i < T; ++i) last_paths()[i] = work[i].path;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_mask_emulated(std::vector<at::Tensor> updates,
                                                                 std::vector<at::Tensor> grads_nat,
                                                                 std::vector<at::Tensor> grads_adv, double alpha,
                                                                 double p, int64_t seed) {
  cure_emu::seed(static_cast<uint64_t>(seed));
  EmulatedExec exec;
  last_paths().clear();
  return rgp_mask_run(updates, grads_nat, grads_adv, alpha, p, exec);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_sgd_step_emulated(
    std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> grads_nat,
    std::vector<at::Tensor> grads_adv, std::vector<at::Tensor> momentum_buffers, std::vector<at::Tensor> revision,
    double lr, double momentum, double weight_decay, double alpha, double p, std::string mask_mode, double decay,
    std::optional<at::Tensor> skip, int64_t seed) {
  cure_emu::seed(static_cast<uint64_t>(seed));
  EmulatedExec exec;
  last_paths().clear();
  return rgp_sgd_step_run(params, grads, grads_nat, grads_adv, momentum_buffers, revision, lr, momentum,
                          weight_decay, alpha, p, mask_mode, decay, skip, std::nullopt, std::nullopt, exec);
}

// rgp_sgd_step with the thresholds and non-finite counts given (rgp_select's): the apply kernel alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_sgd_step_given_emulated(
    std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> grads_nat,
    std::vector<at::Tensor> grads_adv, std::vector<at::Tensor> momentum_buffers, std::vector<at::Tensor> revision,
    double lr, double momentum, double weight_decay, double alpha, double p, std::string mask_mode, double decay,
    std::optional<at::Tensor> skip, std::optional<at::Tensor> thresholds, std::optional<at::Tensor> nonfinite,
    int64_t seed) {
  cure_emu::seed(static_cast<uint64_t>(seed));
  EmulatedExec exec;
  last_paths().clear();
  return rgp_sgd_step_run(params, grads, grads_nat, grads_adv, momentum_buffers, revision, lr, momentum,
                          weight_decay, alpha, p, mask_mode, decay, skip, thresholds, nonfinite, exec);
}

std::tuple<at::Tensor, at::Tensor> rgp_select_emulated(std::vector<at::Tensor> grads_nat,
                                                       std::vector<at::Tensor> grads_adv, double alpha, double p,
                                                       int64_t seed) {
  cure_emu::seed(static_cast<uint64_t>(seed));
  EmulatedExec exec;
  last_paths().clear();
  return rgp_select_run(grads_nat, grads_adv, alpha, p, exec);
}

void revise_emulated(std::vector<at::Tensor> revision, std::vector<at::Tensor> params, double decay, int64_t seed) {
  cure_emu::seed(static_cast<uint64_t>(seed));
  EmulatedExec exec;
  revise_run(revision, params, decay, exec);
}

void junk_fill(bool on) { FLAGS_caffe2_cpu_allocator_do_junk_fill = on; }

std::vector<int64_t> config() {
  return {kThreads, kItems, kChunk, kMaxTensorsPerLaunch, kSampleSize, kBracketMin, kCandShift};
}

std::vector<int64_t> paths() { return last_paths(); }

}  // namespace
}  // namespace cure_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rgp_mask", &cure_cuda::rgp_mask_emulated, "rgp_mask kernels in the CPU emulation");
  m.def("rgp_sgd_step", &cure_cuda::rgp_sgd_step_emulated, "rgp_sgd_step kernels in the CPU emulation");
  m.def("rgp_sgd_step_given", &cure_cuda::rgp_sgd_step_given_emulated,
        "rgp_sgd_step with given thresholds and nonfinite counts (the apply kernel alone) in the CPU emulation");
  m.def("rgp_select", &cure_cuda::rgp_select_emulated, "rgp_select (the selection kernels) in the CPU emulation");
  m.def("revise", &cure_cuda::revise_emulated, "revise kernel in the CPU emulation");
  m.def("paths", &cure_cuda::paths,
        "per tensor of the last rgp_mask / rgp_sgd_step / rgp_select call: 1 radix, 2 bracket counts, 3 bracket select, 4 miss");
  m.def("junk_fill", &cure_cuda::junk_fill, "fill new CPU allocations with a NaN pattern");
  m.def("config", &cure_cuda::config,
        "(threads, items per thread, chunk, tensors per launch, sample size, bracket minimum n, candidate shift)");
}
