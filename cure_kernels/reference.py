"""Reference implementation of CURE's masking and revision ops: the oracle.

Short and obviously correct, not fast. Every other backend (C++ CPU, Triton, CUDA) is tested
against these functions bit for bit; see docs/method.md, section 2 ("the masking contract").

Robust Gradient Prominence (paper Eq. 6), per parameter tensor, elementwise::

    s = alpha * |dL_nat/dw| + (1 - alpha) * |dL_rob/dw|

in float32, each product and the sum rounded separately. The update entries whose score lies
below the tensor's p-quantile (``numpy.quantile(s, p)``, default 'linear' method) are zeroed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "rgp_scores",
    "quantile_threshold",
    "threshold_from_order_statistics",
    "rgp_mask_reference",
    "rgp_select_reference",
    "apply_mask_reference",
    "revise_reference",
]


def rgp_scores(grad_nat: torch.Tensor, grad_adv: torch.Tensor, alpha: float) -> torch.Tensor:
    """Robust Gradient Prominence scores (Eq. 6) in float32.

    bfloat16/float16 gradients are upcast first. ``alpha`` and ``1 - alpha`` (computed in
    double, like Python does) are each rounded to float32; no fused multiply-add.
    """
    return alpha * grad_nat.float().abs() + (1.0 - alpha) * grad_adv.float().abs()


def quantile_threshold(scores: torch.Tensor, p: float) -> float:
    """``numpy.quantile(scores, p)`` as a float32 value; NaN for an empty tensor."""
    flat = scores.detach().reshape(-1).to("cpu", torch.float32).numpy()
    if flat.size == 0:
        return float("nan")
    # p must be a Python float: numpy then takes its "weak scalar" path, where the interpolation
    # weight is rounded to float32 (an integer p would skip interpolation altogether).
    return float(np.float32(np.quantile(flat, float(p))))


def threshold_from_order_statistics(a: float, b: float, n: int, p: float) -> float:
    """numpy's linear interpolation written out, given v[k] = a and v[k+1] = b (docs/method.md section 2).

    With h = (n - 1) * p in float64, k = floor(h) and g = h - k, the threshold is
    ``f32(a + d * f32(g))`` when g < 0.5 and ``f32(b - d * f32(1 - g))`` otherwise, where
    d = f32(b - a). When k >= n - 1, both a and b are v[n - 1]. This is the formula the fast
    backends implement; it exists here so tests can check it against numpy itself.
    """
    h = (n - 1) * float(p)
    g = h - math.floor(h)
    a32, b32 = np.float32(a), np.float32(b)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.float32(b32 - a32)
        if g < 0.5:
            return float(np.float32(a32 + np.float32(d * np.float32(g))))
        return float(np.float32(b32 - np.float32(d * np.float32(1.0 - g))))


def _select_one(grad_nat: torch.Tensor, grad_adv: torch.Tensor, alpha: float, p: float) -> tuple[float, int]:
    """The threshold and the number of non-finite scores of one tensor (NaN, 0 for an empty one)."""
    if grad_nat.numel() == 0:
        return float("nan"), 0
    scores = rgp_scores(grad_nat, grad_adv, alpha)
    return quantile_threshold(scores, p), int((~torch.isfinite(scores)).sum())


def _mask_one(update: torch.Tensor, grad_nat: torch.Tensor, grad_adv: torch.Tensor, alpha: float,
              thr: torch.Tensor | float) -> int:
    """Zero ``update[s < thr]`` in place; return the number of entries kept."""
    if update.numel() == 0:
        return 0
    scores = rgp_scores(grad_nat, grad_adv, alpha)
    conserved = scores < torch.as_tensor(thr, dtype=torch.float32).to(scores.device)
    update.masked_fill_(conserved, 0)
    return update.numel() - int(conserved.sum())


def _rgp_mask_one(update: torch.Tensor, grad_nat: torch.Tensor, grad_adv: torch.Tensor,
                  alpha: float, p: float) -> tuple[float, int, int]:
    thr, nonfinite = _select_one(grad_nat, grad_adv, alpha, p)
    return thr, _mask_one(update, grad_nat, grad_adv, alpha, thr), nonfinite


def rgp_select_reference(grads_nat: Sequence[torch.Tensor], grads_adv: Sequence[torch.Tensor], alpha: float,
                         p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection of :func:`rgp_mask_reference` alone: ``(thresholds float32[T], nonfinite int64[T])``
    on the tensors' device, the same values it returns. Reads its inputs only; synchronises with the host."""
    results = [_select_one(gn, ga, alpha, p) for gn, ga in zip(grads_nat, grads_adv)]
    device = grads_nat[0].device if len(grads_nat) else torch.device("cpu")
    thresholds = torch.tensor([r[0] for r in results], dtype=torch.float32, device=device)
    nonfinite = torch.tensor([r[1] for r in results], dtype=torch.int64, device=device)
    return thresholds, nonfinite


