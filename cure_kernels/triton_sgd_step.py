"""Triton backend of the fused CURE step: conserve mask, SGD with momentum and weight decay, revision EMA.

Per tensor (all arithmetic in float32, each product and sum rounded separately, no fused multiply-add;
see :func:`cure_kernels.sgd_step.rgp_sgd_step_` for the full statement)::

    s    = f32(alpha)*|g_nat| + f32(1 - alpha)*|g_adv|,   thr = numpy.quantile(s, p)   (docs/method.md)
    drop = s < thr                          g[drop] = 0                      (stored in place)
    d    = g + f32(wd)*param                buf' = f32(momentum)*buf + d     (stored in buf's dtype)
    param' = param - f32(lr)*buf'           (buf' as stored; param' stored in param's dtype)
    mask_mode "update": where drop, param and buf are left as they were
    skip given and (skip != 0 or any score of the call not finite): param' = param, buf' = buf
    rev' = f32(decay)*rev + f32(1 - decay)*param'      (only when a revision list is given)

The thresholds of every dtype group come first from :func:`cure_kernels.triton_rgp_mask.select_thresholds`
(sampling bracket: one read of g_nat/g_adv, 8 B/element on large tensors; radix path for small tensors
and bracket misses). Only then, with ``skip``, is the skip flag formed on the device (skip != 0 or any
non-finite count of the whole call: three tiny PyTorch launches, no host synchronisation), and the
apply pass of each group runs (given thresholds and non-finite counts, from ``rgp_select_triton``, replace
the selection: then only the apply pass runs): ``_sgd_step_kernel`` loads g, param, buf (and rev) and, when the
threshold can mask anything (> 0), g_nat and g_adv, all before any store; then stores the masked g
(whole, when the threshold is > 0: full sectors instead of partial ones), param and buf (not where
frozen, nowhere when skipped) and rev. In float32 that pass moves 8 (scores) + 12 (g, param, buf read)
+ 12 (g, param, buf written) = 32 B/element, 40 B with revision; with a bracket hit the whole step is
40 B/element (48 with revision) against the 40 (48) of reading and writing what the update needs.
A threshold of 0 or NaN (e.g. at least a fraction p of exact zeros) skips the score reads and the g
store: 20 (28) B/element in that pass. Launches per dtype group: the zeroing memset, 3 for the
bracket (sample, pass, resolve), 5 (11/10/10-bit digits) or 7 (8-bit digits) for the radix path
whose programs exit at once for tensors that hit, and the apply pass.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from cure_kernels import backends
from cure_kernels.triton_revise import round_from_float32
from cure_kernels.triton_rgp_mask import (
    _STREAM_OPTIONS,
    _T_OUT,
    _T_START,
    BLOCK,
    _Group,
    _last_states,
    chunk_bounds,
    flat_view,
    flatten_tensors,
    on_tensor_device,
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
def _list_ptr(ptr, addr_ptr, row, tstart, INDIRECT: tl.constexpr):
    """A pointer p with p + (flat offset) addressing that element of the tensor of table row ``row``:
    ``ptr`` itself for a flat buffer; with INDIRECT the tensor's own storage from the address table,
    shifted back by the tensor's flat start."""
    if INDIRECT:
        base = tl.load(addr_ptr + row).to(tl.pointer_type(ptr.dtype.element_ty))
        p = base + (-tstart)
    else:
        p = ptr
    return p


