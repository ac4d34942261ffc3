// Host side of the CUDA ops, written once for two executors: the CUDA one (cure_cuda_ops.cpp) and the
// CPU emulation of the kernels (emulation/emulated_ops.cpp). Everything here depends on shapes,
// dtypes and pointers only: no host synchronisation, no allocation whose size depends on data, so a
// call can be captured in a CUDA graph.
//
// An Exec provides:
//   void zero(void* ptr, size_t bytes);                 zero a workspace (stream-ordered)
//   void mask_stage(int stage, const MaskLaunch& L);    launch one selection / mask kernel (launchers.h)
//   void sgd_step(const MaskLaunch& L);                 launch the fused SGD step's apply kernel
//   void revise(const ReviseLaunch& L);                 launch the revise kernel
//   void finished(const TensorWork* work, size_t T);    after the last launch (the emulation reads the
//                                                       selection paths; the CUDA executor does nothing)
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
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

inline void check_nonnegative(const char* name, double value) {
  TORCH_CHECK(std::isfinite(value) && value >= 0.0, name, " must be a finite number >= 0, got ", value);
}

// The outputs of a call and the workspace its kernels share.
struct Selection {
  at::Tensor thresholds, kept, nonfinite;  // float32[T], int64[T], int64[T]
  at::Tensor work;                         // T TensorWork, then the call-wide non-finite word
  at::Tensor candidates;                   // radix regions (n per tensor), then bracket regions
  std::vector<MaskLaunch> launches;
};

// Plans a call over `inputs` and runs the selection kernels (stages 0-4) of every launch: afterwards
// every threshold, nonfinite count and the call-wide non-finite word are known on the device.
template <class Exec>
Selection select_run(const std::vector<MaskInput>& inputs, const at::Device& device, double alpha, double p,
                     Exec& exec) {
  const size_t T = inputs.size();
  const auto options = at::TensorOptions().device(device);
  Selection sel;
  sel.thresholds = at::empty({static_cast<int64_t>(T)}, options.dtype(at::kFloat));
  sel.kept = at::empty({static_cast<int64_t>(T)}, options.dtype(at::kLong));
  sel.nonfinite = at::empty({static_cast<int64_t>(T)}, options.dtype(at::kLong));
  if (T == 0) return sel;
  int64_t total = 0;
  for (const MaskInput& in : inputs) total += in.n + static_cast<int64_t>(bracket_capacity(in.n));
  const size_t work_bytes = T * sizeof(TensorWork) + 16;
  sel.work = at::empty({static_cast<int64_t>(work_bytes)}, options.dtype(at::kByte));
  exec.zero(sel.work.data_ptr(), work_bytes);
  auto* work = static_cast<TensorWork*>(sel.work.data_ptr());
  auto* call_nonfinite = reinterpret_cast<uint32_t*>(static_cast<unsigned char*>(sel.work.data_ptr()) +
                                                     T * sizeof(TensorWork));
  // Candidate slots: n per tensor covers the radix path's worst case (every score in the selected
  // level-1 bin), plus the bracket regions. Allocated, not touched: only candidates are written.
  sel.candidates = at::empty({total > 0 ? total : 1}, options.dtype(at::kInt));
  sel.launches = plan_rgp_mask(inputs, alpha, p, work, static_cast<uint32_t*>(sel.candidates.data_ptr()),
                               sel.thresholds.data_ptr<float>(),
                               reinterpret_cast<long long*>(sel.kept.data_ptr<int64_t>()),
                               reinterpret_cast<long long*>(sel.nonfinite.data_ptr<int64_t>()), call_nonfinite);
  for (const MaskLaunch& L : sel.launches) {
    for (int stage = 0; stage < kNumSelectStages; ++stage) exec.mask_stage(stage, L);
  }
  return sel;
}

// cure::rgp_select (csrc/cure_ops.cpp): the selection kernels of rgp_mask_run without its apply pass.
// Returns (thresholds float32[T], nonfinite int64[T]); nothing is written to the inputs.
template <class Exec>
std::tuple<at::Tensor, at::Tensor> rgp_select_run(at::TensorList grads_nat, at::TensorList grads_adv, double alpha,
                                                  double p, Exec& exec) {
  const size_t T = grads_nat.size();
  TORCH_CHECK(grads_adv.size() == T, "tensor lists must have equal lengths, got len(grads_nat)=", T,
              ", len(grads_adv)=", grads_adv.size());
  check_fraction("alpha", alpha);
  check_fraction("p", p);
  const at::Device device = T > 0 ? grads_nat[0].device() : at::Device(at::kCPU);
  std::vector<at::Tensor> nat(T), adv(T);
  std::vector<MaskInput> inputs(T);
  for (size_t i = 0; i < T; ++i) {
    const uint32_t code = dtype_code(grads_nat[i], "grads_nat", i);
    check_like(grads_nat[i], "grads_nat", grads_nat[i], "grads_nat", i, device);
    check_like(grads_adv[i], "grads_adv", grads_nat[i], "grads_nat", i, device);
    const int64_t n = grads_nat[i].numel();
    TORCH_CHECK(n <= kMaxElements, "grads_nat[", i, "] has ", n, " elements; the CUDA kernels take at most ",
                kMaxElements, " per tensor");
    nat[i] = grads_nat[i].contiguous();
    adv[i] = grads_adv[i].contiguous();
    // No update: the selection stages never touch MaskTensor::upd (only the apply kernel writes it).
    inputs[i] = MaskInput{nat[i].data_ptr(), adv[i].data_ptr(), nat[i].data_ptr(), n, code};
  }
  Selection sel = select_run(inputs, device, alpha, p, exec);
  if (T > 0) exec.finished(static_cast<const TensorWork*>(sel.work.data_ptr()), T);
  return {sel.thresholds, sel.nonfinite};
}

