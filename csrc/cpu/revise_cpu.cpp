// CPU kernel of cure::revise: the revision model's update (paper Eq. 7) over a list of tensors,
//   rev <- f32(decay)*rev + f32(1-decay)*param
// in float32, each product and the sum rounded separately (compiled with -ffp-contract=off), stored
// back in rev's dtype with round-to-nearest-even, exactly like cure_kernels.reference.revise_reference.
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <vector>

namespace cure {
namespace {

constexpr int64_t kParallelGrain = int64_t{1} << 15;  // below this a tensor is one thread's work

template <typename T>
void revise_range(T* rev, const T* param, int64_t begin, int64_t end, float keep, float take) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = keep * static_cast<float>(rev[i]);
    const float y = take * static_cast<float>(param[i]);
    rev[i] = static_cast<T>(x + y);
  }
}

template <typename T>
void revise_tensor(const at::Tensor& rev, const at::Tensor& param, float keep, float take, bool parallel) {
  T* r = rev.data_ptr<T>();
  const T* q = param.data_ptr<T>();
  const int64_t n = rev.numel();
  if (!parallel) {
    revise_range(r, q, 0, n, keep, take);
    return;
  }
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads();
    const int64_t t = omp_get_thread_num();
    const int64_t chunk = (n + threads - 1) / threads;
    const int64_t begin = std::min(n, t * chunk);
    revise_range(r, q, begin, std::min(n, begin + chunk), keep, take);
  }
}

void revise_one(const at::Tensor& rev, const at::Tensor& param, float keep, float take, bool parallel) {
  switch (rev.scalar_type()) {
    case at::kFloat: revise_tensor<float>(rev, param, keep, take, parallel); break;
    case at::kBFloat16: revise_tensor<c10::BFloat16>(rev, param, keep, take, parallel); break;
    case at::kHalf: revise_tensor<c10::Half>(rev, param, keep, take, parallel); break;
    default: TORCH_CHECK(false, "cure::revise: unsupported dtype ", rev.scalar_type());
  }
}

}  // namespace

void revise_cpu(at::TensorList revision, at::TensorList params, double decay) {
  TORCH_CHECK(revision.size() == params.size(), "cure::revise: revision and params must have equal lengths");
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, "cure::revise: decay must lie in [0, 1], got ", decay);
  const float keep = static_cast<float>(decay);
  const float take = static_cast<float>(1.0 - decay);
  const int64_t count = static_cast<int64_t>(revision.size());
  std::vector<at::Tensor> revs(count), prms(count);
  std::vector<int64_t> small;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(revision[i].device().is_cpu() && params[i].device().is_cpu(),
                "cure::revise (CPU kernel): tensor ", i, " is not on the CPU");
    TORCH_CHECK(revision[i].sizes() == params[i].sizes() && revision[i].scalar_type() == params[i].scalar_type(),
                "cure::revise: shape or dtype of tensor ", i, " differs between revision and params");
    revs[i] = revision[i].contiguous();
    prms[i] = params[i].contiguous();
    if (revs[i].numel() < kParallelGrain) small.push_back(i);
  }
  const int64_t n_small = static_cast<int64_t>(small.size());
#pragma omp parallel for schedule(dynamic, 4) if (n_small > 8)
  for (int64_t j = 0; j < n_small; ++j) revise_one(revs[small[j]], prms[small[j]], keep, take, false);
  for (int64_t i = 0; i < count; ++i) {
    if (revs[i].numel() >= kParallelGrain) revise_one(revs[i], prms[i], keep, take, true);
    if (!revs[i].is_same(revision[i])) revision[i].copy_(revs[i]);
  }
}

}  // namespace cure

TORCH_LIBRARY_IMPL(cure, CPU, m) { m.impl("revise", &cure::revise_cpu); }
