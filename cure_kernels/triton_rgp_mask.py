"""Triton backend of the conserve step: exact per-tensor p-quantile masking over a list of tensors.

For every tensor i with n elements (SPEC section 2, paper Eq. 6)::

    s   = f32(alpha)*|g_nat| + f32(1 - alpha)*|g_adv|          (float32, no fused multiply-add)
    h   = (n - 1)*p (float64),  k = floor(h),  g = h - k
    a   = v[k],  b = v[k + 1]   (v = sorted s; a = b = v[n - 1] when k >= n - 1)
    d   = f32(b - a)
    thr = f32(a + d*f32(g)) if g < 0.5 else f32(b - d*f32(1 - g));  thr = NaN if any s is NaN
    update[s < thr] = 0

The k-th and (k+1)-th order statistics are found exactly by a radix select on the float32 bits of
s: scores are >= 0 (never -0.0) or NaN, so their bit patterns read as integers are ordered like the
values (+inf = 0x7f800000 above every finite score). NaNs are given the key 0x7fffffff, above +inf;
a NaN anywhere makes the threshold NaN, so where they sort does not matter. The 31-bit key is
resolved in three digits of 11, 10 and 10 bits.

Every launch covers all tensors of one dtype group: the tensors are read through one flat buffer
(zero copy when they are already contiguous views laid back to back in one storage, as the flat
gradient buffers of :class:`cure_kernels.ProminenceMasker` are; packed with ``torch.cat`` otherwise)
and a chunk table maps program i to chunk i of tensor ``chunk_tensor[i]``. Launches per dtype group,
with the bytes each pass moves per element of float32 gradients (half that for bf16/fp16 reads):

1. ``_histogram_kernel`` (pass 1 over the data): computes s and histograms the top 11 key bits per
   tensor (+inf and NaN each have a level-1 bin of their own: the non-finite counts come free).
   Reads g_nat, g_adv: 8 B/element.
2. ``_select_kernel`` level 1 (SELECT_TILE tensors per program): the level-1 bins holding ranks k
   and k+1, and the ranks inside them.
3. ``_refine_kernel`` (pass 2 over the data): recomputes s; for elements in those bins, histograms
   the next 10 key bits and compacts their keys into a candidate buffer. Reads 8 B/element, writes
   4 B per candidate (typically a few percent of the elements: one bin spans 1/8 of a binade).
4. ``_select_kernel`` level 2.
5. ``_candidate_kernel`` (over the candidates only): histograms the last 10 key bits of the
   candidates that share the 21-bit prefix of rank k or k+1. Reads 4 B per candidate.
6. ``_select_kernel`` level 3: the exact keys of ranks k and k+1, then the threshold by numpy's
   formula, written with the non-finite count to the outputs.
7. ``_mask_kernel`` (pass 3 over the data): recomputes s, stores zeros where s < thr, counts the
   entries kept. Reads 8 B/element, writes 4 B per masked entry.

In float32 that is 24 B/element, plus 4 B per masked entry and 8 B per candidate, in seven launches
and one memset (the zeroed workspace), with no host synchronisation: the per-tensor tables (sizes,
offsets, ranks, interpolation weights) are known on the host from the shapes, built once per list
layout and cached on the device. Kernel boundaries order the passes; nothing spins on a grid barrier.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "rgp_mask_triton",
    "plan_groups",
    "select_thresholds",
    "score_keys",
    "flat_view",
    "flatten_tensors",
    "scatter_back",
    "load_float32",
]

# Elements per program in the streaming passes. 4096 float32 elements (2 x 16 KiB of gradients) per
# program with 8 warps gives 16 elements per thread: enough bytes in flight per SM to stream at full
# bandwidth, and few enough programs (about 2.7k for ResNet-18) that the per-program histogram merge
# (at most 2048 atomics into L2) stays cheap. Not tuned on a GPU yet; bench/ is where to tune it.
BLOCK = 4096
STREAM_WARPS = 8
# Level-1 digit: the top 11 of the 31 key bits (8 exponent bits, 3 mantissa bits), 2048 bins of
# 1/8 binade each; PERFORMANCE.md suggests 12-13 bits, 11 keeps the per-program histogram (and its
# global merge) at 2048 entries, the same table size the two 10-bit levels need for ranks k and k+1.
BINS = 2048
SUB_BINS = 1024  # levels 2 and 3: 10 bits each; rank k's and rank k+1's halves of a 2048-bin table
# The select kernels scan [SELECT_TILE, 2048] histogram rows per program (SELECT_TILE tensors at once):
# tiny and latency-bound; 4 rows x 2048 bins over 8 warps is 32 counters per thread and per array.
SELECT_TILE = 4
SELECT_WARPS = 8
_CACHE_SIZE = 32  # cached per-layout tables (a training loop uses one or two layouts)

# Constants used inside the kernels.
_L1_SHIFT = tl.constexpr(20)  # key >> 20: level-1 digit (11 bits)
_L2_SHIFT = tl.constexpr(10)  # (key >> 10) & 1023: level-2 digit; key & 1023: level-3 digit
_DIGIT_MASK = tl.constexpr(1023)
# When every tensor of a group has a multiple of 8 elements, chunk starts and tensor ends are multiples
# of 8 (32 B in float32, 16 B in bf16/fp16), and telling the compiler so lets it vectorise the masked
# streaming loads (checked in the PTX: ld.global.v4 instead of scalar loads); the host decides per group.
_ALIGN = tl.constexpr(8)
_NAN_KEY = tl.constexpr(0x7FFFFFFF)
_INF_DIGIT = tl.constexpr(0x7F800000 >> 20)  # level-1 bin of +inf; no finite score or NaN key in it
_NAN_DIGIT = tl.constexpr(0x7FFFFFFF >> 20)  # level-1 bin of the NaN key; nothing else in it
_QNAN_BITS = tl.constexpr(0x7FC00000)

# Per-tensor table (int64, built on the host), one row of _T_COLS per tensor of a group.
_T_START = tl.constexpr(0)  # flat offset of the tensor's first element
_T_END = tl.constexpr(1)  # flat offset one past its last element
_T_RANK_K = tl.constexpr(2)  # k = floor((n - 1) * p), clamped to n - 1
_T_RANK_K1 = tl.constexpr(3)  # k + 1, clamped to n - 1
_T_OUT = tl.constexpr(4)  # the tensor's index in the caller's list (row of the outputs)
_T_G_BELOW_HALF = tl.constexpr(5)  # 1 when g < 0.5: interpolate from a, else from b
_T_N = tl.constexpr(6)  # number of elements
_T_COLS = tl.constexpr(8)
# Per-tensor state (int32, zeroed each call), one row of _S_COLS per tensor of a group.
_S_CAND = tl.constexpr(0)  # candidates compacted by the refine pass
_S_PREFIX_A = tl.constexpr(1)  # key bits resolved so far of rank k (the full key after level 3)
_S_PREFIX_B = tl.constexpr(2)  # same for rank k + 1
_S_RANK_A = tl.constexpr(3)  # rank of rank-k's element among the elements sharing prefix A
_S_RANK_B = tl.constexpr(4)  # same for rank k + 1
_S_COLS = tl.constexpr(8)

_DIGIT_LEVELS = 3
_INT32_LIMIT = 2**31


# --- kernels -----------------------------------------------------------------------------------
@triton.jit
def load_float32(ptr, offs, m):
    """Load float32/bfloat16/float16 values (0 where masked) and upcast them exactly to float32.

    bfloat16 is widened by shifting its bits into the top half of a float32, which is what the
    hardware conversion does; Triton's interpreter converts bfloat16 subnormals wrongly otherwise.
    """
    x = tl.load(ptr + offs, mask=m, other=0.0)
    if x.dtype == tl.bfloat16:
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def score_keys(nat_ptr, adv_ptr, offs, m, alpha, beta):
    """s = alpha*|g_nat| + beta*|g_adv| in float32 (each op rounded; launched without FMA contraction)
    and its radix key: the float bits as int32, NaN -> 0x7fffffff."""
    # load_float32 written out: each nested jit call costs about a millisecond per program in the
    # interpreter, and this runs in every program of three passes.
    x = tl.load(nat_ptr + offs, mask=m, other=0.0)
    y = tl.load(adv_ptr + offs, mask=m, other=0.0)
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        y = (y.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    px = alpha * tl.abs(x)
    py = beta * tl.abs(y)
    s = px + py
    key = tl.where(s != s, _NAN_KEY, s.to(tl.int32, bitcast=True))
    return s, key


@triton.jit
def _histogram_kernel(nat_ptr, adv_ptr, chunk_ptr, tensor_ptr, ws_ptr, alpha, beta, num_chunks,
                      BLOCK: tl.constexpr, NUM_BINS: tl.constexpr, ALIGNED: tl.constexpr):
    # tl[0] g_nat (flat), tl[1] g_adv (flat). ws: level-1 histograms [T, NUM_BINS] at 0. The +inf and
    # NaN counts need no extra work: +inf alone fills bin _INF_DIGIT and NaN alone bin _NAN_DIGIT.
    pid = tl.program_id(0)
    t = tl.load(chunk_ptr + pid).to(tl.int32)
    start = tl.load(chunk_ptr + num_chunks + pid)
    end = tl.load(tensor_ptr + t * _T_COLS + _T_END)
    if ALIGNED:  # every tensor size is a multiple of _ALIGN: the bounds mask is too, so loads vectorise
        start = tl.multiple_of(start, _ALIGN)
        end = tl.multiple_of(end, _ALIGN)
    offs = start + tl.arange(0, BLOCK)
    m = offs < end
    s, key = score_keys(nat_ptr, adv_ptr, offs, m, alpha, beta)
    # Masked lanes are counted in bin 0 by tl.histogram, then taken out again.
    bins = tl.arange(0, NUM_BINS)
    hist = tl.histogram(tl.where(m, key >> _L1_SHIFT, 0), NUM_BINS)
    hist = hist - tl.where(bins == 0, tl.maximum(start + BLOCK - end, 0).to(tl.int32), 0)
    tl.atomic_add(ws_ptr + t * NUM_BINS + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _select_kernel(tensor_ptr, frac_ptr, ws_ptr, thr_ptr, nonfinite_ptr, num_tensors, state_base,
                   LEVEL: tl.constexpr, TILE: tl.constexpr, NUM_BINS: tl.constexpr, ROW_BINS: tl.constexpr):
    # Program i handles tensors [i*TILE, (i+1)*TILE): for each, the bins holding ranks k and k+1 at digit
    # level LEVEL, and their ranks inside those bins. Level 1 reads the level-1 row (ROW_BINS = NUM_BINS
    # bins). Levels 2 and 3 read a row whose first ROW_BINS bins count the candidates sharing rank k's
    # prefix and whose second half those sharing rank k+1's (left empty when both share one prefix; both
    # then use the first half). Level 3 has the full keys and writes the threshold and non-finite count.
    t = tl.program_id(0) * TILE + tl.arange(0, TILE)
    valid = t < num_tensors
    trow = tensor_ptr + t * _T_COLS
    state = ws_ptr + state_base + t * _S_COLS
    bins = tl.arange(0, ROW_BINS)
    row = ws_ptr + (LEVEL - 1) * num_tensors * NUM_BINS + t * NUM_BINS
    valid2 = valid[:, None]
    hist_a = tl.load(row[:, None] + bins[None, :], mask=valid2, other=0)
    if LEVEL == 1:
        rank_a = tl.load(trow + _T_RANK_K, mask=valid, other=0).to(tl.int32)
        rank_b = tl.load(trow + _T_RANK_K1, mask=valid, other=0).to(tl.int32)
        hist_b = hist_a
    else:
        prefix_a = tl.load(state + _S_PREFIX_A, mask=valid, other=0)
        prefix_b = tl.load(state + _S_PREFIX_B, mask=valid, other=0)
        rank_a = tl.load(state + _S_RANK_A, mask=valid, other=0)
        rank_b = tl.load(state + _S_RANK_B, mask=valid, other=0)
        upper = tl.load(row[:, None] + ROW_BINS + bins[None, :], mask=valid2, other=0)
        hist_b = tl.where((prefix_a == prefix_b)[:, None], hist_a, upper)
    # digit = number of bins whose inclusive prefix count is <= rank; clamped for an empty tensor,
    # whose digits are never used.
    digit_a = tl.sum((tl.cumsum(hist_a, 1) <= rank_a[:, None]).to(tl.int32), 1)
    digit_b = tl.sum((tl.cumsum(hist_b, 1) <= rank_b[:, None]).to(tl.int32), 1)
    digit_a = tl.minimum(digit_a, ROW_BINS - 1)
    digit_b = tl.minimum(digit_b, ROW_BINS - 1)
    rank_a = rank_a - tl.sum(tl.where(bins[None, :] < digit_a[:, None], hist_a, 0), 1)
    rank_b = rank_b - tl.sum(tl.where(bins[None, :] < digit_b[:, None], hist_b, 0), 1)
    if LEVEL == 1:
        prefix_a = digit_a
        prefix_b = digit_b
    else:
        prefix_a = (prefix_a << _L2_SHIFT) | digit_a
        prefix_b = (prefix_b << _L2_SHIFT) | digit_b
    tl.store(state + _S_PREFIX_A, prefix_a, mask=valid)
    tl.store(state + _S_PREFIX_B, prefix_b, mask=valid)
    tl.store(state + _S_RANK_A, rank_a, mask=valid)
    tl.store(state + _S_RANK_B, rank_b, mask=valid)
    if LEVEL == 3:
        # prefix_a, prefix_b are now the full keys of ranks k and k+1: numpy's linear interpolation,
        # each operation rounded to float32 (no FMA), so inf - inf and inf * 0 give NaN as in numpy.
        a = prefix_a.to(tl.float32, bitcast=True)
        b = prefix_b.to(tl.float32, bitcast=True)
        d = b - a
        dg = d * tl.load(frac_ptr + 2 * t, mask=valid, other=0.0)
        from_a = a + dg
        dg1 = d * tl.load(frac_ptr + 2 * t + 1, mask=valid, other=0.0)
        from_b = b - dg1
        thr = tl.where(tl.load(trow + _T_G_BELOW_HALF, mask=valid, other=0) != 0, from_a, from_b)
        level1 = ws_ptr + t * NUM_BINS
        n_nan = tl.load(level1 + _NAN_DIGIT, mask=valid, other=0)
        n_inf = tl.load(level1 + _INF_DIGIT, mask=valid, other=0)
        qnan = tl.full([TILE], _QNAN_BITS, tl.int32).to(tl.float32, bitcast=True)
        thr = tl.where((n_nan > 0) | (tl.load(trow + _T_N, mask=valid, other=0) == 0), qnan, thr)
        out = tl.load(trow + _T_OUT, mask=valid, other=0)
        tl.store(thr_ptr + out, thr, mask=valid)
        tl.store(nonfinite_ptr + out, (n_nan + n_inf).to(tl.int64), mask=valid)


@triton.jit
def _refine_kernel(nat_ptr, adv_ptr, chunk_ptr, tensor_ptr, ws_ptr, cand_ptr, alpha, beta, num_chunks,
                   num_tensors, state_base, BLOCK: tl.constexpr, NUM_BINS: tl.constexpr,
                   NUM_SUB: tl.constexpr, ALIGNED: tl.constexpr):
    # tl[0] g_nat, tl[1] g_adv (flat). Candidates of tensor t go to cand[start_t : start_t + n_t].
    pid = tl.program_id(0)
    t = tl.load(chunk_ptr + pid).to(tl.int32)
    start = tl.load(chunk_ptr + num_chunks + pid)
    trow = tensor_ptr + t * _T_COLS
    end = tl.load(trow + _T_END)
    if ALIGNED:  # every tensor size is a multiple of _ALIGN: the bounds mask is too, so loads vectorise
        start = tl.multiple_of(start, _ALIGN)
        end = tl.multiple_of(end, _ALIGN)
    offs = start + tl.arange(0, BLOCK)
    m = offs < end
    state = ws_ptr + state_base + t * _S_COLS
    prefix_a = tl.load(state + _S_PREFIX_A)
    prefix_b = tl.load(state + _S_PREFIX_B)
    s, key = score_keys(nat_ptr, adv_ptr, offs, m, alpha, beta)
    top = key >> _L1_SHIFT
    in_a = m & (top == prefix_a)
    in_b = m & (top == prefix_b) & (prefix_a != prefix_b)
    sel = in_a | in_b
    n_sel = tl.sum(sel.to(tl.int32))
    if n_sel > 0:
        digit = (key >> _L2_SHIFT) & _DIGIT_MASK
        bins = tl.arange(0, NUM_BINS)
        hist = tl.histogram(tl.where(in_a, digit, tl.where(in_b, digit + NUM_SUB, 0)), NUM_BINS)
        hist = hist - tl.where(bins == 0, BLOCK - n_sel, 0)
        row = ws_ptr + num_tensors * NUM_BINS + t * NUM_BINS
        tl.atomic_add(row + bins, hist, mask=hist > 0, sem="relaxed")
        base = tl.atomic_add(state + _S_CAND, n_sel, sem="relaxed")
        slot = base + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(cand_ptr + tl.load(trow + _T_START) + slot, key, mask=sel)


@triton.jit
def _candidate_kernel(cand_ptr, chunk_ptr, tensor_ptr, ws_ptr, num_chunks, num_tensors, state_base,
                      BLOCK: tl.constexpr, NUM_BINS: tl.constexpr, NUM_SUB: tl.constexpr):
    # Same chunk table as the data passes, over each tensor's candidate region; programs past the
    # tensor's candidate count do nothing.
    pid = tl.program_id(0)
    t = tl.load(chunk_ptr + pid).to(tl.int32)
    start = tl.load(chunk_ptr + num_chunks + pid)
    tstart = tl.load(tensor_ptr + t * _T_COLS + _T_START)
    state = ws_ptr + state_base + t * _S_COLS
    n_cand = tl.load(state + _S_CAND)
    if start - tstart < n_cand:
        offs = start + tl.arange(0, BLOCK)
        m = (offs - tstart) < n_cand
        key = tl.load(cand_ptr + offs, mask=m, other=0)
        prefix_a = tl.load(state + _S_PREFIX_A)
        prefix_b = tl.load(state + _S_PREFIX_B)
        top = key >> _L2_SHIFT
        in_a = m & (top == prefix_a)
        in_b = m & (top == prefix_b) & (prefix_a != prefix_b)
        n_sel = tl.sum((in_a | in_b).to(tl.int32))
        if n_sel > 0:
            digit = key & _DIGIT_MASK
            bins = tl.arange(0, NUM_BINS)
            hist = tl.histogram(tl.where(in_a, digit, tl.where(in_b, digit + NUM_SUB, 0)), NUM_BINS)
            hist = hist - tl.where(bins == 0, BLOCK - n_sel, 0)
            row = ws_ptr + 2 * num_tensors * NUM_BINS + t * NUM_BINS
            tl.atomic_add(row + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _mask_kernel(nat_ptr, adv_ptr, upd_ptr, chunk_ptr, tensor_ptr, thr_ptr, kept_ptr, alpha, beta, num_chunks,
                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # tl[0] g_nat, tl[1] g_adv (read), tl[2] updates (zeros stored where s < thr; nothing else written).
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
    tl.store(upd_ptr + offs, tl.zeros([BLOCK], dtype=upd_ptr.dtype.element_ty), mask=drop)
    kept = tl.sum((m & ~drop).to(tl.int32))
    tl.atomic_add(kept_ptr + out, kept.to(tl.int64), sem="relaxed")


# --- flat buffers ------------------------------------------------------------------------------
def flat_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 1-D view covering ``tensors`` in order, when they are contiguous and laid back to back in
    one storage (as views into one flat buffer are); None otherwise. Empty tensors are skipped. No copy.
    """
    first = None
    expected_ptr = 0
    total = 0
    for t in tensors:
        n = t.numel()
        if n == 0:
            continue
        if not t.is_contiguous():
            return None
        ptr = t.data_ptr()
        if first is None:
            first = t
        elif ptr != expected_ptr:
            return None
        expected_ptr = ptr + n * t.element_size()
        total += n
    if first is None:
        return None
    # Adjacent addresses alone could come from two allocations; the span must lie in first's storage.
    if (first.storage_offset() + total) * first.element_size() > first.untyped_storage().nbytes():
        return None
    return first.as_strided((total,), (1,))