// Checks the thresholds / nonfinite arguments of rgp_sgd_step (both given or neither; as rgp_select returns them).
inline void check_given_stats(const std::optional<at::Tensor>& thresholds, const std::optional<at::Tensor>& nonfinite,
                              size_t T, const at::Device& device) {
  TORCH_CHECK(thresholds.has_value() == nonfinite.has_value(),
              "thresholds and nonfinite are given together (both from rgp_select) or not at all; got only ",
              thresholds.has_value() ? "thresholds" : "nonfinite");
  if (!thresholds.has_value()) return;
  const std::pair<const char*, std::pair<const at::Tensor*, at::ScalarType>> stats[] = {
      {"thresholds", {&*thresholds, at::kFloat}}, {"nonfinite", {&*nonfinite, at::kLong}}};
  for (const auto& [name, t_type] : stats) {
    const at::Tensor& t = *t_type.first;
    TORCH_CHECK(t.dim() == 1 && t.numel() == static_cast<int64_t>(T) && t.scalar_type() == t_type.second &&
                    t.is_contiguous() && (T == 0 || t.device() == device),
                name, " must be a contiguous 1-D ", t_type.second, " tensor of ", T, " elements on ", device,
                " (one per tensor, as rgp_select returns it), got shape ", t.sizes(), ", dtype ", t.scalar_type(),
                " on ", t.device());
  }
}

// The plan of an apply pass whose thresholds and non-finite counts are given (rgp_select's): copies of them
// as the call's statistics, kept counted from zero by the apply kernel (kStepCountKept), no workspace.
inline Selection given_selection(const std::vector<MaskInput>& inputs, const at::Tensor& thresholds,
                                 const at::Tensor& nonfinite, double alpha, double p) {
  Selection sel;
  sel.thresholds = thresholds.clone();
  sel.nonfinite = nonfinite.clone();
  sel.kept = at::zeros_like(nonfinite);
  sel.launches = plan_rgp_mask(inputs, alpha, p, nullptr, nullptr, sel.thresholds.data_ptr<float>(),
                               reinterpret_cast<long long*>(sel.kept.data_ptr<int64_t>()),
                               reinterpret_cast<long long*>(sel.nonfinite.data_ptr<int64_t>()), nullptr);
  return sel;
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

  // Contiguous operands (copies only where needed; sizes depend on shapes only).
  std::vector<at::Tensor> nat(T), adv(T), upd(T);
  std::vector<MaskInput> inputs(T);
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
  }
  Selection sel = select_run(inputs, device, alpha, p, exec);
  for (const MaskLaunch& L : sel.launches) exec.mask_stage(kStageApply, L);
  if (T > 0) exec.finished(static_cast<const TensorWork*>(sel.work.data_ptr()), T);
  for (size_t i = 0; i < T; ++i) {
    if (!upd[i].is_same(updates[i])) updates[i].copy_(upd[i]);
  }
  return {sel.thresholds, sel.kept, sel.nonfinite};
}

