"""Triton backend of the fused CURE step: conserve mask, SGD with momentum and weight decay, revision EMA.

Per tensor (all arithmetic in float32, each product and sum rounded separately, no fused multiply-add;
see :func:`cure_kernels.sgd_step.rgp_sgd_step_` for the full statement)::

    s    = f32(alpha)*|g_nat| + f32(1 - alpha)*|g_adv|,   thr = numpy.quantile(s, p)   (SPEC section 2)
    drop = s < thr                          g[drop] = 0                      (stored in place)
    d    = g + f32(wd)*param                buf' = f32(momentum)*buf + d     (stored in buf's dtype)
    param' = param - f32(lr)*buf'           (buf' as stored; param' stored in param's dtype)
    mask_mode "update": where drop, param and buf are left as they were
    rev' = f32(decay)*rev + f32(1 - decay)*param'      (only when a revision list is given)

The threshold comes from the radix-select launches of :mod:`cure_kernels.triton_rgp_mask` (launches
1-6 there: two passes over g_nat/g_adv plus a pass over the few candidates). The last pass over the
data is fused here: ``_sgd_step_kernel`` recomputes s, and in one read of g, param, buf (and rev)
writes the zeros of the mask into g, the new param and buf (and rev). In float32 that pass moves
8 (scores) + 12 (g, param, buf read) + 8 (param, buf written) = 28 B/element, 36 B with revision,
plus 4 B per masked entry of g; with the 16 B of the two selection passes the whole step is
44 B/element (52 with revision). The unfused sequence (mask pass, then a fused SGD kernel, then the
EMA) moves 24 + 20 (+ 12) B: the same 44 without revision, since either way the scores are read
again after the threshold is known, and 56 with it. What fusion saves is the EMA's second read of
param, a launch or two per group, and in mask_mode "update" the per-element keep masks and the copies
of param and buf that freezing needs outside the kernel. Seven launches per dtype group and no host
synchronisation.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from cure_kernels.triton_revise import round_from_float32
from cure_kernels.triton_rgp_mask import (
    _ALIGN,
    _STREAM_OPTIONS,
    _T_COLS,
    _T_END,
    _T_OUT,
    BLOCK,
    _Group,
    flatten_tensors,
    plan_groups,
    scatter_back,
    score_keys,
    select_thresholds,
)

__all__ = ["rgp_sgd_step_triton"]

@triton.jit
def _upcast(x):
    """float32/bfloat16/float16 values to float32, exactly (bfloat16 by shifting its bits, see
    ``triton_rgp_mask.load_float32``)."""
    if x.dtype == tl.bfloat16:
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _sgd_step_kernel(nat_ptr, adv_ptr, grad_ptr, param_ptr, buf_ptr, rev_ptr, chunk_ptr, tensor_ptr, thr_ptr,
                     kept_ptr, alpha, beta, lr, momentum, weight_decay, decay, keep, num_chunks,
                     BLOCK: tl.constexpr, ALIGNED: tl.constexpr, FREEZE: tl.constexpr, REVISE: tl.constexpr):
    # tl[0] g_nat, tl[1] g_adv (read); tl[2] grads (zeros stored where s < thr); tl[3] params, tl[4] momentum
    # buffers (read, written; in FREEZE mode only where s >= thr); tl[5] revision (read, written; only when
    # REVISE, otherwise an unused placeholder). All flat, one dtype; chunk table as in triton_rgp_mask.
    pid = tl.program_id(0)
    t = tl.load(chunk_ptr + pid).to(tl.int32)
    start = tl.load(chunk_ptr + num_chunks + pid)
    trow = tensor_ptr + t * _T_COLS
    end = tl.load(trow + _T_END)
    if ALIGNED:  # every tensor size is a multiple of _ALIGN: the bounds mask is too, so loads vectorise
        start = tl.multiple_of(start, _ALIGN)
        end = tl.multiple_of(end, _ALIGN)
    out = tl.load(trow + _T_OUT)
    thr = tl.load(thr_ptr + out)
    offs = start + tl.arange(0, BLOCK)
    m = offs < end
    s, key = score_keys(nat_ptr, adv_ptr, offs, m, alpha, beta)
    drop = m & (s < thr)
    dtype = grad_ptr.dtype.element_ty
    tl.store(grad_ptr + offs, tl.zeros([BLOCK], dtype=dtype), mask=drop)
    kept = tl.sum((m & ~drop).to(tl.int32))
    tl.atomic_add(kept_ptr + out, kept.to(tl.int64), sem="relaxed")

    g = tl.where(drop, 0.0, _upcast(tl.load(grad_ptr + offs, mask=m & ~drop, other=0.0)))
    w = _upcast(tl.load(param_ptr + offs, mask=m, other=0.0))
    v = _upcast(tl.load(buf_ptr + offs, mask=m, other=0.0))
    wdw = weight_decay * w
    d = g + wdw
    mv = momentum * v
    v_new = round_from_float32(mv + d, dtype)
    step = lr * _upcast(v_new)
    w_new = round_from_float32(w - step, dtype)
    if FREEZE:
        write = m & ~drop
    else:
        write = m
    tl.store(buf_ptr + offs, v_new, mask=write)
    tl.store(param_ptr + offs, w_new, mask=write)
    if REVISE:
        w_out = tl.where(write, _upcast(w_new), w)  # the parameter as it is now stored
        r = _upcast(tl.load(rev_ptr + offs, mask=m, other=0.0))
        dr = decay * r
        kw = keep * w_out
        tl.store(rev_ptr + offs, round_from_float32(dr + kw, dtype), mask=m)


def _step_group(group: _Group, lists: list[list[Tensor]], revise: bool, scalars: tuple[float, ...],
                freeze: bool, thresholds: Tensor, kept: Tensor, nonfinite: Tensor) -> None:
    grads, nat_l, adv_l, params, bufs, revs = lists
    alpha, beta, lr, momentum, weight_decay, decay, keep = scalars
    nc = group.num_chunks
    if nc == 0:  # only empty tensors: NaN thresholds, nothing to update
        select_thresholds(group, grads[0], grads[0], alpha, beta, thresholds, nonfinite)
        return
    nat, _ = flatten_tensors(nat_l)
    adv, _ = flatten_tensors(adv_l)
    select_thresholds(group, nat, adv, alpha, beta, thresholds, nonfinite)
    written = [grads, params, bufs] + ([revs] if revise else [])
    flats = [flatten_tensors(tensors) for tensors in written]
    grad, param, buf = (f for f, _ in flats[:3])
    rev = flats[3][0] if revise else param  # placeholder pointer, never read when REVISE is off
    _sgd_step_kernel[(nc,)](nat, adv, grad, param, buf, rev, group.chunks, group.tensors, thresholds, kept,
                            alpha, beta, lr, momentum, weight_decay, decay, keep, nc, BLOCK=BLOCK,
                            ALIGNED=group.aligned, FREEZE=freeze, REVISE=revise, **_STREAM_OPTIONS)
    for (flat, packed), tensors in zip(flats, written):
        if packed:
            scatter_back(flat, tensors)


def rgp_sgd_step_triton(params: list[Tensor], grads: list[Tensor], grads_nat: list[Tensor],
                        grads_adv: list[Tensor], momentum_buffers: list[Tensor], revision: list[Tensor],
                        lr: float, momentum: float, weight_decay: float, alpha: float, p: float,
                        mask_mode: str, decay: float, skip: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The fused step in place (module docstring); ``revision`` empty means no revision update.

    Arguments are checked by :func:`cure_kernels.rgp_sgd_step_` first. Returns ``(thresholds float32[T],
    kept int64[T], nonfinite int64[T])``, bit for bit :func:`cure_kernels.sgd_step.rgp_sgd_step_reference`,
    without a host synchronisation.
    """
    if skip is not None:
        raise NotImplementedError("rgp_sgd_step_: the Triton backend does not take skip= yet; "
                                  "use backend='reference' or 'cpu'")
    num = len(params)
    device = params[0].device if num else torch.device("cpu")
    thresholds = torch.empty(num, dtype=torch.float32, device=device)
    kept = torch.zeros(num, dtype=torch.int64, device=device)
    nonfinite = torch.empty(num, dtype=torch.int64, device=device)
    if num == 0:
        return thresholds, kept, nonfinite
    f32 = np.float32
    # Every scalar rounded to float32 once on the host; 1 - alpha and 1 - decay computed in double first.
    scalars = tuple(float(f32(x)) for x in (alpha, 1.0 - alpha, lr, momentum, weight_decay, decay, 1.0 - decay))
    revise = len(revision) > 0
    for group in plan_groups(grads, float(p)):
        idx = group.members
        lists = [[src[i] for i in idx] if src else [] for src in
                 (grads, grads_nat, grads_adv, params, momentum_buffers, revision)]
        _step_group(group, lists, revise, scalars, mask_mode == "update", thresholds, kept, nonfinite)
    return thresholds, kept, nonfinite
