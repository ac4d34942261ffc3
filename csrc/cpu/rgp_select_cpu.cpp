// CPU kernel of cure::rgp_select: the selection of cure::rgp_mask and cure::rgp_sgd_step alone.
//
// Per tensor, select_cpu.cpp's select_thresholds (without an apply pass after it) gives the exact
// threshold numpy.quantile(s, p) as float32 and the number of non-finite scores, bit for bit what the
// two ops compute before they apply the mask. Nothing is written to the inputs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "select_cpu.h"

namespace cure {

std::tuple<at::Tensor, at::Tensor> rgp_select_cpu(at::TensorList grads_nat, at::TensorList grads_adv, double alpha,
                                                  double p) {
  const int64_t count = static_cast<int64_t>(grads_nat.size());
  TORCH_CHECK(static_cast<int64_t>(grads_adv.size()) == count,
              "cure::rgp_select: grads_nat and grads_adv must have equal lengths, got len(grads_nat)=", count,
              ", len(grads_adv)=", grads_adv.size());
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, "cure::rgp_select: alpha must lie in [0, 1], got ", alpha);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "cure::rgp_select: p must lie in [0, 1], got ", p);
  std::vector<at::Tensor> nat(count), adv(count);
  std::vector<cpu::SelectInput> inputs;
  inputs.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& a = grads_nat[i];
    const at::Tensor& b = grads_adv[i];
    TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "cure::rgp_select (CPU kernel): tensor ", i,
                " is not on the CPU");
    TORCH_CHECK(b.sizes() == a.sizes(), "cure::rgp_select: grads_adv[", i, "] has shape ", b.sizes(),
                " but grads_nat[", i, "] has shape ", a.sizes());
    TORCH_CHECK(b.scalar_type() == a.scalar_type(), "cure::rgp_select: grads_adv[", i, "] has dtype ",
                b.scalar_type(), " but grads_nat[", i, "] has dtype ", a.scalar_type());
    TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf,
                "cure::rgp_select: grads_nat[", i, "] has dtype ", a.scalar_type(),
                "; supported are float32, bfloat16 and float16");
    TORCH_CHECK(a.numel() <= cpu::kMaxElements, "cure::rgp_select (CPU kernel): tensor ", i, " has ", a.numel(),
                " elements; at most 2^32 - 1 per tensor are supported");
    nat[i] = a.contiguous();
    adv[i] = b.contiguous();
    inputs.push_back({nat[i].data_ptr(), adv[i].data_ptr(), a.scalar_type(), a.numel()});
  }
  const std::vector<cpu::Selection> sel = cpu::select_thresholds(inputs, cpu::weights_of(alpha), p);
  auto thresholds = at::empty({count}, at::TensorOptions().dtype(at::kFloat));
  auto nonfinite = at::empty({count}, at::TensorOptions().dtype(at::kLong));
  float* thr_out = thresholds.data_ptr<float>();
  int64_t* nonfinite_out = nonfinite.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    thr_out[i] = sel[i].threshold;
    nonfinite_out[i] = sel[i].nonfinite;
  }
  return {thresholds, nonfinite};
}

}  // namespace cure

TORCH_LIBRARY_IMPL(cure, CPU, m) { m.impl("rgp_select", &cure::rgp_select_cpu); }