@triton.jit
def _sgd_step_body(nat_ptr, adv_ptr, grad_ptr, param_ptr, buf_ptr, rev_ptr, offs, m, thr, skipped, alpha, beta, lr,
                   momentum, weight_decay, decay, keep, FULL: tl.constexpr, FREEZE: tl.constexpr,
                   REVISE: tl.constexpr):
    # Every load is issued before any store: the gradient is read once, never stored and read back.
    if FULL:
        g_in = tl.load(grad_ptr + offs)
        w_in = tl.load(param_ptr + offs)
        v_in = tl.load(buf_ptr + offs)
    else:
        g_in = tl.load(grad_ptr + offs, mask=m, other=0.0)
        w_in = tl.load(param_ptr + offs, mask=m, other=0.0)
        v_in = tl.load(buf_ptr + offs, mask=m, other=0.0)
    if REVISE:
        if FULL:
            r_in = tl.load(rev_ptr + offs)
        else:
            r_in = tl.load(rev_ptr + offs, mask=m, other=0.0)
    drop = m & (offs < 0)  # all False
    masking = thr > 0  # a threshold <= 0 or NaN masks nothing: the scores are not read
    if masking:
        s, key = score_keys(nat_ptr, adv_ptr, offs, m, alpha, beta, FULL)
        drop = m & (s < thr)
    dtype = grad_ptr.dtype.element_ty
    g_new = tl.where(drop, tl.zeros_like(g_in), g_in)
    g = _upcast(g_new)
    w = _upcast(w_in)
    v = _upcast(v_in)
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
    write = write & (skipped == 0)
    if masking:  # the whole gradient is stored (it was read anyway): full sectors, no partial writes
        if FULL:
            tl.store(grad_ptr + offs, g_new)
        else:
            tl.store(grad_ptr + offs, g_new, mask=m)
    tl.store(buf_ptr + offs, v_new, mask=write)
    tl.store(param_ptr + offs, w_new, mask=write)
    if REVISE:
        w_out = tl.where(write, _upcast(w_new), w)  # the parameter as it is now stored
        r = _upcast(r_in)
        dr = decay * r
        kw = keep * w_out
        r_new = round_from_float32(dr + kw, dtype)
        if FULL:
            tl.store(rev_ptr + offs, r_new)
        else:
            tl.store(rev_ptr + offs, r_new, mask=m)
    return tl.sum(drop.to(tl.int32))


@triton.jit
def _sgd_step_kernel(nat_ptr, adv_ptr, grad_ptr, param_ptr, buf_ptr, rev_ptr, chunk_ptr, tensor_ptr, thr_ptr,
                     kept_ptr, skip_ptr, addr_ptr, alpha, beta, lr, momentum, weight_decay, decay, keep, num_chunks,
                     num_tensors, BLOCK: tl.constexpr, FREEZE: tl.constexpr, REVISE: tl.constexpr,
                     SKIP: tl.constexpr, INDIRECT: tl.constexpr = 0):
    # tl[0] g_nat, tl[1] g_adv (read); tl[2] grads (masked); tl[3] params, tl[4] momentum buffers (read,
    # written; in FREEZE mode only where s >= thr; not at all when SKIP and the skip flag is set); tl[5]
    # revision (read, written; only when REVISE, otherwise an unused placeholder). All flat, one dtype;
    # chunks as in triton_rgp_mask. skip_ptr: int32 flag (SKIP only). INDIRECT: bit l set when written list l
    # (grads, params, buffers, revision) is addressed through row l of the address table addr_ptr
    # (int64 [4, num_tensors]: each tensor's data pointer) instead of one flat buffer.
    t, trow, offs, m, full = chunk_bounds(chunk_ptr, tensor_ptr, num_chunks, BLOCK)
    if INDIRECT != 0:
        tstart = tl.load(trow + _T_START)
        grad_ptr = _list_ptr(grad_ptr, addr_ptr, 0 * num_tensors + t, tstart, (INDIRECT & 1) != 0)
        param_ptr = _list_ptr(param_ptr, addr_ptr, 1 * num_tensors + t, tstart, (INDIRECT & 2) != 0)
        buf_ptr = _list_ptr(buf_ptr, addr_ptr, 2 * num_tensors + t, tstart, (INDIRECT & 4) != 0)
        rev_ptr = _list_ptr(rev_ptr, addr_ptr, 3 * num_tensors + t, tstart, (INDIRECT & 8) != 0)
    out = tl.load(trow + _T_OUT)
    thr = tl.load(thr_ptr + out)
    skipped = 0
    if SKIP:
        skipped = tl.load(skip_ptr)
    if full:
        dropped = _sgd_step_body(nat_ptr, adv_ptr, grad_ptr, param_ptr, buf_ptr, rev_ptr, offs, m, thr, skipped,
                                 alpha, beta, lr, momentum, weight_decay, decay, keep, True, FREEZE, REVISE)
    else:
        dropped = _sgd_step_body(nat_ptr, adv_ptr, grad_ptr, param_ptr, buf_ptr, rev_ptr, offs, m, thr, skipped,
                                 alpha, beta, lr, momentum, weight_decay, decay, keep, False, FREEZE, REVISE)
    kept = tl.sum(m.to(tl.int32)) - dropped
    tl.atomic_add(kept_ptr + out, kept.to(tl.int64), sem="relaxed")


