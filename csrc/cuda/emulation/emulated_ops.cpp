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

// c10's CPU allocator fills new allocations with a NaN pattern when this is set: outputs or workspaces
// that a kernel forgets to write then show up as differences instead of passing by luck.
extern bool FLAGS_caffe2_cpu_allocator_do_junk_fill;

namespace cure_cuda {
namespace {

struct EmulatedExec {
  void zero(void* ptr, size_t bytes) { std::memset(ptr, 0, bytes); }
  void mask_stage(int stage, const MaskLaunch& L) {
    switch (stage) {
      case 0: cure_emu::launch(L.num_chunks, kThreads, [&L] { rgp_histogram_kernel(L); }); break;
      case 1: cure_emu::launch(L.num_chunks, kThreads, [&L] { rgp_refine_kernel(L); }); break;
      case 2: cure_emu::launch(L.num_chunks, kThreads, [&L] { rgp_resolve_kernel(L); }); break;
      default: cure_emu::launch(L.num_chunks, kThreads, [&L] { rgp_apply_kernel(L); }); break;
    }
  }
  void revise(const ReviseLaunch& L) { cure_emu::launch(L.num_chunks, kThreads, [&L] { revise_kernel(L); }); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_mask_emulated(std::vector<at::Tensor> updates,
                                                                 std::vector<at::Tensor> grads_nat,
                                                                 std::vector<at::Tensor> grads_adv, double alpha,
                                                                 double p, int64_t seed) {
  cure_emu::seed(static_cast<uint64_t>(seed));
  EmulatedExec exec;
  return rgp_mask_run(updates, grads_nat, grads_adv, alpha, p, exec);
}

void revise_emulated(std::vector<at::Tensor> revision, std::vector<at::Tensor> params, double decay, int64_t seed) {
  cure_emu::seed(static_cast<uint64_t>(seed));
  EmulatedExec exec;
  revise_run(revision, params, decay, exec);
}

void junk_fill(bool on) { FLAGS_caffe2_cpu_allocator_do_junk_fill = on; }

std::vector<int64_t> config() { return {kThreads, kItems, kChunk, kMaxTensorsPerLaunch}; }

}  // namespace
}  // namespace cure_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rgp_mask", &cure_cuda::rgp_mask_emulated, "rgp_mask kernels in the CPU emulation");
  m.def("revise", &cure_cuda::revise_emulated, "revise kernel in the CPU emulation");
  m.def("junk_fill", &cure_cuda::junk_fill, "fill new CPU allocations with a NaN pattern");
  m.def("config", &cure_cuda::config, "(threads, items per thread, chunk, tensors per launch)");
}
