"""The whole per-step parameter work of CURE as one op: conserve mask, SGD, revision EMA.

:func:`rgp_sgd_step_` applies, per parameter tensor, the conserve step (paper Eq. 6, docs/method.md section 2),
the SGD update of ``torch.optim.SGD`` (momentum, weight decay, dampening 0, no Nesterov) and, when a
revision list is given, the revision update (paper Eq. 7). Backends:

* ``cure::rgp_sgd_step_reference`` -- :func:`rgp_sgd_step_reference`, the oracle, built from
  :func:`cure_kernels.reference.rgp_mask_reference` and the SGD/EMA formula in PyTorch operations.
* ``cure::rgp_sgd_step_triton`` -- :mod:`cure_kernels.triton_sgd_step`: radix-select threshold, then one
  fused pass that writes the mask, the SGD update and the EMA.
* ``cure::rgp_sgd_step_torch`` -- :func:`cure_kernels.torch_backend.rgp_sgd_step_torch`: the reference's
  results in PyTorch operations on the device (no host round trip).

Both are ``torch.library`` custom ops with fake implementations, so the public function works under
``torch.compile(fullgraph=True)``.

Every backend also takes the thresholds and non-finite counts of :func:`cure_kernels.rgp_select`
(``thresholds=``, ``nonfinite=``): it then skips its selection and runs the apply pass alone, with the
same result bit for bit (docs/method.md, "Selection ahead of the step").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cure_kernels import backends, torch_backend
from cure_kernels.ops import MaskStats, _mask_stats_like, _resolve, backend_op
from cure_kernels.reference import apply_mask_reference, rgp_mask_reference, sgd_revise_apply_
from cure_kernels.validation import check_fraction, check_given_stats, check_nonnegative, check_tensor_lists

__all__ = ["rgp_sgd_step_", "rgp_sgd_step_reference", "MASK_MODES", "SGD_STEP_BACKENDS"]

MASK_MODES = ("grad", "update")
SGD_STEP_BACKENDS = ("reference", "cpu", "triton", "cuda", "torch")


def rgp_sgd_step_reference(params: Sequence[Tensor], grads: Sequence[Tensor], grads_nat: Sequence[Tensor],
                           grads_adv: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                           revision: Sequence[Tensor], lr: float, momentum: float, weight_decay: float,
                           alpha: float, p: float, mask_mode: str, decay: float, skip: Tensor | None = None,
                           thresholds: Tensor | None = None, nonfinite: Tensor | None = None
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """The oracle of :func:`rgp_sgd_step_` (same arguments; ``revision`` empty means no revision update).

    Masks ``grads`` with :func:`cure_kernels.reference.rgp_mask_reference`, then per tensor, in float32
    with every product and sum a separate rounded PyTorch operation::

        d = g + f32(wd)*param;  buf' = f32(momentum)*buf + d  (stored);  param' = param - f32(lr)*buf'
        mask_mode "update": param' = param, buf' = buf where s < thr
        rev' = f32(decay)*rev + f32(1 - decay)*param'   (param' as stored)
        skip given and (skip != 0 or any score of the call not finite): param' = param, buf' = buf

    Returns ``(thresholds, kept, nonfinite)`` like :func:`~cure_kernels.reference.rgp_mask_reference`.
    With ``thresholds`` and ``nonfinite`` given (both), they replace the selection: the mask is
    :func:`~cure_kernels.reference.apply_mask_reference` with them and the statistics are copies of them.
    Synchronises with the host (numpy): oracle only.
    """
    if thresholds is None:
        thresholds, kept, nonfinite = rgp_mask_reference(grads, grads_nat, grads_adv, alpha, p)
    else:
        kept = apply_mask_reference(grads, grads_nat, grads_adv, alpha, thresholds)
        thresholds, nonfinite = thresholds.clone(), nonfinite.clone()
    sgd_revise_apply_(params, grads, grads_nat, grads_adv, momentum_buffers, revision, thresholds, nonfinite, skip,
                      lr=lr, momentum=momentum, weight_decay=weight_decay, alpha=alpha, mask_mode=mask_mode,
                      decay=decay)
    return thresholds, kept, nonfinite


def _stats_fake(params: list[Tensor], *args: object) -> tuple[Tensor, Tensor, Tensor]:
    return _mask_stats_like(params)


_MUTATED = ("params", "grads", "momentum_buffers", "revision")


@torch.library.custom_op("cure::rgp_sgd_step_reference", mutates_args=_MUTATED)
def _rgp_sgd_step_reference(params: list[Tensor], grads: list[Tensor], grads_nat: list[Tensor],
                            grads_adv: list[Tensor], momentum_buffers: list[Tensor], revision: list[Tensor],
                            lr: float, momentum: float, weight_decay: float, alpha: float, p: float,
                            mask_mode: str, decay: float, skip: Tensor | None, thresholds: Tensor | None = None,
                            nonfinite: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    return rgp_sgd_step_reference(params, grads, grads_nat, grads_adv, momentum_buffers, revision, lr,
                                  momentum, weight_decay, alpha, p, mask_mode, decay, skip, thresholds, nonfinite)


@torch.library.custom_op("cure::rgp_sgd_step_triton", mutates_args=_MUTATED)
def _rgp_sgd_step_triton(params: list[Tensor], grads: list[Tensor], grads_nat: list[Tensor],
                         grads_adv: list[Tensor], momentum_buffers: list[Tensor], revision: list[Tensor],
                         lr: float, momentum: float, weight_decay: float, alpha: float, p: float,
                         mask_mode: str, decay: float, skip: Tensor | None, thresholds: Tensor | None = None,
                         nonfinite: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    # Imported here: TRITON_INTERPRET must be read when the kernels are defined.
    from cure_kernels.triton_sgd_step import rgp_sgd_step_triton

    return rgp_sgd_step_triton(params, grads, grads_nat, grads_adv, momentum_buffers, revision, lr, momentum,
                               weight_decay, alpha, p, mask_mode, decay, skip, thresholds, nonfinite)


@torch.library.custom_op("cure::rgp_sgd_step_torch", mutates_args=_MUTATED)
def _rgp_sgd_step_torch(params: list[Tensor], grads: list[Tensor], grads_nat: list[Tensor],
                        grads_adv: list[Tensor], momentum_buffers: list[Tensor], revision: list[Tensor],
                        lr: float, momentum: float, weight_decay: float, alpha: float, p: float,
                        mask_mode: str, decay: float, skip: Tensor | None, thresholds: Tensor | None = None,
                        nonfinite: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    return torch_backend.rgp_sgd_step_torch(params, grads, grads_nat, grads_adv, momentum_buffers, revision, lr,
                                            momentum, weight_decay, alpha, p, mask_mode, decay, skip, thresholds,
                                            nonfinite)


for _op in (_rgp_sgd_step_reference, _rgp_sgd_step_triton, _rgp_sgd_step_torch):
    _op.register_fake(_stats_fake)
# The C++ op (cure::rgp_sgd_step, csrc/cure_ops.cpp): CPU and CUDA kernels under one name.
if backends.PROBE.extension_error is None:
    torch.library.register_fake("cure::rgp_sgd_step")(_stats_fake)


def rgp_sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], grads_nat: Sequence[Tensor],
                  grads_adv: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *, lr: float, momentum: float,
                  weight_decay: float, alpha: float, p: float, mask_mode: str = "grad",
                  revision: Sequence[Tensor] | None = None, decay: float = 0.0, skip: Tensor | None = None,
                  thresholds: Tensor | None = None, nonfinite: Tensor | None = None,
                  backend: str = "auto") -> MaskStats:
    """CURE's conserve, update and revise steps (paper Eqs. 6 and 7) for a list of parameters, in place.

    Per tensor i, in float32 (bf16/fp16 upcast exactly), each product and sum rounded separately (no
    fused multiply-add), every stored value rounded to nearest-even into the tensor's dtype:

    1. Conserve, exactly :func:`cure_kernels.rgp_mask_` (docs/method.md section 2):
       ``s = f32(alpha)*|grads_nat| + f32(1 - alpha)*|grads_adv|``, ``thr = numpy.quantile(s, p)``,
       ``grads[s < thr] = 0`` (in place; ties at thr kept).
    2. Update, ``torch.optim.SGD`` with dampening 0 and no Nesterov, momentum buffers already created
       (a trainer that creates them as zeros needs no first-step case)::

           d = g + f32(weight_decay)*param;  buf = f32(momentum)*buf + d;  param = param - f32(lr)*buf

       where g is the masked gradient and the param update reads buf as stored. ``mask_mode="grad"``
       (the official code's behaviour): every entry goes through the formula, so weight decay and
       momentum still move conserved entries. ``mask_mode="update"``: where ``s < thr`` both param and
       buf are left unchanged (the whole update of a conserved entry is frozen).
    3. Revise, when ``revision`` is given: ``rev = f32(decay)*rev + f32(1 - decay)*param`` with the new
       param as stored (the caller draws u < r and passes its warmed-up decay d_t; skip otherwise).

    Skipping bad steps on the device: with ``skip`` given (a one-element tensor on the tensors' device,
    for example ``~torch.isfinite(loss)``), the SGD update is not applied -- every param and momentum
    buffer keeps its bits -- when ``skip`` is nonzero or when any score of the call is not finite (NaN
    or infinite; ``MaskStats.nonfinite`` counts them). The decision is taken on the device, with no host
    synchronisation. ``grads`` are still masked and the revision EMA still runs (with the unchanged
    params), as a trainer that skips ``optimizer.step()`` and revises anyway would do.
    Without ``skip``: if any score of a tensor is NaN its threshold is NaN, nothing of it is masked
    (or frozen), and the step is still applied to it.

    Args:
        params: the parameters (modified in place; under grad mode the op runs as ``torch.no_grad``).
        grads: the update gradients (typically ``param.grad``); masked in place.
        grads_nat, grads_adv: gradients of the natural and adversarial cross-entropy (prominence only).
        momentum_buffers: SGD momentum buffers (``optimizer.state[param]["momentum_buffer"]``), in place.
        lr, weight_decay: >= 0. momentum, alpha, p, decay: in [0, 1].
        mask_mode: "grad" or "update".
        revision: the revision model's parameters, one per param, or None for no revision update.
        skip: None, or a one-element tensor on the tensors' device; see above.
        thresholds, nonfinite: None (the op selects the thresholds), or both, as
            :func:`cure_kernels.rgp_select` returns them for the same ``grads_nat``, ``grads_adv``, ``alpha``
            and ``p`` (float32[T] and int64[T], contiguous, on the tensors' device): the op then skips its
            selection and applies them; the skip decision reads ``nonfinite``. The returned statistics are
            copies of them with ``kept`` counted by the apply pass, and everything the op writes is bit for
            bit what the call without them writes. Computing them earlier, for example on a side CUDA
            stream while the last backward pass runs, leaves only the apply pass here (docs/method.md).
        backend: "auto" (the C++ kernel on CPU tensors; on CUDA tensors Triton when Triton is available, else
            the C++ CUDA kernel, else the torch backend, each checked once against the torch backend before it
            is trusted, :mod:`cure_kernels.verify`), "reference", "cpu", "triton", "cuda" or "torch".

    Returns:
        :class:`~cure_kernels.MaskStats` as :func:`cure_kernels.rgp_mask_` returns it, on the tensors'
        device. The reference synchronises with the host; the C++ backends and the torch backend never do;
        Triton only when it uploads its tables (see :mod:`cure_kernels.backends`); ``auto`` on CUDA once, for its
        check, on its first call per dtypes.
    """
    alpha = check_fraction("alpha", alpha)
    p = check_fraction("p", p)
    momentum = check_fraction("momentum", momentum)
    decay = check_fraction("decay", decay)
    lr = check_nonnegative("lr", lr)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be 'grad' or 'update', got {mask_mode!r}")
    if momentum_buffers is not None and not isinstance(momentum_buffers, Tensor):
        momentum_buffers = list(momentum_buffers)
        missing = [i for i, b in enumerate(momentum_buffers) if b is None]
        if missing:
            raise ValueError(
                f"momentum_buffers[{missing[0]}] is None ({len(missing)} of {len(momentum_buffers)} are): "
                f"torch.optim.SGD creates its buffers in its first step, so optimizer.state has none before it. "
                f"Create them as zeros once, before the first step: `for q in params: "
                f"optimizer.state[q]['momentum_buffer'] = torch.zeros_like(q)`, and pass "
                f"[optimizer.state[q]['momentum_buffer'] for q in params]; the first step then gives buf = d, "
                f"as SGD's first step does"
            )
    names = ["grads", "grads_nat", "grads_adv", "params", "momentum_buffers"]
    lists: list[object] = [grads, grads_nat, grads_adv, params, momentum_buffers]
    if revision is not None:
        names.append("revision")
        lists.append(revision)
    # Written in place: grads, params, momentum_buffers and revision (none may overlap another).
    checked = check_tensor_lists(names, lists, written=(0, 3, 4, 5)[:len(lists) - 2])
    grs, gns, gas, prms, bufs = checked[:5]
    revs = checked[5] if revision is not None else []
    for name, tensors in (("momentum_buffers", bufs), ("revision", revs)):
        for i, t in enumerate(tensors):
            if t.requires_grad:
                raise ValueError(f"{name}[{i}] requires grad; it must be a plain state tensor")
    device = grs[0].device if grs else torch.device("cpu")
    if skip is not None:
        if not isinstance(skip, Tensor) or skip.numel() != 1 or skip.device != device or skip.is_complex():
            raise ValueError(f"skip must be None or a one-element real tensor on {device} (for example "
                             f"~torch.isfinite(loss)), got {skip!r}")
        skip = skip.detach().reshape(())
    given = check_given_stats(thresholds, nonfinite, len(grs), device)
    name = _resolve(backend, device, "rgp_sgd_step", grs)
    if not grs:
        return MaskStats(*_mask_stats_like(grs))
    op = backend_op("rgp_sgd_step", name)
    with torch.no_grad():
        if given is None:
            out = op(prms, grs, gns, gas, bufs, revs, lr, momentum, weight_decay, alpha, p, mask_mode, decay, skip)
        else:
            out = op(prms, grs, gns, gas, bufs, revs, lr, momentum, weight_decay, alpha, p, mask_mode, decay, skip,
                     *given)
    return MaskStats(*out)