# On CUDA (compiled kernels), written lists that are contiguous but not one flat buffer (separate parameter
# tensors) are addressed through a table of their data pointers instead of being packed with torch.cat
# and copied back (16 B/element per list saved). Triton's interpreter cannot load through such pointers:
# there the lists are packed.
POINTER_TABLES = True
_ADDR_CACHE_SIZE = 16
_addr_tables: OrderedDict[tuple, Tensor] = OrderedDict()


def pointer_tables_usable(device: torch.device) -> bool:
    """Whether written lists on ``device`` may be addressed through pointer tables (INDIRECT): compiled
    kernels on CUDA tensors. The ahead-of-time compile check (scripts/triton_aot_check.py), which launches
    on CPU tensors and compiles without running, replaces this to reach the INDIRECT variants."""
    return POINTER_TABLES and device.type == "cuda" and not backends.PROBE.triton_interpret


def written_layout(tensors: list[Tensor], tables: bool) -> str:
    """How a written list is passed: "flat" (one buffer, zero copy), "table" (data pointers; ``tables``
    allows it) or "packed" (torch.cat, then copied back)."""
    if flat_view(tensors) is not None:
        return "flat"
    if tables and all(t.is_contiguous() for t in tensors):
        return "table"
    return "packed"


def address_table(rows: list[list[Tensor] | None], num_tensors: int, device: torch.device) -> Tensor:
    """int64 [len(rows) * num_tensors]: the data pointers of each list given (zeros for None), on
    ``device``; cached per set of addresses (uploaded without host synchronisation after the first)."""
    key = (device, tuple(tuple(t.data_ptr() for t in ts) if ts is not None else None for ts in rows))
    table = _addr_tables.get(key)
    if table is not None:
        _addr_tables.move_to_end(key)
        return table
    host = torch.zeros(len(rows) * num_tensors, dtype=torch.int64)
    for r, ts in enumerate(rows):
        if ts is not None:
            host[r * num_tensors:(r + 1) * num_tensors] = torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    table = host.to(device, non_blocking=True)
    _addr_tables[key] = table
    if len(_addr_tables) > _ADDR_CACHE_SIZE:
        _addr_tables.popitem(last=False)
    return table


def _step_group(group: _Group, lists: list[list[Tensor]], nat: Tensor, adv: Tensor, revise: bool,
                scalars: tuple[float, ...], freeze: bool, thresholds: Tensor, kept: Tensor,
                skip_flag: Tensor | None) -> None:
    grads, _, _, params, bufs, revs = lists
    alpha, beta, lr, momentum, weight_decay, decay, keep = scalars
    nc = group.num_chunks
    written = [grads, params, bufs] + ([revs] if revise else [])
    tables = pointer_tables_usable(grads[0].device)
    layouts = [written_layout(tensors, tables) for tensors in written]
    flats, rows, indirect = [], [], 0
    for i, (tensors, layout) in enumerate(zip(written, layouts)):
        if layout == "table":
            flats.append((next(t for t in tensors if t.numel()), False))  # dtype carrier, never dereferenced
            rows.append(tensors)
            indirect |= 1 << i
        else:
            flats.append(flatten_tensors(tensors))
            rows.append(None)
    grad, param, buf = (f for f, _ in flats[:3])
    rev = flats[3][0] if revise else param  # placeholder pointer, never read when REVISE is off
    flag = skip_flag if skip_flag is not None else thresholds  # placeholder pointer, never read without SKIP
    num_tensors = len(group.members)
    addr = address_table(rows + [None] * (4 - len(rows)), num_tensors, grads[0].device) if indirect else group.chunks
    _sgd_step_kernel[(nc,)](nat, adv, grad, param, buf, rev, group.chunks, group.tensors, thresholds, kept, flag,
                            addr, alpha, beta, lr, momentum, weight_decay, decay, keep, nc, num_tensors, BLOCK=BLOCK,
                            FREEZE=freeze, REVISE=revise, SKIP=skip_flag is not None, INDIRECT=indirect,
                            **_STREAM_OPTIONS)
    for (flat, packed), tensors in zip(flats, written):
        if packed:
            scatter_back(flat, tensors)


