// CPU kernel of cure::rgp_mask: exact per-tensor p-quantile masking of the update by Robust
// Gradient Prominence (paper Eq. 6), bit for bit equal to numpy.quantile (docs/method.md).
//
// Per tensor: select_cpu.cpp finds the threshold exactly, reading the gradients once for large
// tensors (the sampling bracket; docs/selection.md); right after it, on the same thread (or on all
// threads for a tensor split over them), the apply pass zeroes update[s < thr], reading and writing the
// update once per element. A bracket hit decides s < thr from the classes its pass kept (2 bits per
// element and the keys inside the bracket: select_cpu.h, Classes), so the gradients are read once in
// all; any other tensor has its scores recomputed (8 B of gradients read again). A tensor whose
// threshold is NaN or 0 masks nothing and is not read again.
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "select_cpu.h"

namespace cure {
namespace {

using cpu::Weights;

struct Entry {
  at::Tensor update, nat, adv;  // contiguous (copies where the caller's were not)
  int64_t n;
};

// Zeroes update[i] where s_i < thr: from the scores (masked == nullptr) or from masked[i] (BYTES).
template <typename T, bool BYTES>
inline __attribute__((always_inline)) int64_t mask_range(T* update, const T* nat, const T* adv, const uint8_t* masked,
                                                         int64_t n, Weights w, float thr) {
  int64_t kept = 0;
  // The update may be g_nat or g_adv itself: each element's score is read before it is written, and
  // no iteration reads what another writes.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = BYTES ? masked[i] == 0 : !(cpu::score(nat[i], adv[i], w) < thr);
    update[i] = keep ? update[i] : T(0);
    kept += keep;
  }
  return kept;
}

CURE_TARGET_AVX2 int64_t mask_range_avx2(float* update, const float* nat, const float* adv, int64_t n, Weights w,
                                        float thr) {
  return mask_range<float, false>(update, nat, adv, nullptr, n, w, thr);
}

template <typename T>
int64_t mask_typed(const Entry& e, int64_t begin, int64_t end, Weights w, float thr, const uint8_t* masked) {
  T* update = e.update.data_ptr<T>() + begin;
  const T* nat = e.nat.data_ptr<T>() + begin;
  const T* adv = e.adv.data_ptr<T>() + begin;
  const int64_t n = end - begin;
  if constexpr (std::is_same_v<T, float>) {  // (float32 from the classes: cpu::mask_f32)
    if (cpu::has_avx2() && masked == nullptr) return mask_range_avx2(update, nat, adv, n, w, thr);
  }
  return masked != nullptr ? mask_range<T, true>(update, nat, adv, masked, n, w, thr)
                           : mask_range<T, false>(update, nat, adv, masked, n, w, thr);
}

// One chunk [begin, end) of a tensor; masked: one byte per element (cpu::masked_bytes), or nullptr to
// compare the recomputed scores with thr.
int64_t mask_chunk(const Entry& e, int64_t begin, int64_t end, Weights w, float thr, const uint8_t* masked) {
  switch (e.update.scalar_type()) {
    case at::kFloat: return mask_typed<float>(e, begin, end, w, thr, masked);
    case at::kBFloat16: return mask_typed<c10::BFloat16>(e, begin, end, w, thr, masked);
    case at::kHalf: return mask_typed<c10::Half>(e, begin, end, w, thr, masked);
    default: TORCH_CHECK(false, "cure::rgp_mask: unsupported dtype ", e.update.scalar_type());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_mask_cpu(at::TensorList updates, at::TensorList grads_nat,
                                                            at::TensorList grads_adv, double alpha, double p) {
  const int64_t count = static_cast<int64_t>(updates.size());
  TORCH_CHECK(static_cast<int64_t>(grads_nat.size()) == count && static_cast<int64_t>(grads_adv.size()) == count,
              "cure::rgp_mask: updates, grads_nat and grads_adv must have equal lengths");
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, "cure::rgp_mask: alpha must lie in [0, 1], got ", alpha);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "cure::rgp_mask: p must lie in [0, 1], got ", p);
  std::vector<Entry> entries;
  entries.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& u = updates[i];
    TORCH_CHECK(u.device().is_cpu() && grads_nat[i].device().is_cpu() && grads_adv[i].device().is_cpu(),
                "cure::rgp_mask (CPU kernel): tensor ", i, " is not on the CPU");
    TORCH_CHECK(grads_nat[i].sizes() == u.sizes() && grads_adv[i].sizes() == u.sizes(),
                "cure::rgp_mask: shapes of tensor ", i, " differ");
    TORCH_CHECK(grads_nat[i].scalar_type() == u.scalar_type() && grads_adv[i].scalar_type() == u.scalar_type(),
                "cure::rgp_mask: dtypes of tensor ", i, " differ");
    TORCH_CHECK(u.numel() <= cpu::kMaxElements, "cure::rgp_mask (CPU kernel): tensor ", i, " has ", u.numel(),
                " elements; at most 2^32 - 1 per tensor are supported");
    entries.push_back({u.contiguous(), grads_nat[i].contiguous(), grads_adv[i].contiguous(), u.numel()});
  }
  const Weights w = cpu::weights_of(alpha);
  std::vector<cpu::SelectInput> inputs;
  inputs.reserve(count);
  for (const Entry& e : entries)
    inputs.push_back({e.nat.data_ptr(), e.adv.data_ptr(), e.update.scalar_type(), e.n});
  // Each tensor is masked right after its selection, while what it needs is still in the cache.
  std::vector<int64_t> kept_count(count, 0);
  cpu::ClassesLease classes;
  const cpu::AfterSelect mask_tensor = [&](int64_t i, const cpu::Selection& s, bool split) {
    const Entry& e = entries[i];
    if (!cpu::masks_anything(s.threshold)) {
      kept_count[i] = e.n;
      return;
    }
    const cpu::Classes* c = cpu::deciding_classes(*classes, i, s.threshold);
    const auto chunk = [&](int64_t begin, int64_t end) -> int64_t {
      if (c == nullptr) return mask_chunk(e, begin, end, w, s.threshold, nullptr);
      if (e.update.scalar_type() == at::kFloat)
        return cpu::mask_f32(*c, begin, end, s.threshold, e.update.data_ptr<float>() + begin);
      return mask_chunk(e, begin, end, w, s.threshold, cpu::masked_bytes(*c, begin, end, s.threshold));
    };
    kept_count[i] = split ? cpu::apply_backwards_split(e.n, chunk) : cpu::apply_backwards(0, e.n, chunk);
  };
  const std::vector<cpu::Selection> sel = cpu::select_thresholds(inputs, w, p, mask_tensor, classes.get());

  auto stats = cpu::mask_stats(sel, kept_count);
  for (int64_t i = 0; i < count; ++i) {
    // The kernel wrote into a contiguous copy where the caller's update was strided: write it back.
    if (!entries[i].update.is_same(updates[i])) updates[i].copy_(entries[i].update);
  }
  return stats;
}

}  // namespace cure

TORCH_LIBRARY_IMPL(cure, CPU, m) { m.impl("rgp_mask", &cure::rgp_mask_cpu); }
