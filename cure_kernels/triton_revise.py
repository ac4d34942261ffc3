"""Triton backend of the revise step (paper Eq. 7): ``rev <- decay*rev + (1 - decay)*param`` over a list.

In float32, with ``f32(decay)`` and ``f32(1 - decay)`` (``1 - decay`` computed in double) and each
product and the sum rounded separately (no fused multiply-add), then rounded to nearest-even into
the revision tensor's dtype: bit for bit :func:`cure_kernels.reference.revise_reference`.

The update is elementwise, so one launch per dtype group covers every tensor of the group through
one flat buffer (zero copy when the tensors are contiguous views laid back to back in one storage,
packed with ``torch.cat`` otherwise, the packed revision copied back in place). It reads 2 and
writes 1 element per parameter: 12 B/element in float32.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl
from torch import Tensor

from cure_kernels.triton_rgp_mask import flatten_tensors, load_float32, on_tensor_device, scatter_back

__all__ = ["revise_triton"]

# 4096 elements per program, 8 warps (16 per thread): a plain streaming kernel; the same shape as the
# masking passes. Not tuned on a GPU yet; bench/ is where to tune it.
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def round_from_float32(x, dtype: tl.constexpr):
    """float32 -> ``dtype`` rounded to nearest-even. bfloat16 is rounded with integer arithmetic
    (the rounding PyTorch does; Triton's interpreter truncates otherwise); NaN stays NaN."""
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        lsb = (u >> 16) & 1
        r = (u + lsb + 0x7FFF) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        y = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _revise_kernel(rev_ptr, par_ptr, numel, decay, keep, BLOCK: tl.constexpr):
    # tl[0] revision parameters (flat, read and written), tl[1] parameters (flat, read).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    r = load_float32(rev_ptr, offs, m)
    q = load_float32(par_ptr, offs, m)
    rd = decay * r
    qk = keep * q
    tl.store(rev_ptr + offs, round_from_float32(rd + qk, rev_ptr.dtype.element_ty), mask=m)


@on_tensor_device
def revise_triton(revision: list[Tensor], params: list[Tensor], decay: float) -> None:
    """``revision[i] <- f32(decay)*revision[i] + f32(1 - decay)*params[i]`` in place, for every i.

    Arguments are checked by :func:`cure_kernels.revise_` before this is called.
    """
    decay32 = float(np.float32(decay))
    keep32 = float(np.float32(1.0 - decay))
    dtypes = [r.dtype for r in revision]
    for dtype in dict.fromkeys(dtypes):
        members = [i for i, d in enumerate(dtypes) if d == dtype]
        revs = [revision[i] for i in members]
        numel = sum(r.numel() for r in revs)
        if numel == 0:
            continue
        rev, packed = flatten_tensors(revs)
        par, _ = flatten_tensors([params[i] for i in members])
        _revise_kernel[(triton.cdiv(numel, BLOCK),)](rev, par, numel, decay32, keep32, BLOCK=BLOCK,
                                                     num_warps=NUM_WARPS, enable_fp_fusion=False)
        if packed:
            scatter_back(rev, revs)

