"""Triton backend of the conserve step: exact per-tensor p-quantile masking over a list of tensors.

For every tensor i with n elements (docs/method.md, paper Eq. 6)::

    s   = f32(alpha)*|g_nat| + f32(1 - alpha)*|g_adv|          (float32, no fused multiply-add)
    h   = (n - 1)*p (float64),  k = floor(h),  g = h - k
    a   = v[k],  b = v[k + 1]   (v = sorted s; a = b = v[n - 1] when k >= n - 1)
    d   = f32(b - a)
    thr = f32(a + d*f32(g)) if g < 0.5 else f32(b - d*f32(1 - g));  thr = NaN if any s is NaN
    update[s < thr] = 0

Keys. Scores are >= 0 (never -0.0) or NaN, so their float32 bits read as integers are ordered like
the values (+inf = 0x7f800000 above every finite score); NaN is given the key 0x7fffffff. A NaN
anywhere makes the threshold NaN, so where NaN keys sort does not matter.

Selection, per dtype group (all launches cover every tensor of the group; no host synchronisation):

*Sampling bracket* (tensors of at least ``BRACKET_MIN`` elements):

1. ``_sample_kernel`` (one program per tensor): the keys of ``SAMPLE_TILES`` tiles of
   ``SAMPLE_TILE`` contiguous elements spread evenly over the tensor (m = 16384 by default), and the
   sample's order statistics at ranks r_lo, r_hi (about p -/+ 5 sigma, computed on the host): the
   bracket keys lo <= hi. Reads 0.25 B/element of a large tensor.
2. ``_bracket_kernel`` (pass 1 over the data): per tensor, counts keys < lo, == lo, == hi, NaN and
   +inf, and compacts the keys in (lo, hi) into a candidate buffer of fixed capacity (n/8). Keys equal
   to lo or hi are counted, not stored: runs of equal scores at either end (exact zeros, two-valued
   data, +inf) cost no candidate space. Reads g_nat, g_adv: 8 B/element, writes 4 B per candidate
   (about 3-4 % of the elements).
3. ``_resolve_kernel`` (one program per tensor): when ranks k and k+1 fall inside the bracket (the
   counts say so exactly), v[k] and v[k+1] are selected exactly among the candidates (a 256-bin
   radix select that skips the key bits every candidate shares), and the threshold is written. A
   tensor whose ranks fall outside, or whose candidates overflowed, is flagged for the radix path.

*Radix path* (tensors below ``BRACKET_MIN`` elements, and bracket misses; programs of other tensors
exit at once): the digits of the key from the top, widths ``RADIX_DIGITS`` (see there).

4. ``_histogram_kernel`` (pass over the data, 8 B/element): histogram of the first digit.
5. ``_select_kernel``: per tensor, the bins of ranks k and k+1 and the ranks inside them.
6. ``_refine_kernel`` (pass over the data, 8 B/element): histogram of the second digit of the
   elements in those bins, whose keys are compacted into a candidate buffer.
7. ``_candidate_kernel`` + ``_select_kernel`` per remaining digit, over the candidates only; the last
   select writes the threshold.

The caller's final pass (``_mask_kernel`` here, the fused SGD kernel in ``triton_sgd_step``) then
reads g_nat, g_adv once more. With every large tensor hitting its bracket the mask costs 8 (bracket)
+ 8 (mask pass) B/element plus 4 B per masked entry: 16 B/element before the zeros are stored. A
mask pass of a tensor whose threshold is 0 or NaN reads nothing (nothing can be below it).

Launches per dtype group: one memset (histograms and per-tensor state), 3 for the bracket (only when
the group has a tensor above the cutoff), 6 (11/10/10-bit digits) or 8 (8-bit digits) for the radix
path, and the mask pass: 11 or 13, none of them synchronising with the host.

Streaming passes map program i to one BLOCK-aligned block of the flat buffer intersected with one
tensor (a chunk): chunks strictly inside a tensor are full and take an unmasked path whose offsets
are multiples of BLOCK, so their loads vectorise whatever the other tensors' sizes; only a tensor's
first and last chunks are masked. The per-tensor tables (sizes, offsets, ranks, interpolation
weights, sample ranks) are known on the host from the shapes, built once per list layout and cached
on the device.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "rgp_mask_triton",
    "rgp_select_triton",
    "plan_groups",
    "select_thresholds",
    "score_keys",
    "flat_view",
    "flatten_tensors",
    "scatter_back",
    "load_float32",
    "chunk_bounds",
    "RADIX_DIGITS",
    "last_bracket_misses",
]

# Elements per program in the streaming passes. 4096 float32 elements (2 x 16 KiB of gradients) per
# program with 8 warps gives 16 elements per thread: enough bytes in flight per SM to stream at full
# bandwidth. Not tuned on a GPU yet; bench/ is where to tune it.
BLOCK = 4096
STREAM_WARPS = 8
SELECT_TILE = 4  # tensors per program of _select_kernel
SELECT_WARPS = 8
_CACHE_SIZE = 32  # cached per-layout tables (a training loop uses one or two layouts)


def _radix_digits(version: str) -> tuple[int, ...]:
    """Digit widths (from the top) of the 31-bit key for the radix path: the one place this is chosen.

    Before Triton 3.7, ``tl.histogram`` is lowered to warp ballots plus one popcount per bin and lane
    (about bins/32 per element: 64 for 2048 bins), which is compute-bound; from 3.7 on it uses
    shared-memory atomics and costs the same for 256 or 2048 bins. So: 8-bit digits (256 bins, four
    levels) below 3.7, three levels of 11/10/10 bits from 3.7. Both are exact; the radix path is only
    the fallback of the sampling bracket and the path of tensors below ``BRACKET_MIN`` elements.
    """
    major, minor = (int(x) for x in version.split(".")[:2])
    return (8, 8, 8, 7) if (major, minor) < (3, 7) else (11, 10, 10)


RADIX_DIGITS = _radix_digits(triton.__version__)

# Sampling bracket (see the module docstring). A tensor below BRACKET_MIN elements takes the radix path.
BRACKET_MIN = 65536
SAMPLE_TILE = 256
SAMPLE_TILES = 64  # m = 16384 sampled scores per tensor
BRACKET_SIGMAS = 5.0
CAND_FRACTION = 8  # candidate capacity: n/8 keys per tensor (expected use: 3-4 % of n)
RESOLVE_WARPS = 8

# Constants used inside the kernels.
_NAN_KEY = tl.constexpr(0x7FFFFFFF)
_INF_KEY = tl.constexpr(0x7F800000)
_QNAN_BITS = tl.constexpr(0x7FC00000)
_BIG = tl.constexpr(0x7FFFFFFF)

# Per-tensor table (int64, built on the host), one row of _T_COLS per tensor of a group.
_T_START = tl.constexpr(0)  # flat offset of the tensor's first element
_T_END = tl.constexpr(1)  # flat offset one past its last element
_T_RANK_K = tl.constexpr(2)  # k = floor((n - 1) * p), clamped to n - 1
_T_RANK_K1 = tl.constexpr(3)  # k + 1, clamped to n - 1
_T_OUT = tl.constexpr(4)  # the tensor's index in the caller's list (row of the outputs)
_T_G_BELOW_HALF = tl.constexpr(5)  # 1 when g < 0.5: interpolate from a, else from b
_T_N = tl.constexpr(6)  # number of elements
_T_BRACKET = tl.constexpr(7)  # 1 when the tensor is selected through the sampling bracket
_T_R_LO = tl.constexpr(8)  # sample rank of lo (-1: lo = key 0, open below)
_T_R_HI = tl.constexpr(9)  # sample rank of hi (m: hi = +inf, open above)
_T_CAND = tl.constexpr(10)  # offset of the tensor's region in the bracket candidate buffer
_T_CAP = tl.constexpr(11)  # its capacity
_T_COLS = tl.constexpr(12)
# Per-tensor state (int32, zeroed each call), one row of _S_COLS per tensor of a group.
_S_CAND = tl.constexpr(0)  # radix path: candidates compacted by the refine pass
_S_PREFIX_A = tl.constexpr(1)  # radix path: key bits resolved so far of rank k (the full key at the end)
_S_PREFIX_B = tl.constexpr(2)  # same for rank k + 1
_S_RANK_A = tl.constexpr(3)  # rank of rank-k's element among the elements sharing prefix A
_S_RANK_B = tl.constexpr(4)  # same for rank k + 1
_S_MISS = tl.constexpr(5)  # bracketed tensor whose bracket missed: it takes the radix path
_S_LO = tl.constexpr(6)  # bracket keys
_S_HI = tl.constexpr(7)
_S_LT = tl.constexpr(8)  # keys < lo
_S_EQ = tl.constexpr(9)  # keys == lo
_S_MID = tl.constexpr(10)  # keys in (lo, hi), compacted (the count may exceed the capacity: overflow)
_S_NAN = tl.constexpr(11)  # NaN scores
_S_INF = tl.constexpr(12)  # +inf scores
_S_EQ_HI = tl.constexpr(13)  # keys == hi (when hi != lo)
_S_COLS = tl.constexpr(16)

_INT32_LIMIT = 2**31


# --- device helpers ----------------------------------------------------------------------------
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
def score_keys(nat_ptr, adv_ptr, offs, m, alpha, beta, FULL: tl.constexpr = False):
    """s = alpha*|g_nat| + beta*|g_adv| in float32 (each op rounded; launched without FMA contraction)
    and its radix key: the float bits as int32, NaN -> 0x7fffffff. FULL: every lane is in bounds,
    the loads are unmasked (and vectorise when ``offs`` is known to be aligned)."""
    # load_float32 written out: each nested jit call costs about a millisecond per program in the
    # interpreter, and this runs in every program of every pass.
    if FULL:
        x = tl.load(nat_ptr + offs)
        y = tl.load(adv_ptr + offs)
    else:
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
def chunk_bounds(chunk_ptr, tensor_ptr, num_chunks, BLOCK: tl.constexpr):
    """Program i's chunk: tensor index t, its table row, the BLOCK-aligned offsets, the bounds mask
    and whether the chunk is full (no lane out of bounds: the unmasked path)."""
    pid = tl.program_id(0)
    t = tl.load(chunk_ptr + pid).to(tl.int32)
    block = tl.load(chunk_ptr + num_chunks + pid)
    trow = tensor_ptr + t * _T_COLS
    tstart = tl.load(trow + _T_START)
    tend = tl.load(trow + _T_END)
    base = block * BLOCK
    offs = base + tl.arange(0, BLOCK)
    m = (offs >= tstart) & (offs < tend)
    full = (tstart <= base) & (base + BLOCK <= tend)
    return t, trow, offs, m, full


@triton.jit
def _threshold(a_key, b_key, frac_g, frac_1g, below_half):
    """numpy's linear interpolation between the order statistics with keys a_key <= b_key, each
    operation rounded to float32 (no FMA): inf - inf and inf * 0 give NaN as in numpy."""
    a = a_key.to(tl.float32, bitcast=True)
    b = b_key.to(tl.float32, bitcast=True)
    d = b - a
    dg = d * frac_g
    from_a = a + dg
    dg1 = d * frac_1g
    from_b = b - dg1
    return tl.where(below_half != 0, from_a, from_b)


@triton.jit
def _block_rank_select(key, valid, rank):
    """The key of rank ``rank`` (0-based) among the ``valid`` lanes of ``key`` (a 1-D block of 31-bit
    keys): four 256-bin radix levels of 8, 8, 8 and 7 bits."""
    bins = tl.arange(0, 256)
    prefix = rank * 0
    r = rank
    for level in tl.static_range(4):
        shift = 23 - 8 * level if level < 3 else 0
        width = 8 if level < 3 else 7
        inb = valid & ((key >> (shift + width)) == prefix)
        digit = (key >> shift) & ((1 << width) - 1)
        hist = tl.histogram(tl.where(inb, digit, 0), 256)
        hist = hist - tl.where(bins == 0, tl.sum((~inb).to(tl.int32)), 0)
        d = tl.sum((tl.cumsum(hist, 0) <= r).to(tl.int32))
        d = tl.minimum(d, (1 << width) - 1)
        r = r - tl.sum(tl.where(bins < d, hist, 0))
        prefix = (prefix << width) | d
    return prefix


@triton.jit
def _candidate_rank_select(cand_ptr, n_cand, rank, lo, hi, BLOCK: tl.constexpr):
    """The key of rank ``rank`` among the ``n_cand`` keys at ``cand_ptr``, all in (lo, hi]: 256-bin
    radix levels looping over the candidates; a level whose digit every key in (lo, hi] shares costs
    nothing."""
    bins = tl.arange(0, 256)
    prefix = rank * 0
    r = rank
    first = lo + 1
    for level in tl.static_range(4):
        shift = 23 - 8 * level if level < 3 else 0
        width = 8 if level < 3 else 7
        if (first >> shift) == (hi >> shift):
            prefix = hi >> shift
        else:
            hist = tl.zeros([256], dtype=tl.int32)
            for start in range(0, n_cand, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < n_cand
                key = tl.load(cand_ptr + offs, mask=valid, other=0)
                inb = valid & ((key >> (shift + width)) == prefix)
                digit = (key >> shift) & ((1 << width) - 1)
                h = tl.histogram(tl.where(inb, digit, 0), 256)
                hist += h - tl.where(bins == 0, tl.sum((~inb).to(tl.int32)), 0)
            d = tl.sum((tl.cumsum(hist, 0) <= r).to(tl.int32))
            d = tl.minimum(d, (1 << width) - 1)
            r = r - tl.sum(tl.where(bins < d, hist, 0))
            prefix = (prefix << width) | d
    return prefix


# --- sampling bracket kernels ---------------------------------------------------------------------
@triton.jit
def _sample_kernel(nat_ptr, adv_ptr, tensor_ptr, state_ptr, alpha, beta, TILE: tl.constexpr,
                   TILES: tl.constexpr):
    # Program t: tensor t's bracket keys lo, hi from a sample of TILES tiles of TILE elements.
    t = tl.program_id(0)
    trow = tensor_ptr + t * _T_COLS
    if tl.load(trow + _T_BRACKET) != 0:
        n = tl.load(trow + _T_N)
        tstart = tl.load(trow + _T_START)
        j = tl.arange(0, TILE * TILES)
        tile = j // TILE
        tile_start = (tile.to(tl.int64) * n // TILES) // TILE * TILE
        offs = tstart + tile_start + (j % TILE)
        valid = offs < tstart + n  # always true (n >= TILES * TILE); keeps the loads in bounds regardless
        s, key = score_keys(nat_ptr, adv_ptr, offs, valid, alpha, beta)
        r_lo = tl.load(trow + _T_R_LO).to(tl.int32)
        r_hi = tl.load(trow + _T_R_HI).to(tl.int32)
        lo = _block_rank_select(key, valid, tl.maximum(r_lo, 0))
        hi = _block_rank_select(key, valid, tl.minimum(r_hi, TILE * TILES - 1))
        lo = tl.where(r_lo < 0, 0, lo)
        hi = tl.where(r_hi >= TILE * TILES, _INF_KEY, hi)
        state = state_ptr + t * _S_COLS
        tl.store(state + _S_LO, lo)
        tl.store(state + _S_HI, hi)


@triton.jit
def _bracket_body(nat_ptr, adv_ptr, cand_ptr, trow, state, offs, m, alpha, beta, FULL: tl.constexpr):
    s, key = score_keys(nat_ptr, adv_ptr, offs, m, alpha, beta, FULL)
    lo = tl.load(state + _S_LO)
    hi = tl.load(state + _S_HI)
    n_lt = tl.sum((m & (key < lo)).to(tl.int32))
    n_eq = tl.sum((m & (key == lo)).to(tl.int32))
    n_hi = tl.sum((m & (key == hi) & (hi != lo)).to(tl.int32))
    n_nan = tl.sum((m & (key == _NAN_KEY)).to(tl.int32))
    n_inf = tl.sum((m & (key == _INF_KEY)).to(tl.int32))
    mid = m & (key > lo) & (key < hi)
    n_mid = tl.sum(mid.to(tl.int32))
    if n_lt > 0:
        tl.atomic_add(state + _S_LT, n_lt, sem="relaxed")
    if n_eq > 0:
        tl.atomic_add(state + _S_EQ, n_eq, sem="relaxed")
    if n_hi > 0:
        tl.atomic_add(state + _S_EQ_HI, n_hi, sem="relaxed")
    if n_nan > 0:
        tl.atomic_add(state + _S_NAN, n_nan, sem="relaxed")
    if n_inf > 0:
        tl.atomic_add(state + _S_INF, n_inf, sem="relaxed")
    if n_mid > 0:
        base = tl.atomic_add(state + _S_MID, n_mid, sem="relaxed")
        slot = base + tl.cumsum(mid.to(tl.int32), 0) - 1
        cap = tl.load(trow + _T_CAP).to(tl.int32)
        tl.store(cand_ptr + tl.load(trow + _T_CAND) + slot, key, mask=mid & (slot < cap))


@triton.jit
def _bracket_kernel(nat_ptr, adv_ptr, chunk_ptr, tensor_ptr, state_ptr, cand_ptr, alpha, beta, num_chunks,
                    BLOCK: tl.constexpr):
    # One pass over the bracketed tensors: counts below/at lo, NaN, +inf; keys in (lo, hi] compacted.
    t, trow, offs, m, full = chunk_bounds(chunk_ptr, tensor_ptr, num_chunks, BLOCK)
    if tl.load(trow + _T_BRACKET) != 0:
        state = state_ptr + t * _S_COLS
        if full:
            _bracket_body(nat_ptr, adv_ptr, cand_ptr, trow, state, offs, m, alpha, beta, True)
        else:
            _bracket_body(nat_ptr, adv_ptr, cand_ptr, trow, state, offs, m, alpha, beta, False)


@triton.jit
def _resolve_kernel(tensor_ptr, frac_ptr, state_ptr, cand_ptr, thr_ptr, nonfinite_ptr, BLOCK: tl.constexpr):
    # Program t: v[k], v[k+1] of a bracketed tensor from the counts and candidates, or the miss flag.
    t = tl.program_id(0)
    trow = tensor_ptr + t * _T_COLS
    if tl.load(trow + _T_BRACKET) != 0:
        state = state_ptr + t * _S_COLS
        k = tl.load(trow + _T_RANK_K).to(tl.int32)
        k1 = tl.load(trow + _T_RANK_K1).to(tl.int32)
        lo = tl.load(state + _S_LO)
        hi = tl.load(state + _S_HI)
        c_lt = tl.load(state + _S_LT)
        c_eq = tl.load(state + _S_EQ)
        c_mid = tl.load(state + _S_MID)
        c_hi = tl.load(state + _S_EQ_HI)
        n_nan = tl.load(state + _S_NAN)
        n_inf = tl.load(state + _S_INF)
        cap = tl.load(trow + _T_CAP).to(tl.int32)
        cands = cand_ptr + tl.load(trow + _T_CAND)
        below = c_lt + c_eq  # ranks < below: keys < lo or == lo
        top = below + c_mid  # ranks in [below, top): the candidates; [top, top + c_hi): keys == hi
        overflow = c_mid > cap
        miss = (k < c_lt) | (k1 >= top + c_hi) | (overflow & (k1 >= below) & (k < top))
        miss = miss & (n_nan == 0)  # a NaN anywhere: the threshold is NaN, nothing to select
        a = lo
        b = lo
        if (n_nan == 0) & (miss == 0):
            if k >= top:
                a = hi
            elif k >= below:
                a = _candidate_rank_select(cands, c_mid, k - below, lo, hi - 1, BLOCK)
            b = a
            if k1 >= top:
                b = hi
            elif k1 >= below:  # v[k1] is the smallest candidate above a unless a's run reaches rank k1
                n_le = c_mid * 0
                smallest = c_mid * 0 + _BIG
                for start in range(0, c_mid, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    valid = offs < c_mid
                    key = tl.load(cands + offs, mask=valid, other=_BIG)
                    n_le += tl.sum((valid & (key <= a)).to(tl.int32))
                    smallest = tl.minimum(smallest, tl.min(tl.where(valid & (key > a), key, _BIG)))
                if k1 - below >= n_le:
                    b = smallest
        tl.store(state + _S_MISS, miss.to(tl.int32))
        if miss == 0:
            thr = _threshold(a, b, tl.load(frac_ptr + 2 * t), tl.load(frac_ptr + 2 * t + 1),
                             tl.load(trow + _T_G_BELOW_HALF))
            thr = tl.where(n_nan > 0, tl.full([], _QNAN_BITS, tl.int32).to(tl.float32, bitcast=True), thr)
            out = tl.load(trow + _T_OUT)
            tl.store(thr_ptr + out, thr)
            tl.store(nonfinite_ptr + out, (n_nan + n_inf).to(tl.int64))


# --- radix path kernels ---------------------------------------------------------------------------
@triton.jit
def _radix_active(trow, state):
    """A tensor takes the radix path when it is not bracketed or its bracket missed."""
    return (tl.load(trow + _T_BRACKET) == 0) | (tl.load(state + _S_MISS) != 0)


@triton.jit
def _histogram_body(nat_ptr, adv_ptr, ws_ptr, trow, state, t, offs, m, alpha, beta, ROW: tl.constexpr,
                    SHIFT: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    s, key = score_keys(nat_ptr, adv_ptr, offs, m, alpha, beta, FULL)
    bins = tl.arange(0, NB)
    # Out-of-bounds lanes are counted in bin 0 by tl.histogram, then taken out again.
    hist = tl.histogram(tl.where(m, key >> SHIFT, 0), NB)
    hist = hist - tl.where(bins == 0, BLOCK - tl.sum(m.to(tl.int32)), 0)
    tl.atomic_add(ws_ptr + t * ROW + bins, hist, mask=hist > 0, sem="relaxed")
    if tl.load(trow + _T_BRACKET) == 0:  # a bracketed tensor's non-finite counts come from its bracket pass
        n_nan = tl.sum((m & (key == _NAN_KEY)).to(tl.int32))
        n_inf = tl.sum((m & (key == _INF_KEY)).to(tl.int32))
        if n_nan > 0:
            tl.atomic_add(state + _S_NAN, n_nan, sem="relaxed")
        if n_inf > 0:
            tl.atomic_add(state + _S_INF, n_inf, sem="relaxed")


@triton.jit
def _histogram_kernel(nat_ptr, adv_ptr, chunk_ptr, tensor_ptr, ws_ptr, state_ptr, alpha, beta, num_chunks,
                      BLOCK: tl.constexpr, ROW: tl.constexpr, SHIFT: tl.constexpr, NB: tl.constexpr):
    # Level-1 histograms [T, ROW] at ws_ptr (the first NB bins of each row).
    t, trow, offs, m, full = chunk_bounds(chunk_ptr, tensor_ptr, num_chunks, BLOCK)
    state = state_ptr + t * _S_COLS
    if _radix_active(trow, state):
        if full:
            _histogram_body(nat_ptr, adv_ptr, ws_ptr, trow, state, t, offs, m, alpha, beta, ROW, SHIFT, NB,
                            BLOCK, True)
        else:
            _histogram_body(nat_ptr, adv_ptr, ws_ptr, trow, state, t, offs, m, alpha, beta, ROW, SHIFT, NB,
                            BLOCK, False)


@triton.jit
def _select_kernel(tensor_ptr, frac_ptr, ws_ptr, state_ptr, thr_ptr, nonfinite_ptr, num_tensors,
                   LEVEL: tl.constexpr, TILE: tl.constexpr, ROW: tl.constexpr, NB: tl.constexpr,
                   WIDTH: tl.constexpr, LAST: tl.constexpr):
    # Program i handles tensors [i*TILE, (i+1)*TILE): for each, the bins holding ranks k and k+1 at digit
    # level LEVEL (NB = 2**WIDTH bins), and their ranks inside those bins. Level 1 reads the first NB bins
    # of its row. Later levels read a row whose first NB bins count the keys sharing rank k's prefix and
    # whose next NB bins those sharing rank k+1's (left empty when both share one prefix; both then use
    # the first). The last level has the full keys and writes the threshold and non-finite count.
    t = tl.program_id(0) * TILE + tl.arange(0, TILE)
    valid = t < num_tensors
    trow = tensor_ptr + t * _T_COLS
    state = state_ptr + t * _S_COLS
    valid = valid & (tl.load(trow + _T_BRACKET, mask=valid, other=0) == 0) | (
        valid & (tl.load(state + _S_MISS, mask=valid, other=0) != 0))
    bins = tl.arange(0, NB)
    row = ws_ptr + (LEVEL - 1) * num_tensors * ROW + t * ROW
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
        upper = tl.load(row[:, None] + NB + bins[None, :], mask=valid2, other=0)
        hist_b = tl.where((prefix_a == prefix_b)[:, None], hist_a, upper)
    # digit = number of bins whose inclusive prefix count is <= rank; clamped for an empty tensor,
    # whose digits are never used.
    digit_a = tl.sum((tl.cumsum(hist_a, 1) <= rank_a[:, None]).to(tl.int32), 1)
    digit_b = tl.sum((tl.cumsum(hist_b, 1) <= rank_b[:, None]).to(tl.int32), 1)
    digit_a = tl.minimum(digit_a, NB - 1)
    digit_b = tl.minimum(digit_b, NB - 1)
    rank_a = rank_a - tl.sum(tl.where(bins[None, :] < digit_a[:, None], hist_a, 0), 1)
    rank_b = rank_b - tl.sum(tl.where(bins[None, :] < digit_b[:, None], hist_b, 0), 1)
    if LEVEL == 1:
        prefix_a = digit_a
        prefix_b = digit_b
    else:
        prefix_a = (prefix_a << WIDTH) | digit_a
        prefix_b = (prefix_b << WIDTH) | digit_b
    tl.store(state + _S_PREFIX_A, prefix_a, mask=valid)
    tl.store(state + _S_PREFIX_B, prefix_b, mask=valid)
    tl.store(state + _S_RANK_A, rank_a, mask=valid)
    tl.store(state + _S_RANK_B, rank_b, mask=valid)
    if LAST:
        # prefix_a, prefix_b are now the full keys of ranks k and k+1.
        thr = _threshold(prefix_a, prefix_b, tl.load(frac_ptr + 2 * t, mask=valid, other=0.0),
                         tl.load(frac_ptr + 2 * t + 1, mask=valid, other=0.0),
                         tl.load(trow + _T_G_BELOW_HALF, mask=valid, other=0))
        n_nan = tl.load(state + _S_NAN, mask=valid, other=0)
        n_inf = tl.load(state + _S_INF, mask=valid, other=0)
        qnan = tl.full([TILE], _QNAN_BITS, tl.int32).to(tl.float32, bitcast=True)
        thr = tl.where((n_nan > 0) | (tl.load(trow + _T_N, mask=valid, other=0) == 0), qnan, thr)
        out = tl.load(trow + _T_OUT, mask=valid, other=0)
        tl.store(thr_ptr + out, thr, mask=valid)
        tl.store(nonfinite_ptr + out, (n_nan + n_inf).to(tl.int64), mask=valid)


@triton.jit
def _sub_histograms(ws_row, key, in_a, in_b, split, SHIFT: tl.constexpr, NB: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Histograms of the digit at SHIFT (NB bins) of the keys in_a into ws_row[0:NB] and of those in_b
    into ws_row[NB:2*NB]; the second only when the two prefixes differ (``split``)."""
    digit = (key >> SHIFT) & (NB - 1)
    bins = tl.arange(0, NB)
    n_a = tl.sum(in_a.to(tl.int32))
    if n_a > 0:
        hist = tl.histogram(tl.where(in_a, digit, 0), NB)
        hist = hist - tl.where(bins == 0, BLOCK - n_a, 0)
        tl.atomic_add(ws_row + bins, hist, mask=hist > 0, sem="relaxed")
    if split:
        n_b = tl.sum(in_b.to(tl.int32))
        if n_b > 0:
            hist = tl.histogram(tl.where(in_b, digit, 0), NB)
            hist = hist - tl.where(bins == 0, BLOCK - n_b, 0)
            tl.atomic_add(ws_row + NB + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _refine_body(nat_ptr, adv_ptr, ws_ptr, cand_ptr, trow, state, t, offs, m, alpha, beta, num_tensors,
                 ROW: tl.constexpr, PREV_SHIFT: tl.constexpr, SHIFT: tl.constexpr, NB: tl.constexpr,
                 BLOCK: tl.constexpr, FULL: tl.constexpr):
    prefix_a = tl.load(state + _S_PREFIX_A)
    prefix_b = tl.load(state + _S_PREFIX_B)
    s, key = score_keys(nat_ptr, adv_ptr, offs, m, alpha, beta, FULL)
    top = key >> PREV_SHIFT
    split = prefix_a != prefix_b
    in_a = m & (top == prefix_a)
    in_b = m & (top == prefix_b) & split
    sel = in_a | in_b
    n_sel = tl.sum(sel.to(tl.int32))
    if n_sel > 0:
        _sub_histograms(ws_ptr + num_tensors * ROW + t * ROW, key, in_a, in_b, split, SHIFT, NB, BLOCK)
        base = tl.atomic_add(state + _S_CAND, n_sel, sem="relaxed")
        slot = base + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(cand_ptr + tl.load(trow + _T_START) + slot, key, mask=sel)


@triton.jit
def _refine_kernel(nat_ptr, adv_ptr, chunk_ptr, tensor_ptr, ws_ptr, state_ptr, cand_ptr, alpha, beta, num_chunks,
                   num_tensors, BLOCK: tl.constexpr, ROW: tl.constexpr, PREV_SHIFT: tl.constexpr,
                   SHIFT: tl.constexpr, NB: tl.constexpr):
    # Level 2 over the data: elements in the level-1 bins of ranks k, k+1 are histogrammed and their keys
    # compacted to cand[start_t : start_t + n_t].
    t, trow, offs, m, full = chunk_bounds(chunk_ptr, tensor_ptr, num_chunks, BLOCK)
    state = state_ptr + t * _S_COLS
    if _radix_active(trow, state):
        if full:
            _refine_body(nat_ptr, adv_ptr, ws_ptr, cand_ptr, trow, state, t, offs, m, alpha, beta, num_tensors,
                         ROW, PREV_SHIFT, SHIFT, NB, BLOCK, True)
        else:
            _refine_body(nat_ptr, adv_ptr, ws_ptr, cand_ptr, trow, state, t, offs, m, alpha, beta, num_tensors,
                         ROW, PREV_SHIFT, SHIFT, NB, BLOCK, False)


@triton.jit
def _candidate_kernel(cand_ptr, chunk_ptr, tensor_ptr, ws_ptr, state_ptr, num_chunks, num_tensors,
                      LEVEL: tl.constexpr, BLOCK: tl.constexpr, ROW: tl.constexpr, PREV_SHIFT: tl.constexpr,
                      SHIFT: tl.constexpr, NB: tl.constexpr):
    # Levels >= 3, over each tensor's candidate region (the same chunks as the data passes); chunks past the
    # tensor's candidate count do nothing.
    t, trow, offs, m, full = chunk_bounds(chunk_ptr, tensor_ptr, num_chunks, BLOCK)
    state = state_ptr + t * _S_COLS
    if _radix_active(trow, state):
        tstart = tl.load(trow + _T_START)
        n_cand = tl.load(state + _S_CAND)
        m = m & ((offs - tstart) < n_cand)
        if tl.sum(m.to(tl.int32)) > 0:
            key = tl.load(cand_ptr + offs, mask=m, other=0)
            prefix_a = tl.load(state + _S_PREFIX_A)
            prefix_b = tl.load(state + _S_PREFIX_B)
            top = key >> PREV_SHIFT
            split = prefix_a != prefix_b
            in_a = m & (top == prefix_a)
            in_b = m & (top == prefix_b) & split
            row = ws_ptr + (LEVEL - 1) * num_tensors * ROW + t * ROW
            _sub_histograms(row, key, in_a, in_b, split, SHIFT, NB, BLOCK)


# --- the mask pass --------------------------------------------------------------------------------
@triton.jit
def _mask_body(nat_ptr, adv_ptr, upd_ptr, offs, m, thr, alpha, beta, FULL: tl.constexpr):
    s, key = score_keys(nat_ptr, adv_ptr, offs, m, alpha, beta, FULL)
    drop = m & (s < thr)
    tl.store(upd_ptr + offs, tl.zeros_like(s).to(upd_ptr.dtype.element_ty), mask=drop)
    return tl.sum(drop.to(tl.int32))


@triton.jit
def _mask_kernel(nat_ptr, adv_ptr, upd_ptr, chunk_ptr, tensor_ptr, thr_ptr, kept_ptr, alpha, beta, num_chunks,
                 BLOCK: tl.constexpr):
    # tl[0] g_nat, tl[1] g_adv (read), tl[2] updates (zeros stored where s < thr; nothing else written).
    # A threshold <= 0 or NaN masks nothing: the scores are not read at all.
    t, trow, offs, m, full = chunk_bounds(chunk_ptr, tensor_ptr, num_chunks, BLOCK)
    out = tl.load(trow + _T_OUT)
    thr = tl.load(thr_ptr + out)
    n_in = tl.sum(m.to(tl.int32))
    dropped = n_in * 0
    if thr > 0:
        if full:
            dropped = _mask_body(nat_ptr, adv_ptr, upd_ptr, offs, m, thr, alpha, beta, True)
        else:
            dropped = _mask_body(nat_ptr, adv_ptr, upd_ptr, offs, m, thr, alpha, beta, False)
    tl.atomic_add(kept_ptr + out, (n_in - dropped).to(tl.int64), sem="relaxed")


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
    bracketed: int  # tensors selected through the sampling bracket
    cand_total: int  # size of the bracket candidate buffer
    chunks: Tensor  # int64[2 * num_chunks]: tensor index in the group, then the BLOCK index of the chunk
    tensors: Tensor  # int64[T, _T_COLS]
    fracs: Tensor  # float32[T, 2]: f32(g), f32(1 - g)


_plans: OrderedDict[tuple, tuple[_Group, ...]] = OrderedDict()


def device_context(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (Triton launches on the *current* device's current
    stream, so tensors on ``cuda:1`` while ``cuda:0`` is current would fault), a no-op otherwise."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_tensor_device(fn: Callable) -> Callable:
    """Run a Triton entry point with the device of its first tensor argument current (its first argument
    is a list of tensors, the others on the same device: the public ops check that)."""

    @functools.wraps(fn)
    def wrapper(tensors, *args, **kwargs):
        if not tensors:
            return fn(tensors, *args, **kwargs)
        with device_context(tensors[0].device):
            return fn(tensors, *args, **kwargs)

    return wrapper


def _stream_key(device: torch.device) -> int:
    """The current stream of ``device`` (CUDA), 0 elsewhere: plans are cached per stream, so that a table
    is only ever read on the stream that allocated it. When the cache evicts and frees it, the caching
    allocator can hand its memory out again only to later work on that same stream, ordered after every
    kernel that read it (a table shared with a side stream could be reused while that stream still reads)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


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


def bracket_ranks(n: int, k: int, k1: int, m: int, sigmas: float = BRACKET_SIGMAS) -> tuple[int, int]:
    """Sample ranks (of m sampled scores) of the bracket keys lo and hi for order statistics k, k1 of n:
    the sample quantiles at the rank fractions of k and k1 widened by ``sigmas`` binomial standard
    deviations and one rank. -1 means lo = 0 (open below), m means hi = +inf (open above)."""
    p = k / n
    q = (k1 + 1) / n
    r_lo = math.floor(m * p - sigmas * math.sqrt(m * p * (1 - p))) - 1
    r_hi = math.ceil(m * q + sigmas * math.sqrt(m * q * (1 - q))) + 1
    return max(r_lo, -1), min(r_hi, m)


def _build_group(members: list[int], sizes: list[int], p: float, device: torch.device) -> _Group:
    n = np.array([sizes[i] for i in members], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(n)[:-1])).astype(np.int64)
    table = np.zeros((len(members), _T_COLS.value), dtype=np.int64)
    fracs = np.zeros((len(members), 2), dtype=np.float32)
    chunk_tensor, chunk_block = [], []
    m = SAMPLE_TILE * SAMPLE_TILES
    cand_total = 0
    bracketed = 0
    for j, i in enumerate(members):
        size = int(n[j])
        k, k1, g, one_minus_g, below_half = _interpolation(size, p)
        bracket = size >= max(BRACKET_MIN, 4 * m)
        r_lo, r_hi = bracket_ranks(size, k, k1, m) if bracket else (0, 0)
        cap = size // CAND_FRACTION if bracket else 0
        table[j] = (starts[j], starts[j] + size, k, k1, i, below_half, size, bracket, r_lo, r_hi, cand_total, cap)
        cand_total += cap
        bracketed += bracket
        fracs[j] = (g, one_minus_g)
        if size:
            first, last = int(starts[j]) // BLOCK, (int(starts[j]) + size - 1) // BLOCK
            chunk_tensor.append(np.full(last - first + 1, j, dtype=np.int64))
            chunk_block.append(np.arange(first, last + 1, dtype=np.int64))
    chunks = np.concatenate(chunk_tensor + chunk_block) if chunk_tensor else np.zeros(0, dtype=np.int64)
    return _Group(tuple(members), int(n.sum()), len(chunks) // 2, bracketed, cand_total,
                  torch.tensor(chunks, dtype=torch.int64, device=device),
                  torch.tensor(table, dtype=torch.int64, device=device),
                  torch.tensor(fracs, dtype=torch.float32, device=device))


def plan_groups(updates: Sequence[Tensor], p: float) -> tuple[_Group, ...]:
    """The dtype groups of a call and their device tables, cached per (device, current stream, p, dtypes,
    sizes); see :func:`_stream_key`."""
    device = updates[0].device
    dtypes = tuple(u.dtype for u in updates)
    sizes = [u.numel() for u in updates]
    key = (device, _stream_key(device), p, dtypes, tuple(sizes), BRACKET_MIN, SAMPLE_TILE, SAMPLE_TILES,
           CAND_FRACTION, BLOCK)
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

# Per group of the last call, (its table, its state): read by benchmarks for the bracket's miss rate.
_last_states: list[tuple[Tensor, Tensor]] = []


def last_bracket_misses() -> tuple[int, int]:
    """(bracketed tensors, bracket misses) of the last selection call (synchronises: for benchmarks)."""
    bracketed = misses = 0
    for tensors, state in _last_states:
        flags = tensors[:, _T_BRACKET.value] != 0
        bracketed += int(flags.sum())
        misses += int((state[:, _S_MISS.value].to(torch.int64).cpu() != 0)[flags.cpu()].sum())
    return bracketed, misses


# --- launcher ----------------------------------------------------------------------------------
# No multiply-add contraction anywhere: the scores and the threshold must round like numpy/PyTorch.
_STREAM_OPTIONS = {"num_warps": STREAM_WARPS, "enable_fp_fusion": False}
_SELECT_OPTIONS = {"num_warps": SELECT_WARPS, "enable_fp_fusion": False}
_RESOLVE_OPTIONS = {"num_warps": RESOLVE_WARPS, "enable_fp_fusion": False}


def _radix_levels(digits: tuple[int, ...]) -> list[tuple[int, int]]:
    """(shift, width) of each digit of the 31-bit key, from the top."""
    assert sum(digits) == 31, digits
    levels, shift = [], 31
    for width in digits:
        shift -= width
        levels.append((shift, width))
    return levels


def select_thresholds(group: _Group, nat: Tensor, adv: Tensor, alpha: float, beta: float, thresholds: Tensor,
                      nonfinite: Tensor) -> None:
    """The exact p-quantile of each tensor of ``group`` into ``thresholds[out]`` and its non-finite score
    count into ``nonfinite[out]`` (sampling bracket, radix path for the rest; module docstring).
    ``nat``/``adv`` are the group's flat gradients (:func:`flatten_tensors`). The final pass over the
    data is the caller's: :func:`_mask_kernel` here, the fused SGD kernel in ``triton_sgd_step``.
    """
    device = thresholds.device
    num_tensors = len(group.members)
    levels = _radix_levels(RADIX_DIGITS)
    row = max(1 << levels[0][1], 2 * max(1 << w for _, w in levels[1:]))
    hist_size = len(levels) * num_tensors * row
    # Histograms [levels, T, row] then the per-tensor state [T, _S_COLS]: one zeroed allocation.
    ws = torch.zeros(hist_size + num_tensors * _S_COLS.value, dtype=torch.int32, device=device)
    state = ws[hist_size:]
    _last_states.append((group.tensors, state.view(num_tensors, _S_COLS.value)))
    nc = group.num_chunks
    chunks, tensors = group.chunks, group.tensors

    def select(level: int) -> None:
        _, width = levels[level - 1]
        _select_kernel[(triton.cdiv(num_tensors, SELECT_TILE),)](
            tensors, group.fracs, ws, state, thresholds, nonfinite, num_tensors, LEVEL=level, TILE=SELECT_TILE,
            ROW=row, NB=1 << width, WIDTH=width, LAST=level == len(levels), **_SELECT_OPTIONS)

    if nc == 0:  # every tensor of the group is empty: only the outputs (NaN threshold, no non-finite)
        select(len(levels))
        return
    if group.bracketed:
        cand = torch.empty(group.cand_total, dtype=torch.int32, device=device)
        _sample_kernel[(num_tensors,)](nat, adv, tensors, state, alpha, beta, TILE=SAMPLE_TILE,
                                       TILES=SAMPLE_TILES, **_RESOLVE_OPTIONS)
        _bracket_kernel[(nc,)](nat, adv, chunks, tensors, state, cand, alpha, beta, nc, BLOCK=BLOCK,
                               **_STREAM_OPTIONS)
        _resolve_kernel[(num_tensors,)](tensors, group.fracs, state, cand, thresholds, nonfinite, BLOCK=BLOCK,
                                        **_RESOLVE_OPTIONS)
    cand = torch.empty(group.total, dtype=torch.int32, device=device)
    _histogram_kernel[(nc,)](nat, adv, chunks, tensors, ws, state, alpha, beta, nc, BLOCK=BLOCK, ROW=row,
                             SHIFT=levels[0][0], NB=1 << levels[0][1], **_STREAM_OPTIONS)
    select(1)
    _refine_kernel[(nc,)](nat, adv, chunks, tensors, ws, state, cand, alpha, beta, nc, num_tensors, BLOCK=BLOCK,
                          ROW=row, PREV_SHIFT=levels[0][0], SHIFT=levels[1][0], NB=1 << levels[1][1],
                          **_STREAM_OPTIONS)
    select(2)
    for level in range(3, len(levels) + 1):
        _candidate_kernel[(nc,)](cand, chunks, tensors, ws, state, nc, num_tensors, LEVEL=level, BLOCK=BLOCK,
                                 ROW=row, PREV_SHIFT=levels[level - 2][0], SHIFT=levels[level - 1][0],
                                 NB=1 << levels[level - 1][1], **_STREAM_OPTIONS)
        select(level)


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
                        BLOCK=BLOCK, **_STREAM_OPTIONS)
    if packed:
        scatter_back(upd, updates)


@on_tensor_device
def rgp_mask_triton(updates: list[Tensor], grads_nat: list[Tensor], grads_adv: list[Tensor], alpha: float,
                    p: float) -> tuple[Tensor, Tensor, Tensor]:
    """Zero, in place, the entries of each ``updates[i]`` whose score is below its p-quantile (docs/method.md).

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
    _last_states.clear()
    for group in plan_groups(updates, float(p)):
        idx = group.members
        _mask_group(group, [updates[i] for i in idx], [grads_nat[i] for i in idx],
                    [grads_adv[i] for i in idx], alpha32, beta32, thresholds, kept, nonfinite)
    return thresholds, kept, nonfinite


@on_tensor_device
def rgp_select_triton(grads_nat: list[Tensor], grads_adv: list[Tensor], alpha: float, p: float
                      ) -> tuple[Tensor, Tensor]:
    """The selection of :func:`rgp_mask_triton` alone (no mask pass): ``(thresholds float32[T],
    nonfinite int64[T])`` on the tensors' device, the same launches and so the same bits. Reads its inputs
    only; synchronises with the host only when it uploads its tables (as :func:`rgp_mask_triton`).
    """
    num = len(grads_nat)
    device = grads_nat[0].device if num else torch.device("cpu")
    thresholds = torch.empty(num, dtype=torch.float32, device=device)
    nonfinite = torch.empty(num, dtype=torch.int64, device=device)
    if num == 0:
        return thresholds, nonfinite
    alpha32 = float(np.float32(alpha))
    beta32 = float(np.float32(1.0 - alpha))
    _last_states.clear()
    for group in plan_groups(grads_nat, float(p)):
        idx = group.members
        if group.num_chunks == 0:  # only empty tensors: NaN thresholds, no non-finite scores
            select_thresholds(group, grads_nat[idx[0]], grads_nat[idx[0]], alpha32, beta32, thresholds, nonfinite)
            continue
        nat, _ = flatten_tensors([grads_nat[i] for i in idx])
        adv, _ = flatten_tensors([grads_adv[i] for i in idx])
        select_thresholds(group, nat, adv, alpha32, beta32, thresholds, nonfinite)
    return thresholds, nonfinite
