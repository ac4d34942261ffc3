"""The selection of the conserve step alone: :func:`rgp_select`.

:func:`cure_kernels.rgp_sgd_step_` finds every tensor's threshold (selection), then applies the mask, the
SGD update and the revision EMA (apply pass). The selection reads only ``grads_nat`` and ``grads_adv``,
which a CURE step has final before its last backward pass; :func:`rgp_select` computes it on its own, so
that it can run earlier (on a side CUDA stream, concurrently with that backward pass), and
``rgp_sgd_step_(..., thresholds=, nonfinite=)`` then runs the apply pass alone. docs/method.md states the
contract; the trainer's use is in :mod:`cure.methods`.

Ops, one per backend family as in :mod:`cure_kernels.ops`:

* ``cure::rgp_select`` -- C++ (``csrc/``): the CPU selection (``select_cpu.cpp``) under the CPU key, the
  CUDA selection kernels (stages 0-4 of ``rgp_mask_kernels.cuh``) under the CUDA key.
* ``cure::rgp_select_triton`` -- the Triton selection (``triton_rgp_mask.select_thresholds``).
* ``cure::rgp_select_reference`` -- :func:`cure_kernels.reference.rgp_select_reference`.
* ``cure::rgp_select_torch`` -- :func:`cure_kernels.torch_backend.rgp_select_torch` (PyTorch operations).

None writes its inputs (no version counter changes); each has a fake implementation, so
:func:`rgp_select` works under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cure_kernels import backends, reference, torch_backend
from cure_kernels.ops import _resolve, backend_op
from cure_kernels.validation import check_fraction, check_tensor_lists

__all__ = ["rgp_select"]


def _select_stats_like(grads_nat: list[Tensor]) -> tuple[Tensor, Tensor]:
    device = grads_nat[0].device if grads_nat else torch.device("cpu")
    n = len(grads_nat)
    return (torch.empty(n, dtype=torch.float32, device=device),
            torch.empty(n, dtype=torch.int64, device=device))


def _rgp_select_fake(grads_nat: list[Tensor], grads_adv: list[Tensor], alpha: float, p: float
                     ) -> tuple[Tensor, Tensor]:
    return _select_stats_like(grads_nat)


@torch.library.custom_op("cure::rgp_select_reference", mutates_args=())
def _rgp_select_reference(grads_nat: list[Tensor], grads_adv: list[Tensor], alpha: float, p: float
                          ) -> tuple[Tensor, Tensor]:
    return reference.rgp_select_reference(grads_nat, grads_adv, alpha, p)


@torch.library.custom_op("cure::rgp_select_triton", mutates_args=())
def _rgp_select_triton(grads_nat: list[Tensor], grads_adv: list[Tensor], alpha: float, p: float
                       ) -> tuple[Tensor, Tensor]:
    # Imported here: TRITON_INTERPRET must be read when the kernels are defined.
    from cure_kernels.triton_rgp_mask import rgp_select_triton

    return rgp_select_triton(grads_nat, grads_adv, alpha, p)


@torch.library.custom_op("cure::rgp_select_torch", mutates_args=())
def _rgp_select_torch(grads_nat: list[Tensor], grads_adv: list[Tensor], alpha: float, p: float
                      ) -> tuple[Tensor, Tensor]:
    return torch_backend.rgp_select_torch(grads_nat, grads_adv, alpha, p)


for _op in (_rgp_select_reference, _rgp_select_triton, _rgp_select_torch):
    _op.register_fake(_rgp_select_fake)
if backends.PROBE.extension_error is None and hasattr(torch.ops.cure, "rgp_select"):
    torch.library.register_fake("cure::rgp_select")(_rgp_select_fake)


def rgp_select(grads_nat: Sequence[Tensor], grads_adv: Sequence[Tensor], *, alpha: float, p: float,
               backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The per-tensor thresholds and non-finite counts of the conserve step, without applying them.

    Returns ``(thresholds float32[T], nonfinite int64[T])`` on the tensors' device: bit for bit the
    ``thresholds`` and ``nonfinite`` that :func:`cure_kernels.rgp_mask_` and :func:`cure_kernels.rgp_sgd_step_`
    return for the same ``grads_nat``, ``grads_adv``, ``alpha`` and ``p`` (every backend, every dtype; NaN
    for an empty tensor or when a score is NaN). Pass both to ``rgp_sgd_step_(..., thresholds=,
    nonfinite=)`` to run its apply pass alone. Reads its inputs only; nothing is written.

    Args:
        grads_nat, grads_adv: gradients of the natural and adversarial cross-entropy, one per parameter
            (equal shapes and dtypes per index; float32, bfloat16 or float16; one device).
        alpha: weight of the natural gradient in the score, in [0, 1]. p: conserved fraction, in [0, 1].
        backend: "auto" (as :func:`cure_kernels.rgp_mask_` picks), "reference", "cpu", "triton", "cuda" or
            "torch".

    The C++ backends and the torch backend never synchronise with the host; Triton only when it uploads its
    tables (the first call per layout and ``p``, see :mod:`cure_kernels.backends`); the reference on every call
    (and ``auto`` on CUDA once, for its check, on its first call per dtypes). Every
    launch goes to the current stream: inside ``torch.cuda.stream(side)`` the selection runs on ``side``.
    """
    alpha = check_fraction("alpha", alpha)
    p = check_fraction("p", p)
    gns, gas = check_tensor_lists(("grads_nat", "grads_adv"), (grads_nat, grads_adv), written=())
    name = _resolve(backend, gns[0].device if gns else torch.device("cpu"), "rgp_select", gns)
    if not gns:
        return _select_stats_like(gns)
    with torch.no_grad():  # the statistics are not differentiable, whatever the inputs
        thresholds, nonfinite = backend_op("rgp_select", name)(gns, gas, alpha, p)
    return thresholds, nonfinite
