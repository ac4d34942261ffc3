// Op schemas of the cure namespace and the Python module stub of cure_kernels._C.
//
// One op name per operation; the CPU kernel registers under the CPU dispatch key
// (csrc/cpu/), the CUDA kernel under the CUDA key (csrc/cuda/). Fake implementations for
// torch.compile are registered from Python (cure_kernels/ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing cure_kernels._C only loads this library so that the registrations below run.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cure, m) {
  // Zero updates[i][s < numpy.quantile(s, p)], s = alpha*|grads_nat[i]| + (1-alpha)*|grads_adv[i]|.
  // Returns (thresholds float32[T], kept int64[T], nonfinite int64[T]).
  m.def("rgp_mask(Tensor(a!)[] updates, Tensor[] grads_nat, Tensor[] grads_adv, float alpha, float p)"
        " -> (Tensor, Tensor, Tensor)");
  // revision[i] <- decay*revision[i] + (1-decay)*params[i].
  m.def("revise(Tensor(a!)[] revision, Tensor[] params, float decay) -> ()");
  // Conserve mask + SGD (momentum, weight decay; mask_mode "grad" or "update") + revision EMA, in one
  // op (cure_kernels/sgd_step.py states the formula). revision may be empty (no EMA). skip: a one-element
  // device tensor; where nonzero, or where any score is not finite, params and momentum are untouched.
  // Returns (thresholds float32[T], kept int64[T], nonfinite int64[T]).
  // thresholds, nonfinite: both None (the op selects), or both given, float32[T] and int64[T] on the tensors'
  // device as cure::rgp_select returns them: the op skips its selection and applies them; the statistics
  // echo them (copies) and the skip decision reads nonfinite.
  m.def("rgp_sgd_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor[] grads_nat, Tensor[] grads_adv,"
        " Tensor(c!)[] momentum_buffers, Tensor(d!)[] revision, float lr, float momentum, float weight_decay,"
        " float alpha, float p, str mask_mode, float decay, Tensor? skip, Tensor? thresholds=None,"
        " Tensor? nonfinite=None) -> (Tensor, Tensor, Tensor)");
  // The selection of cure::rgp_mask alone: (thresholds float32[T], nonfinite int64[T]), bit for bit what
  // cure::rgp_mask and cure::rgp_sgd_step compute. Reads its inputs only.
  m.def("rgp_select(Tensor[] grads_nat, Tensor[] grads_adv, float alpha, float p) -> (Tensor, Tensor)");
}
