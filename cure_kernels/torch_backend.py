"""The ``"torch"`` backend: the four ops in PyTorch tensor operations only, on any device, never waiting.

It computes exactly what the reference (:mod:`cure_kernels.reference`,
:func:`cure_kernels.sgd_step.rgp_sgd_step_reference`) computes, bit for bit, in float32, bfloat16 and float16
(docs/method.md, section 2), but where the reference copies every tensor's scores to the host to call
``numpy.quantile``, this backend stays on the tensors' device:

* **Scores**: :func:`cure_kernels.reference.rgp_scores`, ``alpha*|g_nat| + (1 - alpha)*|g_adv|`` in float32 as
  separate PyTorch operations (``mul`` then ``add``: each product and the sum rounded on its own, no fused
  multiply-add).
* **Order statistics**: ``a = v[k]`` by one ``torch.kthvalue`` per tensor; ``b = v[k + 1]`` without a second
  selection: it is ``a`` itself when more than ``k + 1`` scores are ``<= a`` (a run of ties through rank
  ``k + 1``), else the smallest score above ``a``. ``+inf`` is an ordinary, largest score; a NaN score makes
  the threshold NaN whatever the order statistics are.
* **Threshold**: numpy's linear interpolation as docs/method.md writes it. ``h = (n - 1)*p``, ``k = floor(h)``
  and ``g = h - k`` depend on the shape and ``p`` only, so they are computed on the host in float64; the
  interpolation ``d = f32(b - a)``, ``thr = f32(a + d*f32(g))`` (g < 0.5) or ``f32(b - d*f32(1 - g))`` runs
  on the device, one rounded operation at a time, with ``g`` passed as a scalar argument (rounded to float32
  by the kernel, as numpy rounds its weight). When ``k >= n - 1`` (p = 1), ``a = b = v[n - 1]`` go through the
  same formula: the threshold is ``v[n - 1]``, except NaN when ``v[n - 1]`` is ``+inf`` (``inf - inf``), as
  numpy and the reference give it (docs/method.md's shorthand "thr = v[n - 1]" holds for finite scores).
* **Mask, SGD, revision**: the reference's tensor formulas; the fused step's skip decision (``skip`` nonzero
  or any score of the call not finite) is a 0-dim boolean tensor applied with ``torch.where``.

No host synchronisation. Nothing here reads a device value on the host: no ``.item()``, ``.tolist()``,
``bool(tensor)``, ``.cpu()``/``.numpy()`` or data-dependent Python branch; every branch depends on shapes,
dtypes and Python scalars only, and the float32 constants are Python scalars or 0-dim CPU tensors (kernel
arguments, never copied to the device). The statistics are assembled with ``torch.stack`` on the device.
So the backend is sync-free on CUDA, provided PyTorch's own ``kthvalue``, reductions and ``where`` are
(they are: they launch kernels on the current stream). tests/test_torch_backend.py checks this on CPU
tensors by making every host read raise during a call.

Cost: one ``kthvalue`` (a selection over a copy of the scores) and a handful of elementwise passes per
tensor; the mask and the fused step compute each tensor's scores once for the selection and once more
(the step, ``mask_mode="update"`` only) for the freeze, as the reference does. It is the exact fallback
that runs wherever PyTorch runs, and the independent implementation ``backend="auto"`` checks the fast
backends against on CUDA (:mod:`cure_kernels.verify`); the C++, Triton and CUDA kernels are the fast ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from cure_kernels.reference import rgp_scores, sgd_revise_apply_

__all__ = ["quantile_threshold", "rgp_select_torch", "rgp_mask_torch", "rgp_sgd_step_torch", "revise_torch"]


def _f32(x: float) -> Tensor:
    """``x`` rounded to a float32 0-dim CPU tensor: a kernel argument on any device, never copied there."""
    return torch.tensor(x, dtype=torch.float32)


def quantile_threshold(scores: Tensor, p: float) -> Tensor:
    """``numpy.quantile(scores, p)`` (linear method, numpy >= 2.4.1) as a float32 0-dim tensor on the
    scores' device: NaN when a score is NaN or the tensor is empty. ``scores``: float32, any shape."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.full((), math.nan, dtype=torch.float32, device=scores.device)
    h = (n - 1) * p  # float64, from the shape and p only
    k = math.floor(h)
    g = h - k
    if k >= n - 1:
        # a = b = v[n - 1], interpolated all the same (g = 0): numpy's lerp gives inf + (inf - inf)*0 = NaN
        # when the largest score is +inf, not v[n - 1].
        a = b = flat.amax()
    else:
        a = torch.kthvalue(flat, k + 1).values  # v[k] (kthvalue counts from 1)
        # v[k + 1]: a when the scores <= a reach past rank k + 1 (ties), else the smallest score above a.
        # (Counts of a NaN-free tensor; with a NaN the threshold is NaN below, whatever b is.)
        above = torch.where(flat > a, flat, torch.full((), math.inf, dtype=torch.float32, device=flat.device))
        b = torch.where((flat <= a).sum() > k + 1, a, above.amin())
    d = b - a  # f32(b - a); inf - inf gives NaN, as in numpy
    # Each step a separate, rounded float32 operation (never add(..., alpha=) or addcmul: they may fuse).
    thr = a + d * g if g < 0.5 else b - d * (1.0 - g)
    return torch.where(torch.isnan(flat).any(), torch.full_like(thr, math.nan), thr)