def flatten_tensors(tensors: Sequence[Tensor]) -> tuple[Tensor, bool]:
    """``(flat, packed)``: the zero-copy :func:`flat_view` when it exists (``packed`` False), else a
    new contiguous buffer holding the tensors one after another (``packed`` True)."""
    view = flat_view(tensors)
    if view is not None:
        return view, False
    return torch.cat([t.reshape(-1) for t in tensors]), True


def scatter_back(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` into ``tensors`` (any strides), in place."""
    pieces = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(list(tensors), [p.view(t.shape) for p, t in zip(pieces, tensors)])


# --- host tables ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    """One dtype group of a call: its members' positions and its device tables."""

    members: tuple[int, ...]  # indices into the caller's lists, in order
    total: int  # elements in the group
    num_chunks: int
    aligned: bool  # every tensor's size (so every offset) is a multiple of _ALIGN elements
    chunks: Tensor  # int64[2 * num_chunks]: tensor index in the group, then flat start offset
    tensors: Tensor  # int64[T, 8]: start, end, rank k, rank k+1, output index, g < 0.5, n, (unused)
    fracs: Tensor  # float32[T, 2]: f32(g), f32(1 - g)


_plans: OrderedDict[tuple, tuple[_Group, ...]] = OrderedDict()


def _interpolation(n: int, p: float) -> tuple[int, int, float, float, bool]:
    """Ranks k, k+1 and the float32 weights of numpy's 'linear' quantile for n elements."""
    if n == 0:
        return 0, 0, 0.0, 1.0, True
    h = (n - 1) * p
    k = math.floor(h)
    g = h - k
    if k >= n - 1:
        k = k1 = n - 1
    else:
        k1 = k + 1
    return k, k1, float(np.float32(g)), float(np.float32(1.0 - g)), g < 0.5


def _build_group(members: list[int], sizes: list[int], p: float, device: torch.device) -> _Group:
    n = np.array([sizes[i] for i in members], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(n)[:-1])).astype(np.int64)
    table = np.zeros((len(members), 8), dtype=np.int64)
    fracs = np.zeros((len(members), 2), dtype=np.float32)
    chunk_tensor, chunk_start = [], []
    for j, i in enumerate(members):
        k, k1, g, one_minus_g, below_half = _interpolation(int(n[j]), p)
        table[j] = (starts[j], starts[j] + n[j], k, k1, i, below_half, n[j], 0)
        fracs[j] = (g, one_minus_g)
        count = -(-int(n[j]) // BLOCK)
        chunk_tensor.append(np.full(count, j, dtype=np.int64))
        chunk_start.append(starts[j] + BLOCK * np.arange(count, dtype=np.int64))
    chunks = np.concatenate(chunk_tensor + chunk_start)
    aligned = bool((n % _ALIGN.value == 0).all())
    return _Group(tuple(members), int(n.sum()), len(chunks) // 2, aligned,
                  torch.tensor(chunks, dtype=torch.int64, device=device),
                  torch.tensor(table, dtype=torch.int64, device=device),
                  torch.tensor(fracs, dtype=torch.float32, device=device))


def plan_groups(updates: Sequence[Tensor], p: float) -> tuple[_Group, ...]:
    """The dtype groups of a call and their device tables, cached per (device, p, dtypes, sizes)."""
    device = updates[0].device
    dtypes = tuple(u.dtype for u in updates)
    sizes = [u.numel() for u in updates]
    key = (device, p, dtypes, tuple(sizes))
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
        return plan
    for i, n in enumerate(sizes):
        if n >= _INT32_LIMIT:
            raise ValueError(f"updates[{i}] has {n} elements; the Triton backend counts ranks in int32 and "
                             f"supports tensors of fewer than 2**31 elements (use backend='cpu' or 'cuda')")
    groups = []
    for dtype in dict.fromkeys(dtypes):
        members = [i for i, d in enumerate(dtypes) if d == dtype]
        groups.append(_build_group(members, sizes, p, device))
    plan = tuple(groups)
    _plans[key] = plan
    if len(_plans) > _CACHE_SIZE:
        _plans.popitem(last=False)
    return plan


_plan = plan_groups  # the name the backend tests use


# --- launcher ----------------------------------------------------------------------------------
# No multiply-add contraction anywhere: the scores and the threshold must round like numpy/PyTorch.
_STREAM_OPTIONS = {"num_warps": STREAM_WARPS, "enable_fp_fusion": False}
_SELECT_OPTIONS = {"num_warps": SELECT_WARPS, "enable_fp_fusion": False}


def select_thresholds(group: _Group, nat: Tensor, adv: Tensor, alpha: float, beta: float, thresholds: Tensor,
                      nonfinite: Tensor) -> None:
    """Launches 1-6: the exact p-quantile of each tensor of ``group`` into ``thresholds[out]`` and its
    non-finite score count into ``nonfinite[out]``. ``nat``/``adv`` are the group's flat gradients
    (:func:`flatten_tensors`). The final pass over the data is the caller's: :func:`_mask_kernel`
    here, the fused SGD kernel in ``triton_sgd_step``.
    """
    device = thresholds.device
    num_tensors = len(group.members)
    state_base = _DIGIT_LEVELS * num_tensors * BINS
    # Three histogram levels [3, T, BINS] then the per-tensor state [T, 8]; zeroed by the allocation.
    ws = torch.zeros(state_base + num_tensors * 8, dtype=torch.int32, device=device)
    nc = group.num_chunks

    def select(level: int) -> None:
        _select_kernel[(triton.cdiv(num_tensors, SELECT_TILE),)](
            group.tensors, group.fracs, ws, thresholds, nonfinite, num_tensors, state_base, LEVEL=level,
            TILE=SELECT_TILE, NUM_BINS=BINS, ROW_BINS=BINS if level == 1 else SUB_BINS, **_SELECT_OPTIONS)

    if nc == 0:  # every tensor of the group is empty: only the outputs (NaN threshold, no non-finite)
        select(3)
        return
    cand = torch.empty(group.total, dtype=torch.int32, device=device)
    chunks, tensors, aligned = group.chunks, group.tensors, group.aligned
    _histogram_kernel[(nc,)](nat, adv, chunks, tensors, ws, alpha, beta, nc, BLOCK=BLOCK, NUM_BINS=BINS,
                             ALIGNED=aligned, **_STREAM_OPTIONS)
    select(1)
    _refine_kernel[(nc,)](nat, adv, chunks, tensors, ws, cand, alpha, beta, nc, num_tensors, state_base,
                          BLOCK=BLOCK, NUM_BINS=BINS, NUM_SUB=SUB_BINS, ALIGNED=aligned, **_STREAM_OPTIONS)
    select(2)
    _candidate_kernel[(nc,)](cand, chunks, tensors, ws, nc, num_tensors, state_base, BLOCK=BLOCK,
                             NUM_BINS=BINS, NUM_SUB=SUB_BINS, **_STREAM_OPTIONS)
    select(3)


def _mask_group(group: _Group, updates: list[Tensor], grads_nat: list[Tensor], grads_adv: list[Tensor],
                alpha: float, beta: float, thresholds: Tensor, kept: Tensor, nonfinite: Tensor) -> None:
    nc = group.num_chunks
    if nc == 0:
        select_thresholds(group, updates[0], updates[0], alpha, beta, thresholds, nonfinite)
        return
    nat, _ = flatten_tensors(grads_nat)
    adv, _ = flatten_tensors(grads_adv)
    upd, packed = flatten_tensors(updates)
    select_thresholds(group, nat, adv, alpha, beta, thresholds, nonfinite)
    _mask_kernel[(nc,)](nat, adv, upd, group.chunks, group.tensors, thresholds, kept, alpha, beta, nc,
                        BLOCK=BLOCK, ALIGNED=group.aligned, **_STREAM_OPTIONS)
    if packed:
        scatter_back(upd, updates)


def rgp_mask_triton(updates: list[Tensor], grads_nat: list[Tensor], grads_adv: list[Tensor], alpha: float,
                    p: float) -> tuple[Tensor, Tensor, Tensor]:
    """Zero, in place, the entries of each ``updates[i]`` whose score is below its p-quantile (SPEC 2).

    Arguments are checked by :func:`cure_kernels.rgp_mask_` before this is called. Returns
    ``(thresholds float32[T], kept int64[T], nonfinite int64[T])`` on the tensors' device, bit for bit
    equal to :func:`cure_kernels.reference.rgp_mask_reference`, without a host synchronisation.
    """
    num = len(updates)
    device = updates[0].device if num else torch.device("cpu")
    thresholds = torch.empty(num, dtype=torch.float32, device=device)
    kept = torch.zeros(num, dtype=torch.int64, device=device)
    nonfinite = torch.empty(num, dtype=torch.int64, device=device)
    if num == 0:
        return thresholds, kept, nonfinite
    # alpha and 1 - alpha (in double, as Python computes it) rounded to float32 once, on the host.
    alpha32 = float(np.float32(alpha))
    beta32 = float(np.float32(1.0 - alpha))
    for group in plan_groups(updates, float(p)):
        idx = group.members
        _mask_group(group, [updates[i] for i in idx], [grads_nat[i] for i in idx],
                    [grads_adv[i] for i in idx], alpha32, beta32, thresholds, kept, nonfinite)
    return thresholds, kept, nonfinite