@on_tensor_device
def rgp_sgd_step_triton(params: list[Tensor], grads: list[Tensor], grads_nat: list[Tensor],
                        grads_adv: list[Tensor], momentum_buffers: list[Tensor], revision: list[Tensor],
                        lr: float, momentum: float, weight_decay: float, alpha: float, p: float,
                        mask_mode: str, decay: float, skip: Tensor | None = None,
                        given_thresholds: Tensor | None = None, given_nonfinite: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """The fused step in place (module docstring); ``revision`` empty means no revision update.

    Arguments are checked by :func:`cure_kernels.rgp_sgd_step_` first. Returns ``(thresholds float32[T],
    kept int64[T], nonfinite int64[T])``, bit for bit :func:`cure_kernels.sgd_step.rgp_sgd_step_reference`,
    without a host synchronisation. With ``given_thresholds`` and ``given_nonfinite`` (both, as
    :func:`~cure_kernels.triton_rgp_mask.rgp_select_triton` returns them) the selection is skipped: only
    the apply pass runs, and the statistics are copies of them with kept counted by that pass.
    """
    num = len(params)
    device = params[0].device if num else torch.device("cpu")
    given = given_thresholds is not None
    if given:
        thresholds, nonfinite = given_thresholds.clone(), given_nonfinite.clone()
    else:
        thresholds = torch.empty(num, dtype=torch.float32, device=device)
        nonfinite = torch.empty(num, dtype=torch.int64, device=device)
    kept = torch.zeros(num, dtype=torch.int64, device=device)
    if num == 0:
        return thresholds, kept, nonfinite
    f32 = np.float32
    # Every scalar rounded to float32 once on the host; 1 - alpha and 1 - decay computed in double first.
    scalars = tuple(float(f32(x)) for x in (alpha, 1.0 - alpha, lr, momentum, weight_decay, decay, 1.0 - decay))
    revise = len(revision) > 0
    if not given:  # (with given thresholds, the bracket statistics stay those of the call that selected them)
        _last_states.clear()
    # Selection for every group first: with skip=, any non-finite score of the call decides the update of all.
    work = []
    for group in plan_groups(grads, float(p)):
        idx = group.members
        lists = [[src[i] for i in idx] if src else [] for src in
                 (grads, grads_nat, grads_adv, params, momentum_buffers, revision)]
        if group.num_chunks == 0:  # only empty tensors: NaN thresholds, nothing to update
            if not given:
                select_thresholds(group, grads[idx[0]], grads[idx[0]], scalars[0], scalars[1], thresholds,
                                  nonfinite)
            continue
        nat, _ = flatten_tensors(lists[1])
        adv, _ = flatten_tensors(lists[2])
        if not given:
            select_thresholds(group, nat, adv, scalars[0], scalars[1], thresholds, nonfinite)
        work.append((group, lists, nat, adv))
    skip_flag = None
    if skip is not None:  # on the device: no host synchronisation
        skip_flag = torch.logical_or(skip.reshape(()) != 0, nonfinite.sum() > 0).to(torch.int32).reshape(1)
    for group, lists, nat, adv in work:
        _step_group(group, lists, nat, adv, revise, scalars, mask_mode == "update", thresholds, kept, skip_flag)
    return thresholds, kept, nonfinite