def _select_one(grad_nat: Tensor, grad_adv: Tensor, alpha: float, p: float) -> tuple[Tensor, Tensor]:
    """Threshold (float32, 0-dim) and non-finite count (int64, 0-dim) of one tensor, on its device."""
    scores = rgp_scores(grad_nat, grad_adv, alpha)
    return quantile_threshold(scores, p), (~torch.isfinite(scores)).sum()


def _mask_one(update: Tensor, scores: Tensor, thr: Tensor) -> Tensor:
    """``update[scores < thr] = 0`` in place (a NaN ``thr`` masks nothing); the kept count, int64 0-dim."""
    conserved = scores < thr
    update.masked_fill_(conserved, 0)
    return update.numel() - conserved.sum()


def _stack(values: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.stack(values) if values else torch.empty(0, dtype=dtype, device=device)


def rgp_select_torch(grads_nat: Sequence[Tensor], grads_adv: Sequence[Tensor], alpha: float, p: float
                     ) -> tuple[Tensor, Tensor]:
    """``(thresholds float32[T], nonfinite int64[T])`` on the tensors' device, bit for bit
    :func:`cure_kernels.reference.rgp_select_reference`. Reads its inputs only."""
    device = grads_nat[0].device if len(grads_nat) else torch.device("cpu")
    results = [_select_one(gn, ga, alpha, p) for gn, ga in zip(grads_nat, grads_adv)]
    return (_stack([r[0] for r in results], torch.float32, device),
            _stack([r[1] for r in results], torch.int64, device))


def rgp_mask_torch(updates: Sequence[Tensor], grads_nat: Sequence[Tensor], grads_adv: Sequence[Tensor],
                   alpha: float, p: float, thresholds: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Zero ``updates[i][s < thr_i]`` in place; ``(thresholds, kept, nonfinite)`` as
    :func:`cure_kernels.reference.rgp_mask_reference` returns them, bit for bit.

    Per tensor, the scores are computed once and serve the selection and the mask, before the update is
    written (so an update may alias its own ``grads_nat`` or ``grads_adv``). With ``thresholds`` given
    (float32[T] on the device), they replace the selection, and the returned ``thresholds`` and ``nonfinite``
    are that tensor and the count of non-finite scores.
    """
    device = updates[0].device if len(updates) else torch.device("cpu")
    thrs, kept, nonfinite = [], [], []
    for i, (u, gn, ga) in enumerate(zip(updates, grads_nat, grads_adv)):
        scores = rgp_scores(gn, ga, alpha)
        thr = quantile_threshold(scores, p) if thresholds is None else thresholds[i]
        thrs.append(thr)
        nonfinite.append((~torch.isfinite(scores)).sum())
        kept.append(_mask_one(u, scores, thr))
    return (_stack(thrs, torch.float32, device), _stack(kept, torch.int64, device),
            _stack(nonfinite, torch.int64, device))


def rgp_sgd_step_torch(params: Sequence[Tensor], grads: Sequence[Tensor], grads_nat: Sequence[Tensor],
                       grads_adv: Sequence[Tensor], momentum_buffers: Sequence[Tensor], revision: Sequence[Tensor],
                       lr: float, momentum: float, weight_decay: float, alpha: float, p: float, mask_mode: str,
                       decay: float, skip: Tensor | None = None, thresholds: Tensor | None = None,
                       nonfinite: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The fused step, bit for bit :func:`cure_kernels.sgd_step.rgp_sgd_step_reference` (same arguments).

    1. Mask ``grads`` as :func:`rgp_mask_torch` (with the given ``thresholds`` when given; the returned
       statistics are then copies of ``thresholds`` and ``nonfinite``).
    2. Per tensor, in float32, each product and sum one rounded operation:
       ``d = g + f32(wd)*param``; ``buf' = f32(momentum)*buf + d`` (stored); ``param' = param - f32(lr)*buf'``;
       ``mask_mode="update"``: ``param'``, ``buf'`` keep ``param``, ``buf`` where ``s < thr``.
    3. ``skip`` given: ``skipped = (skip != 0) | (sum(nonfinite) > 0)``, a 0-dim boolean on the device;
       ``torch.where(skipped, old, new)`` keeps every param and buffer's bits when it holds.
    4. ``revision`` non-empty: ``rev' = f32(decay)*rev + f32(1 - decay)*param'`` (param' as stored).
    """
    if thresholds is None:
        thresholds, kept, nonfinite = rgp_mask_torch(grads, grads_nat, grads_adv, alpha, p)
    else:
        kept = rgp_mask_torch(grads, grads_nat, grads_adv, alpha, p, thresholds)[1]
        thresholds, nonfinite = thresholds.clone(), nonfinite.clone()
    sgd_revise_apply_(params, grads, grads_nat, grads_adv, momentum_buffers, revision, thresholds, nonfinite, skip,
                      lr=lr, momentum=momentum, weight_decay=weight_decay, alpha=alpha, mask_mode=mask_mode,
                      decay=decay)
    return thresholds, kept, nonfinite


def revise_torch(revision: Sequence[Tensor], params: Sequence[Tensor], decay: float) -> None:
    """``rev <- f32(decay)*rev + f32(1 - decay)*param`` in float32 (two rounded products, one rounded sum),
    stored in the revision tensor's dtype: bit for bit :func:`cure_kernels.reference.revise_reference`."""
    decay32, keep32 = _f32(decay), _f32(1.0 - decay)
    for rev, param in zip(revision, params):
        rev.copy_(decay32 * rev.float() + keep32 * param.float())
