// CPU kernel of cure::rgp_sgd_step: the conserve mask (paper Eq. 6), the torch.optim.SGD update
// (momentum, weight decay, dampening 0, no Nesterov) in mask mode "grad" or "update", and the
// revision EMA (paper Eq. 7), bit for bit equal to cure_kernels.sgd_step.rgp_sgd_step_reference.
//
// select_cpu.cpp finds every tensor's threshold and non-finite count exactly (large tensors: one read
// of g_nat and g_adv, the sampling bracket; docs/selection.md). The apply pass of a tensor reads g,
// param, buf (and rev) once and writes the masked g, param, buf (and rev); it decides s < thr from the
// classes the bracket pass kept (select_cpu.h, Classes) or, for any other tensor, reads g_nat and g_adv
// again to recompute the score (not at all where the threshold masks nothing). Without skip it runs
// right after the tensor's selection (what it reads still in the cache). With skip, the decision (skip
// nonzero, or any score of the call not finite) needs every tensor's non-finite count, so no parameter
// is written before every tensor is selected; then one apply pass runs over all tensors' chunks in
// parallel. With thresholds and nonfinite given (from cure::rgp_select), there is no selection and no
// classes: that apply pass runs at once, recomputing the scores.
//
// Per element, in float32 with every product and sum rounded separately (-ffp-contract=off), values
// upcast exactly from bfloat16/float16 and stored round-to-nearest-even:
//   g' = s < thr ? 0 : g;  d = g' + wd*w;  v' = T(mom*v + d);  w' = T(w - lr*v')
//   mask mode "update": w', v' = w, v where s < thr;  skipped: w', v' = w, v
//   rev' = T(decay*rev + (1 - decay)*w')
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "select_cpu.h"

namespace cure {
namespace {

using cpu::Weights;

struct Entry {
  at::Tensor param, grad, nat, adv, buf, rev;  // contiguous (copies where the caller's were not); rev may be undefined
  int64_t n;
};

struct Hyper {
  Weights w;
  float lr, momentum, weight_decay, decay, keep;  // each rounded to float32; keep = f32(1 - decay)
};

// Where an apply pass takes s < thr from: nowhere (thr masks nothing), the recomputed scores, or one
// byte per element from the bracket's classes (cpu::masked_bytes).
enum Mask : int { kNoMask = 0, kScores = 1, kBytes = 2 };

// One chunk of one tensor. MASK: see Mask; FREEZE: mask mode "update"; STEP: the SGD update is applied
// (not skipped); REVISE: the revision EMA runs.
template <typename T, int MASK, bool FREEZE, bool STEP, bool REVISE>
inline __attribute__((always_inline)) int64_t apply_range(const Entry& e, int64_t begin, int64_t end, const Hyper& h,
                                                          float thr, const uint8_t* mask_bytes) {
  T* grad = e.grad.data_ptr<T>() + begin;
  T* param = e.param.data_ptr<T>() + begin;
  T* buf = e.buf.data_ptr<T>() + begin;
  const T* nat = e.nat.data_ptr<T>() + begin;
  const T* adv = e.adv.data_ptr<T>() + begin;
  T* rev = REVISE ? e.rev.data_ptr<T>() + begin : nullptr;
  const int64_t n = end - begin;
  int64_t kept = 0;
  // No iteration reads an element another iteration writes (grad may be g_nat or g_adv itself: each
  // element's score is read before its masked value is written), so the loop vectorises as written.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const bool masked = MASK == kScores ? cpu::score(nat[i], adv[i], h.w) < thr
                                        : (MASK == kBytes && mask_bytes[i] != 0);
    const T g_in = grad[i];
    const T g_out = masked ? T(0) : g_in;
    if (MASK) grad[i] = g_out;
    kept += !masked;
    if (STEP) {
      const float g = static_cast<float>(g_out);  // as masked and stored
      const T x_in = param[i];
      const T v_in = buf[i];
      const float x = static_cast<float>(x_in);
      const float v = static_cast<float>(v_in);
      const float d = g + h.weight_decay * x;
      const T v_new = static_cast<T>(h.momentum * v + d);
      const T x_new = static_cast<T>(x - h.lr * static_cast<float>(v_new));
      const bool frozen = FREEZE && masked;
      buf[i] = frozen ? v_in : v_new;
      param[i] = frozen ? x_in : x_new;
    }
    if (REVISE) {
      const float a = h.decay * static_cast<float>(rev[i]);
      const float b = h.keep * static_cast<float>(param[i]);
      rev[i] = static_cast<T>(a + b);
    }
  }
  return kept;
}

template <int MASK, bool FREEZE, bool STEP, bool REVISE>
CURE_TARGET_AVX2 int64_t apply_range_avx2(const Entry& e, int64_t begin, int64_t end, const Hyper& h, float thr,
                                         const uint8_t* mask_bytes) {
  return apply_range<float, MASK, FREEZE, STEP, REVISE>(e, begin, end, h, thr, mask_bytes);
}

template <typename T, int MASK, bool FREEZE, bool STEP, bool REVISE>
int64_t apply_dispatch(const Entry& e, int64_t begin, int64_t end, const Hyper& h, float thr,
                       const uint8_t* mask_bytes) {
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::has_avx2()) return apply_range_avx2<MASK, FREEZE, STEP, REVISE>(e, begin, end, h, thr, mask_bytes);
  }
  return apply_range<T, MASK, FREEZE, STEP, REVISE>(e, begin, end, h, thr, mask_bytes);
}

