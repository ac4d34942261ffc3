// Host side of the CUDA ops, written once for two executors: the CUDA one (cure_cuda_ops.cpp) and the
// CPU emulation of the kernels (emulation/emulated_ops.cpp). Everything here depends on shapes,
// dtypes and pointers only: no host synchronisation, no allocation whose size depends on data, so a
// call can be captured in a CUDA graph.
//
// An Exec provides:
//   void zero(void* ptr, size_t bytes);                 zero a workspace (stream-ordered)
//   void mask_stage(int stage, const MaskLaunch& L);    launch one rgp_mask kernel (launchers.h)
//   void revise(const ReviseLaunch& L);                 launch the revise kernel
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "plan.h"

namespace cure_cuda {

inline uint32_t dtype_code(const at::Tensor& t, const char* name, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default:
      TORCH_CHECK(false, name, "[", i, "] has dtype ", t.scalar_type(),
                  "; supported dtypes are float32, bfloat16, float16");
  }
  return kFloat32;
}

// Checks one tensor against the first list's tensor at the same index (the public API validates the
// same things before any backend runs; these checks guard direct calls of torch.ops.cure.*).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& first, const char* first_name,
                       size_t i, const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, "[", i, "] is on ", t.device(), " but ", first_name, "[0] is on ",
              device, "; all tensors of one call must be on the same device");
  TORCH_CHECK(t.sizes() == first.sizes(), name, "[", i, "] has shape ", t.sizes(), " but ", first_name, "[", i,
              "] has shape ", first.sizes(), "; corresponding tensors must match");
  TORCH_CHECK(t.scalar_type() == first.scalar_type(), name, "[", i, "] has dtype ", t.scalar_type(), " but ",
              first_name, "[", i, "] has dtype ", first.scalar_type(), "; corresponding tensors must match");
}

inline void check_fraction(const char* name, double value) {
  TORCH_CHECK(value >= 0.0 && value <= 1.0, name, " must be a finite number in [0, 1], got ", value);
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_mask_run(at::TensorList updates, at::TensorList grads_nat,
                                                            at::TensorList grads_adv, double alpha, double p,
                                                            Exec& exec) {
  const size_t T = updates.size();
  TORCH_CHECK(grads_nat.size() == T && grads_adv.size() == T,
              "tensor lists must have equal lengths, got len(updates)=", T, ", len(grads_nat)=", grads_nat.size(),
              ", len(grads_adv)=", grads_adv.size());
  check_fraction("alpha", alpha);
  check_fraction("p", p);
  const at::Device device = T > 0 ? updates[0].device() : at::Device(at::kCPU);
  const auto options = at::TensorOptions().device(device);
  const int64_t count = static_cast<int64_t>(T);
  at::Tensor thresholds = at::empty({count}, options.dtype(at::kFloat));
  at::Tensor kept = at::empty({count}, options.dtype(at::kLong));
  at::Tensor nonfinite = at::empty({count}, options.dtype(at::kLong));
  if (T == 0) return {thresholds, kept, nonfinite};

  // Contiguous operands (copies only where needed; sizes depend on shapes only).
  std::vector<at::Tensor> nat(T), adv(T), upd(T);
  std::vector<MaskInput> inputs(T);
  int64_t total = 0;
  for (size_t i = 0; i < T; ++i) {
    const uint32_t code = dtype_code(updates[i], "updates", i);
    check_like(updates[i], "updates", updates[i], "updates", i, device);
    check_like(grads_nat[i], "grads_nat", updates[i], "updates", i, device);
    check_like(grads_adv[i], "grads_adv", updates[i], "updates", i, device);
    const int64_t n = updates[i].numel();
    TORCH_CHECK(n <= kMaxElements, "updates[", i, "] has ", n, " elements; the CUDA kernels take at most ",
                kMaxElements, " per tensor");
    nat[i] = grads_nat[i].contiguous();
    adv[i] = grads_adv[i].contiguous();
    upd[i] = updates[i].contiguous();  // the tensor itself when contiguous, else a copy written back below
    inputs[i] = MaskInput{nat[i].data_ptr(), adv[i].data_ptr(), upd[i].data_ptr(), n, code};
    total += n;
  }

  at::Tensor work = at::empty({static_cast<int64_t>(T * sizeof(TensorWork))}, options.dtype(at::kByte));
  exec.zero(work.data_ptr(), T * sizeof(TensorWork));
  // Candidate slots: n per tensor covers the worst case (every score in the selected level-1 bin).
  at::Tensor candidates = at::empty({total > 0 ? total : 1}, options.dtype(at::kInt));
  const std::vector<MaskLaunch> launches = plan_rgp_mask(
      inputs, alpha, p, static_cast<TensorWork*>(work.data_ptr()), static_cast<uint32_t*>(candidates.data_ptr()),
      thresholds.data_ptr<float>(), reinterpret_cast<long long*>(kept.data_ptr<int64_t>()),
      reinterpret_cast<long long*>(nonfinite.data_ptr<int64_t>()));
  for (const MaskLaunch& L : launches) {
    for (int stage = 0; stage < 4; ++stage) exec.mask_stage(stage, L);
  }
  for (size_t i = 0; i < T; ++i) {
    if (!upd[i].is_same(updates[i])) updates[i].copy_(upd[i]);
  }
  return {thresholds, kept, nonfinite};
}

template <class Exec>
void revise_run(at::TensorList revision, at::TensorList params, double decay, Exec& exec) {
  const size_t T = revision.size();
  TORCH_CHECK(params.size() == T, "tensor lists must have equal lengths, got len(revision)=", T,
              ", len(params)=", params.size());
  check_fraction("decay", decay);
  if (T == 0) return;
  const at::Device device = revision[0].device();
  std::vector<at::Tensor> rev(T), par(T);
  std::vector<ReviseInput> inputs(T);
  for (size_t i = 0; i < T; ++i) {
    const uint32_t code = dtype_code(revision[i], "revision", i);
    check_like(revision[i], "revision", revision[i], "revision", i, device);
    check_like(params[i], "params", revision[i], "revision", i, device);
    const int64_t n = revision[i].numel();
    TORCH_CHECK(n <= kMaxElements, "revision[", i, "] has ", n, " elements; the CUDA kernels take at most ",
                kMaxElements, " per tensor");
    rev[i] = revision[i].contiguous();
    par[i] = params[i].contiguous();
    inputs[i] = ReviseInput{rev[i].data_ptr(), par[i].data_ptr(), n, code};
  }
  for (const ReviseLaunch& L : plan_revise(inputs, decay)) exec.revise(L);
  for (size_t i = 0; i < T; ++i) {
    if (!rev[i].is_same(revision[i])) revision[i].copy_(rev[i]);
  }
}

}  // namespace cure_cuda