def apply_mask_reference(updates: Sequence[torch.Tensor], grads_nat: Sequence[torch.Tensor],
                         grads_adv: Sequence[torch.Tensor], alpha: float, thresholds: torch.Tensor) -> torch.Tensor:
    """The apply pass of :func:`rgp_mask_reference` with given thresholds (float32[T]): zero
    ``updates[i][s < thresholds[i]]`` in place; return kept int64[T] on the tensors' device."""
    host = thresholds.detach().to("cpu", torch.float32)
    kept = [_mask_one(u, gn, ga, alpha, host[i]) for i, (u, gn, ga) in enumerate(zip(updates, grads_nat, grads_adv))]
    device = updates[0].device if len(updates) else torch.device("cpu")
    return torch.tensor(kept, dtype=torch.int64, device=device)


def rgp_mask_reference(updates: Sequence[torch.Tensor], grads_nat: Sequence[torch.Tensor],
                       grads_adv: Sequence[torch.Tensor], alpha: float, p: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero, in place, the entries of each ``updates[i]`` whose score is below its p-quantile.

    Returns ``(thresholds float32[T], kept int64[T], nonfinite int64[T])``. Entries are compared by
    value (``s < thr``), so ties at the threshold are kept; a NaN score makes the threshold NaN
    and nothing is masked. Synchronises with the host (it calls numpy): oracle only.
    """
    results = [_rgp_mask_one(u, gn, ga, alpha, p) for u, gn, ga in zip(updates, grads_nat, grads_adv)]
    device = updates[0].device if len(updates) else torch.device("cpu")
    thresholds = torch.tensor([r[0] for r in results], dtype=torch.float32, device=device)
    kept = torch.tensor([r[1] for r in results], dtype=torch.int64, device=device)
    nonfinite = torch.tensor([r[2] for r in results], dtype=torch.int64, device=device)
    return thresholds, kept, nonfinite


def revise_reference(revision: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                     decay: float) -> None:
    """Revision model update (paper Eq. 7): ``rev <- decay * rev + (1 - decay) * param``, in place.

    Computed in float32 with each product and the sum rounded separately, then stored in the
    revision tensor's dtype.
    """
    for rev, param in zip(revision, params):
        rev.copy_(decay * rev.float() + (1.0 - decay) * param.float())


def sgd_revise_apply_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      grads_nat: Sequence[torch.Tensor], grads_adv: Sequence[torch.Tensor],
                      momentum_buffers: Sequence[torch.Tensor], revision: Sequence[torch.Tensor],
                      thresholds: torch.Tensor, nonfinite: torch.Tensor, skip: torch.Tensor | None, *,
                      lr: float, momentum: float, weight_decay: float, alpha: float, mask_mode: str,
                      decay: float) -> None:
    """The update and revise halves of the fused step on already masked ``grads`` (docs/method.md, "The fused
    step"), in place, per tensor, in float32 with every product and sum a separate rounded PyTorch operation::

        d = g + f32(wd)*param;  buf' = f32(momentum)*buf + d  (stored);  param' = param - f32(lr)*buf'
        mask_mode "update": param' = param, buf' = buf where s < thr   (a NaN threshold freezes nothing)
        skip given and (skip != 0 or sum(nonfinite) > 0): param' = param, buf' = buf everywhere (decided
        on the device)
        rev' = f32(decay)*rev + f32(1 - decay)*param'   (param' as stored; ``revision`` empty: no revision)

    The scalars are 0-dim CPU float32 tensors, which PyTorch passes to a kernel on any device without a copy,
    so this runs on the tensors' device without a host synchronisation. The reference and the torch backend
    share it.
    """
    skipped = None if skip is None else (skip.reshape(()) != 0) | (nonfinite.sum() > 0)
    f32 = functools.partial(torch.tensor, dtype=torch.float32)
    lr32, mom32, wd32, decay32, keep32 = f32(lr), f32(momentum), f32(weight_decay), f32(decay), f32(1.0 - decay)
    for i, (q, g, buf) in enumerate(zip(params, grads, momentum_buffers)):
        if q.numel() == 0:
            continue
        w, v = q.float(), buf.float()
        d = g.float() + wd32 * w
        v_new = (mom32 * v + d).to(buf.dtype)
        w_new = (w - lr32 * v_new.float()).to(q.dtype)
        if mask_mode == "update":
            frozen = rgp_scores(grads_nat[i], grads_adv[i], alpha) < thresholds[i]
            v_new = torch.where(frozen, buf, v_new)
            w_new = torch.where(frozen, q, w_new)
        if skipped is not None:
            v_new = torch.where(skipped, buf, v_new)
            w_new = torch.where(skipped, q, w_new)
        buf.copy_(v_new)
        q.copy_(w_new)
        if revision:
            rev = revision[i]
            rev.copy_(decay32 * rev.float() + keep32 * q.float())