template <typename T>
int64_t apply_chunk(const Entry& e, int64_t begin, int64_t end, const Hyper& h, float thr, bool freeze, bool step,
                    bool revise, const uint8_t* mask_bytes) {
  const int mask = !cpu::masks_anything(thr) ? kNoMask : mask_bytes != nullptr ? kBytes : kScores;
  // Every combination of the four switches, each as its own loop.
  const int sel = mask * 8 | (freeze ? 4 : 0) | (step ? 2 : 0) | (revise ? 1 : 0);
  switch (sel) {
#define CURE_APPLY_CASE(S) \
  case S:                  \
    return apply_dispatch<T, (S) / 8, ((S) & 4) != 0, ((S) & 2) != 0, ((S) & 1) != 0>(e, begin, end, h, thr, mask_bytes);
    CURE_APPLY_CASE(0) CURE_APPLY_CASE(1) CURE_APPLY_CASE(2) CURE_APPLY_CASE(3)
    CURE_APPLY_CASE(4) CURE_APPLY_CASE(5) CURE_APPLY_CASE(6) CURE_APPLY_CASE(7)
    CURE_APPLY_CASE(8) CURE_APPLY_CASE(9) CURE_APPLY_CASE(10) CURE_APPLY_CASE(11)
    CURE_APPLY_CASE(12) CURE_APPLY_CASE(13) CURE_APPLY_CASE(14) CURE_APPLY_CASE(15)
    CURE_APPLY_CASE(16) CURE_APPLY_CASE(17) CURE_APPLY_CASE(18) CURE_APPLY_CASE(19)
    CURE_APPLY_CASE(20) CURE_APPLY_CASE(21) CURE_APPLY_CASE(22) CURE_APPLY_CASE(23)
#undef CURE_APPLY_CASE
  }
  TORCH_INTERNAL_ASSERT(false, "unreachable");
}

// One apply chunk [begin, end) of a tensor. With classes that decide its threshold (cpu::deciding_classes),
// s < thr comes from them; otherwise from the recomputed scores.
int64_t apply_entry_chunk(const Entry& e, const cpu::Classes* classes, int64_t begin, int64_t end, const Hyper& h,
                          float thr, bool freeze, bool step, bool revise) {
  const uint8_t* mask_bytes = classes != nullptr ? cpu::masked_bytes(*classes, begin, end, thr) : nullptr;
  switch (e.param.scalar_type()) {
    case at::kFloat: return apply_chunk<float>(e, begin, end, h, thr, freeze, step, revise, mask_bytes);
    case at::kBFloat16: return apply_chunk<c10::BFloat16>(e, begin, end, h, thr, freeze, step, revise, mask_bytes);
    case at::kHalf: return apply_chunk<c10::Half>(e, begin, end, h, thr, freeze, step, revise, mask_bytes);
    default:
      TORCH_CHECK(false, "cure::rgp_sgd_step: unsupported dtype ", e.param.scalar_type(),
                  "; use float32, bfloat16 or float16");
  }
}

void check_fraction(const char* name, double value) {
  TORCH_CHECK(std::isfinite(value) && value >= 0.0 && value <= 1.0, "cure::rgp_sgd_step: ", name,
              " must lie in [0, 1], got ", value);
}