// cure::rgp_sgd_step (csrc/cure_ops.cpp; formula in cure_kernels/sgd_step.py).
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_sgd_step_run(
    at::TensorList params, at::TensorList grads, at::TensorList grads_nat, at::TensorList grads_adv,
    at::TensorList momentum_buffers, at::TensorList revision, double lr, double momentum, double weight_decay,
    double alpha, double p, std::string_view mask_mode, double decay, const std::optional<at::Tensor>& skip,
    const std::optional<at::Tensor>& thresholds, const std::optional<at::Tensor>& nonfinite, Exec& exec) {
  const size_t T = grads.size();
  TORCH_CHECK(params.size() == T && grads_nat.size() == T && grads_adv.size() == T && momentum_buffers.size() == T,
              "tensor lists must have equal lengths, got len(params)=", params.size(), ", len(grads)=", T,
              ", len(grads_nat)=", grads_nat.size(), ", len(grads_adv)=", grads_adv.size(),
              ", len(momentum_buffers)=", momentum_buffers.size());
  TORCH_CHECK(revision.empty() || revision.size() == T, "revision must be empty (no revision update) or have ", T,
              " tensors like params, got ", revision.size());
  check_fraction("alpha", alpha);
  check_fraction("p", p);
  check_fraction("momentum", momentum);
  check_fraction("decay", decay);
  check_nonnegative("lr", lr);
  check_nonnegative("weight_decay", weight_decay);
  TORCH_CHECK(mask_mode == "grad" || mask_mode == "update", "mask_mode must be 'grad' or 'update', got '",
              std::string(mask_mode), "'");
  const at::Device device = T > 0 ? grads[0].device() : at::Device(at::kCPU);
  at::Tensor skip_flag;  // one bool on the device (computed there: no host synchronisation)
  if (skip.has_value()) {
    TORCH_CHECK(skip->numel() == 1 && !skip->is_complex(),
                "skip must be None or a one-element real tensor, got shape ", skip->sizes(), " and dtype ",
                skip->scalar_type());
    TORCH_CHECK(T == 0 || skip->device() == device, "skip is on ", skip->device(), " but grads[0] is on ", device,
                "; pass a flag on the tensors' device");
  }
  check_given_stats(thresholds, nonfinite, T, device);
  const bool given = thresholds.has_value();
  const bool revise = !revision.empty();

  std::vector<at::Tensor> nat(T), adv(T), grd(T), prm(T), buf(T), rev(T);
  std::vector<MaskInput> inputs(T);
  for (size_t i = 0; i < T; ++i) {
    const uint32_t code = dtype_code(grads[i], "grads", i);
    check_like(grads_nat[i], "grads_nat", grads[i], "grads", i, device);
    check_like(grads_adv[i], "grads_adv", grads[i], "grads", i, device);
    check_like(params[i], "params", grads[i], "grads", i, device);
    check_like(momentum_buffers[i], "momentum_buffers", grads[i], "grads", i, device);
    if (revise) check_like(revision[i], "revision", grads[i], "grads", i, device);
    const int64_t n = grads[i].numel();
    TORCH_CHECK(n <= kMaxElements, "grads[", i, "] has ", n, " elements; the CUDA kernels take at most ",
                kMaxElements, " per tensor");
    nat[i] = grads_nat[i].contiguous();
    adv[i] = grads_adv[i].contiguous();
    grd[i] = grads[i].contiguous();  // written: copies are written back below
    prm[i] = params[i].contiguous();
    buf[i] = momentum_buffers[i].contiguous();
    if (revise) rev[i] = revision[i].contiguous();
    inputs[i] = MaskInput{nat[i].data_ptr(), adv[i].data_ptr(), grd[i].data_ptr(), n, code,
                          prm[i].data_ptr(), buf[i].data_ptr(), revise ? rev[i].data_ptr() : nullptr};
  }
  Selection sel = given ? given_selection(inputs, *thresholds, *nonfinite, alpha, p)
                        : select_run(inputs, device, alpha, p, exec);
  if (T == 0) return {sel.thresholds, sel.kept, sel.nonfinite};
  if (skip.has_value()) {
    skip_flag = skip->reshape({}).ne(0);  // NaN != 0: a NaN flag skips
    // Given counts: the call-wide non-finite decision is folded into the flag (the kernel then reads no
    // call_nonfinite word, which only the selection kernels write).
    if (given) skip_flag = skip_flag.logical_or(sel.nonfinite.sum().ne(0));
  }
  for (MaskLaunch& L : sel.launches) {
    L.skip = skip_flag.defined() ? static_cast<const unsigned char*>(skip_flag.data_ptr()) : nullptr;
    L.lr = static_cast<float>(lr);
    L.momentum = static_cast<float>(momentum);
    L.weight_decay = static_cast<float>(weight_decay);
    L.decay = static_cast<float>(decay);
    L.keep = static_cast<float>(1.0 - decay);
    L.step_flags = (mask_mode == "update" ? kStepUpdateMode : 0u) | (revise ? kStepRevise : 0u) |
                   (given ? kStepCountKept : 0u);
    exec.sgd_step(L);
  }
  if (!given) exec.finished(static_cast<const TensorWork*>(sel.work.data_ptr()), T);
  for (size_t i = 0; i < T; ++i) {
    if (!grd[i].is_same(grads[i])) grads[i].copy_(grd[i]);
    if (!prm[i].is_same(params[i])) params[i].copy_(prm[i]);
    if (!buf[i].is_same(momentum_buffers[i])) momentum_buffers[i].copy_(buf[i]);
    if (revise && !rev[i].is_same(revision[i])) revision[i].copy_(rev[i]);
  }
  return {sel.thresholds, sel.kept, sel.nonfinite};
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