void check_nonnegative(const char* name, double value) {
  TORCH_CHECK(std::isfinite(value) && value >= 0.0, "cure::rgp_sgd_step: ", name,
              " must be a finite number >= 0, got ", value);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rgp_sgd_step_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList grads_nat, at::TensorList grads_adv,
    at::TensorList momentum_buffers, at::TensorList revision, double lr, double momentum, double weight_decay,
    double alpha, double p, c10::string_view mask_mode, double decay, const std::optional<at::Tensor>& skip,
    const std::optional<at::Tensor>& thresholds, const std::optional<at::Tensor>& nonfinite) {
  const int64_t count = static_cast<int64_t>(params.size());
  const bool revise = !revision.empty();
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == count && static_cast<int64_t>(grads_nat.size()) == count &&
                  static_cast<int64_t>(grads_adv.size()) == count &&
                  static_cast<int64_t>(momentum_buffers.size()) == count &&
                  (!revise || static_cast<int64_t>(revision.size()) == count),
              "cure::rgp_sgd_step: params (", count, "), grads (", grads.size(), "), grads_nat (", grads_nat.size(),
              "), grads_adv (", grads_adv.size(), "), momentum_buffers (", momentum_buffers.size(),
              ") and revision (", revision.size(), ", or empty) must have equal lengths");
  check_fraction("alpha", alpha);
  check_fraction("p", p);
  check_fraction("momentum", momentum);
  check_fraction("decay", decay);
  check_nonnegative("lr", lr);
  check_nonnegative("weight_decay", weight_decay);
  TORCH_CHECK(mask_mode == "grad" || mask_mode == "update",
              "cure::rgp_sgd_step: mask_mode must be 'grad' or 'update', got '", std::string(mask_mode), "'");
  const bool freeze = mask_mode == "update";
  bool skip_flag = false;
  if (skip.has_value()) {
    const at::Tensor& s = *skip;
    TORCH_CHECK(s.numel() == 1 && s.device().is_cpu() && !s.is_complex(),
                "cure::rgp_sgd_step (CPU kernel): skip must be a one-element real CPU tensor, got shape ",
                s.sizes(), " on ", s.device());
    skip_flag = s.to(at::kDouble).item<double>() != 0.0;  // NaN counts as set, as in the reference
  }
  TORCH_CHECK(thresholds.has_value() == nonfinite.has_value(),
              "cure::rgp_sgd_step: thresholds and nonfinite are given together (both from cure::rgp_select) or "
              "not at all; got only ", thresholds.has_value() ? "thresholds" : "nonfinite");
  const bool given = thresholds.has_value();
  if (given) {
    const std::pair<const char*, std::pair<const at::Tensor*, at::ScalarType>> stats[] = {
        {"thresholds", {&*thresholds, at::kFloat}}, {"nonfinite", {&*nonfinite, at::kLong}}};
    for (const auto& [name, t_type] : stats) {
      const at::Tensor& t = *t_type.first;
      TORCH_CHECK(t.dim() == 1 && t.numel() == count && t.scalar_type() == t_type.second && t.device().is_cpu() &&
                      t.is_contiguous(),
                  "cure::rgp_sgd_step (CPU kernel): ", name, " must be a contiguous 1-D ", t_type.second,
                  " CPU tensor of ", count, " elements (one per tensor, as cure::rgp_select returns it), got shape ",
                  t.sizes(), ", dtype ", t.scalar_type(), " on ", t.device());
    }
  }

  std::vector<Entry> entries;
  entries.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& q = params[i];
    const std::pair<const char*, const at::Tensor*> others[] = {
        {"grads", &grads[i]}, {"grads_nat", &grads_nat[i]}, {"grads_adv", &grads_adv[i]},
        {"momentum_buffers", &momentum_buffers[i]}, {"revision", revise ? &revision[i] : &q}};
    TORCH_CHECK(q.device().is_cpu(), "cure::rgp_sgd_step (CPU kernel): params[", i, "] is not on the CPU");
    for (const auto& [name, t] : others) {
      TORCH_CHECK(t->device().is_cpu(), "cure::rgp_sgd_step (CPU kernel): ", name, "[", i, "] is not on the CPU");
      TORCH_CHECK(t->sizes() == q.sizes(), "cure::rgp_sgd_step: ", name, "[", i, "] has shape ", t->sizes(),
                  " but params[", i, "] has shape ", q.sizes());
      TORCH_CHECK(t->scalar_type() == q.scalar_type(), "cure::rgp_sgd_step: ", name, "[", i, "] has dtype ",
                  t->scalar_type(), " but params[", i, "] has dtype ", q.scalar_type());
    }
    TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                "cure::rgp_sgd_step: params[", i, "] has dtype ", q.scalar_type(),
                "; supported are float32, bfloat16 and float16");
    TORCH_CHECK(q.numel() <= cpu::kMaxElements, "cure::rgp_sgd_step (CPU kernel): tensor ", i, " has ", q.numel(),
                " elements; at most 2^32 - 1 per tensor are supported");
    entries.push_back({q.contiguous(), grads[i].contiguous(), grads_nat[i].contiguous(), grads_adv[i].contiguous(),
                       momentum_buffers[i].contiguous(), revise ? revision[i].contiguous() : at::Tensor(), q.numel()});
  }

  const Weights w = cpu::weights_of(alpha);
  std::vector<cpu::SelectInput> inputs;
  inputs.reserve(count);
  for (const Entry& e : entries) inputs.push_back({e.nat.data_ptr(), e.adv.data_ptr(), e.param.scalar_type(), e.n});
  const Hyper h{w, static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(weight_decay),
                static_cast<float>(decay), static_cast<float>(1.0 - decay)};
  std::vector<int64_t> kept_count(count, 0);
  cpu::ClassesLease classes;  // filled by the selection below (none with given thresholds)
  // Tensor i's classes where they decide its threshold (none where it masks nothing).
  auto classes_for = [&](int64_t i, float thr) -> const cpu::Classes* {
    return cpu::masks_anything(thr) ? cpu::deciding_classes(*classes, i, thr) : nullptr;
  };
  // The apply pass of tensor i over all of it (parallel when the tensor was split over the threads).
  auto apply_tensor = [&](int64_t i, float thr, bool step, bool parallel) {
    const Entry& e = entries[i];
    if (!(step || revise || cpu::masks_anything(thr))) {  // nothing to write
      kept_count[i] = e.n;
      return;
    }
    const cpu::Classes* c = classes_for(i, thr);
    const auto chunk = [&](int64_t begin, int64_t end) {
      return apply_entry_chunk(e, c, begin, end, h, thr, freeze, step, revise);
    };
    kept_count[i] = parallel ? cpu::apply_backwards_split(e.n, chunk) : cpu::apply_backwards(0, e.n, chunk);
  };

  std::vector<cpu::Selection> sel;
  if (given) {
    // The thresholds and non-finite counts of cure::rgp_select: no selection here.
    sel.resize(count);
    const float* thr_in = thresholds->data_ptr<float>();
    const int64_t* nonfinite_in = nonfinite->data_ptr<int64_t>();
    for (int64_t i = 0; i < count; ++i) {
      sel[i].threshold = thr_in[i];
      sel[i].nonfinite = nonfinite_in[i];
    }
  } else if (!skip.has_value()) {
    // No skip decision to wait for: each tensor is updated right after its selection, while its
    // gradients are still in the cache.
    sel = cpu::select_thresholds(
        inputs, w, p, [&](int64_t i, const cpu::Selection& s, bool split) { apply_tensor(i, s.threshold, true, split); },
        classes.get());
  } else {
    // Phase 1: every threshold, before anything is written (the skip decision needs every tensor's
    // non-finite count).
    sel = cpu::select_thresholds(inputs, w, p, nullptr, classes.get());
  }
  if (given || skip.has_value()) {
    // Phase 2: the apply pass over all tensors' chunks in parallel.
    int64_t nonfinite_total = 0;
    for (const cpu::Selection& s : sel) nonfinite_total += s.nonfinite;
    const bool step = !(skip.has_value() && (skip_flag || nonfinite_total > 0));
    std::vector<int64_t> sizes(count, 0);
    std::vector<const cpu::Classes*> decided(count, nullptr);
    for (int64_t i = 0; i < count; ++i) {
      if (step || revise || cpu::masks_anything(sel[i].threshold)) sizes[i] = entries[i].n;
      if (sizes[i] > 0) decided[i] = classes_for(i, sel[i].threshold);
    }
    const std::vector<cpu::Chunk> chunks = cpu::chunks_of(sizes);
    const int64_t n_chunks = static_cast<int64_t>(chunks.size());
    std::vector<int64_t> chunk_kept(n_chunks);
#pragma omp parallel for schedule(dynamic, 1) if (n_chunks > 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const cpu::Chunk& ch = chunks[c];
      chunk_kept[c] = apply_entry_chunk(entries[ch.tensor], decided[ch.tensor], ch.begin, ch.end, h,
                                        sel[ch.tensor].threshold, freeze, step, revise);
    }
    for (int64_t i = 0; i < count; ++i) kept_count[i] = entries[i].n - sizes[i];  // no chunks: all kept
    for (int64_t c = 0; c < n_chunks; ++c) kept_count[chunks[c].tensor] += chunk_kept[c];
  }

  auto stats = cpu::mask_stats(sel, kept_count);
  // The kernel wrote into contiguous copies where the caller's tensors were strided: write them back.
  for (int64_t i = 0; i < count; ++i) {
    const Entry& e = entries[i];
    if (!e.grad.is_same(grads[i])) grads[i].copy_(e.grad);
    if (!e.param.is_same(params[i])) params[i].copy_(e.param);
    if (!e.buf.is_same(momentum_buffers[i])) momentum_buffers[i].copy_(e.buf);
    if (revise && !e.rev.is_same(revision[i])) revision[i].copy_(e.rev);
  }
  return stats;
}

}  // namespace cure

TORCH_LIBRARY_IMPL(cure, CPU, m) { m.impl("rgp_sgd_step", &cure::rgp_sgd_step_cpu); }
