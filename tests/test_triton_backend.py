"""The Triton backend against the oracle, bit for bit: thresholds, masks, counts, revision.

On a machine without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1); with a GPU they run on CUDA tensors. The interpreter is slow, so shapes are
small; every size class that matters to the kernels (0, 1, 2, primes, one past the block size, many
tiny tensors, a tensor spanning several blocks) is still here.
"""

from __future__ import annotations

import contextlib
import math
import random
import struct

import numpy as np
import pytest
import torch
from rgp_cases import DTYPES, KINDS, assert_matches_reference, bitwise_equal_f32, make_case, make_case_lists

import cure_kernels as ck
from cure_kernels import reference

DEVICES = [d for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()]
DEVICES = [d for d in DEVICES if "triton" in ck.available_backends(d)]
pytestmark = [
    pytest.mark.skipif(
        not DEVICES, reason="backend 'triton' cannot run here: needs a CUDA GPU, or TRITON_INTERPRET=1 set "
                            "before Python starts (tests/conftest.py sets it when no GPU is present)"),
    # inf - inf and inf * 0 are part of the contract (numpy's NaN threshold); numpy and the interpreter warn.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

if DEVICES:
    from cure_kernels import triton_revise, triton_rgp_mask

    BLOCK = triton_rgp_mask.BLOCK
else:  # the module is skipped; keep the names defined for collection
    BLOCK = 4096

# Sizes: empty, 1, 2, primes, a power of two, one past the block size (two programs, the second with one
# element).
SIZES = (0, 1, 2, 3, 13, 128, 257, BLOCK + 1)
PS = (0.0, 0.3, 0.999, 1.0)
ALPHAS = (0.0, 0.1, 1.0)


def _inputs(kind, sizes, dtype, seed, device):
    gen = torch.Generator().manual_seed(seed)
    nat, adv = make_case_lists(kind, sizes, dtype, gen, device)
    updates = [torch.randn(n, generator=gen).to(device=device, dtype=dtype) for n in sizes]
    return updates, nat, adv


class _LayoutSpy:
    """Records, per flattened list, whether the backend packed it (True) or used it in place (False)."""

    def __init__(self, monkeypatch, module):
        self.packed: list[bool] = []
        original = module.flatten_tensors

        def spy(tensors):
            flat, packed = original(tensors)
            self.packed.append(packed)
            return flat, packed

        monkeypatch.setattr(module, "flatten_tensors", spy)


def _flat_views(sizes, dtype, device, values):
    """Views, in order, into one flat buffer holding ``values`` (a list of 1-D tensors)."""
    buf = torch.cat([v.reshape(-1) for v in values]).to(device=device, dtype=dtype)
    views, start = [], 0
    for n in sizes:
        views.append(buf[start:start + n])
        start += n
    return buf, views


def _key_tensor(keys) -> torch.Tensor:
    """float32 tensor whose bit patterns are ``keys``."""
    return torch.tensor(np.array(keys, dtype=np.uint32).view(np.float32))


# --- masking: every pathology, dtype, alpha and p ----------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_on_pathological_inputs(device, kind, dtype):
    rng = random.Random(f"{kind}-{dtype}")
    # Each p of PS plus a random one, with the alphas cycled so every (kind, dtype) sees all of them.
    ps = PS + (rng.random(),)
    alphas = ALPHAS + (rng.random(),)
    for i, p in enumerate(ps):
        alpha = alphas[(i + KINDS.index(kind)) % len(alphas)]
        updates, nat, adv = _inputs(kind, SIZES, dtype, rng.randrange(2**31), device)
        assert_matches_reference("triton", updates, nat, adv, alpha, p)


@pytest.mark.parametrize("device", DEVICES)
def test_order_statistics_resolved_at_every_digit_level(device):
    """v[k] and v[k+1] that differ in the top 11 key bits, only in the middle 10, only in the last 10,
    or not at all; with decoys sharing each prefix on both sides. alpha = 1 makes s = |g_nat| exactly."""
    base = 0x3F800000  # 1.0
    cases = {
        "level1": (base, base + (1 << 20)),
        "level2": (base + 5, base + (1 << 10) + 3),
        "level3": (base + 7, base + 9),
        "equal": (base + 7, base + 7),
        "inf": (base, 0x7F800000),
        "both_inf": (0x7F800000, 0x7F800000),
        "subnormal": (1, 2),
        "zero": (0, 0),
    }
    updates, nat, adv = [], [], []
    for lo, hi in cases.values():
        below = [lo - 1, lo - 2, max(lo - (1 << 10), 0), max(lo - (1 << 20), 0)] if lo >= 2 else [0, 0, 0, 0]
        above = [hi + 1 if hi < 0x7F800000 else hi, hi + (1 << 10) if hi < 0x7F000000 else hi, hi, hi]
        keys = sorted(below) + [lo, hi] + sorted(above)  # 10 keys; p = 0.5 gives h = 4.5: ranks 4, 5
        keys = [min(k, 0x7F800000) for k in keys]
        perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(len(updates)))
        nat.append(_key_tensor(keys)[perm].to(device))
        adv.append(torch.randn(len(keys)).to(device))
        updates.append(torch.randn(len(keys)).to(device))
    stats = assert_matches_reference("triton", updates, nat, adv, alpha=1.0, p=0.5)
    thr = dict(zip(cases, stats.thresholds.cpu().tolist()))
    assert thr["equal"] == struct.unpack("<f", struct.pack("<I", base + 7))[0]
    assert math.isnan(thr["both_inf"]) and thr["zero"] == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_exact_on_keys_sharing_long_prefixes(device, seed):
    """Scores drawn from a few 21-bit key prefixes with random low bits: heavy collisions at every
    digit level, in tensors that span several programs, next to small ones."""
    rng = np.random.default_rng(seed)
    updates, nat, adv = [], [], []
    for n in (2 * BLOCK + 7, 97, 1, 1000):
        prefixes = rng.integers(0x3F000, 0x3F008, size=3) << 10
        keys = prefixes[rng.integers(0, 3, size=n)] + rng.integers(0, 4, size=n) * rng.integers(1, 300)
        nat.append(_key_tensor(keys).to(device))
        adv.append(torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(device))
        updates.append(torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(device))
    for p in (float(rng.random()), 0.5, 1 / 3):
        assert_matches_reference("triton", [u.clone() for u in updates], nat, adv, alpha=1.0, p=p)
    assert_matches_reference("triton", updates, nat, adv, alpha=float(rng.random()), p=0.3)


def test_chunks_are_block_aligned_so_only_a_tensors_ends_are_masked():
    """A 10-element tensor first shifts every later tensor off alignment; chunks are still BLOCK-aligned
    pieces of the flat buffer, so all chunks strictly inside a tensor are full (the unmasked path)."""
    sizes = [10, 3 * BLOCK + 5, 0, 7, BLOCK]
    (group,) = triton_rgp_mask._plan([torch.empty(n) for n in sizes], 0.3)
    chunks = group.chunks.cpu().view(2, -1)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    pieces = []
    for t, block in chunks.t().tolist():
        lo, hi = max(starts[t], block * BLOCK), min(starts[t] + sizes[t], (block + 1) * BLOCK)
        assert lo < hi
        pieces.append((t, lo, hi, hi - lo == BLOCK))
    assert [p[:3] for p in pieces] == sorted(p[:3] for p in pieces)
    for t, n in enumerate(sizes):  # the chunks of each tensor tile it exactly
        mine = [(lo, hi) for u, lo, hi, _ in pieces if u == t]
        assert sum(hi - lo for lo, hi in mine) == n
    assert sum(full for *_, full in pieces) == 2  # blocks 1 and 2 lie inside the second tensor
    updates, nat, adv = _inputs("random", sizes, torch.float32, 12, DEVICES[0])
    assert_matches_reference("triton", updates, nat, adv, alpha=0.1, p=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tiny_tensors_next_to_a_larger_one(device):
    sizes = [1, 0, 2, 3, 5, 1, 1, 7, 0, 11] * 3 + [3 * BLOCK - 1]
    updates, nat, adv = _inputs("random", sizes, torch.float32, 11, device)
    assert_matches_reference("triton", updates, nat, adv, alpha=0.1, p=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_are_grouped_and_reported_in_order(device):
    gen = torch.Generator().manual_seed(2)
    plan = [(0, torch.float32), (300, torch.float16), (1, torch.bfloat16), (513, torch.float32),
            (0, torch.bfloat16), (64, torch.bfloat16), (BLOCK + 1, torch.float16)]
    updates, nat, adv = [], [], []
    for n, dtype in plan:
        a, b = make_case("wide", n, gen) if n else (torch.empty(0), torch.empty(0))
        nat.append(a.to(device, dtype))
        adv.append(b.to(device, dtype))
        updates.append(torch.randn(n, generator=gen).to(device, dtype))
    stats = assert_matches_reference("triton", updates, nat, adv, alpha=0.3, p=0.7)
    assert math.isnan(stats.thresholds[0].item()) and math.isnan(stats.thresholds[4].item())
    assert stats.kept[0].item() == 0 and stats.nonfinite[4].item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_group_of_only_empty_tensors(device):
    updates = [torch.empty(0, device=device), torch.empty(0, 3, device=device, dtype=torch.float16)]
    grads = [u.clone() for u in updates]
    stats = ck.rgp_mask_(updates, grads, grads, alpha=0.1, p=0.3, backend="triton")
    assert torch.isnan(stats.thresholds).all() and stats.kept.tolist() == [0, 0]
    assert stats.nonfinite.tolist() == [0, 0]


# --- the sampling bracket: cases built to defeat it ------------------------------------------------------
@pytest.fixture
def small_bracket(monkeypatch):
    """Bracket every tensor of at least 2048 elements from a 256-score sample (16 tiles of 16), so the
    interpreter can run the cases; the algorithm is the one of the default sizes."""
    monkeypatch.setattr(triton_rgp_mask, "BRACKET_MIN", 2048)
    monkeypatch.setattr(triton_rgp_mask, "SAMPLE_TILE", 16)
    monkeypatch.setattr(triton_rgp_mask, "SAMPLE_TILES", 16)
    # 5 sigma of a 256-score sample is +-14 % of the ranks at p = 0.3: room for half the tensor.
    monkeypatch.setattr(triton_rgp_mask, "CAND_FRACTION", 2)
    return triton_rgp_mask


def _bracket_case(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """float32 scores (used as g_nat with alpha = 1, so s = |g_nat|) of the named pathology."""
    u = rng.random(n, dtype=np.float32)
    if name == "all_equal":
        return np.full(n, 0.25, np.float32)
    if name == "ties_at_lo":  # three values, the middle one a run holding the bracket's low end
        return rng.choice(np.array([0.5, 1.0, 2.0], np.float32), size=n, p=[0.25, 0.1, 0.65])
    if name == "run_straddling_k":  # 60 % equal values from rank 0.1 n to 0.7 n
        x = np.where(u < 0.1, u, np.where(u < 0.7, np.float32(0.5), u + 1)).astype(np.float32)
        return rng.permutation(x)
    if name in ("zeros30", "zeros80"):
        frac = 0.3 if name == "zeros30" else 0.8
        x = u + np.float32(0.01)
        x[: int(frac * n)] = 0
        return rng.permutation(x)
    if name == "nan":
        x = u.copy()
        x[rng.integers(0, n)] = np.nan
        return x
    if name == "inf":
        x = u.copy()
        x[rng.random(n) < 0.1] = np.inf
        return x
    if name == "sorted":
        return np.sort(u)
    if name == "sample_small_rest_large":  # every sampled tile holds small values, the rest is large
        return u + np.float32(1000)  # the sampled positions are overwritten by the test
    if name == "two_valued":
        return np.where(u < 0.5, np.float32(0.5), np.float32(2.0)).astype(np.float32)
    if name == "denormal":
        return (u * np.float32(1e-39)).astype(np.float32)
    raise ValueError(name)


BRACKET_CASES = ("all_equal", "ties_at_lo", "run_straddling_k", "zeros30", "zeros80", "nan", "inf", "sorted",
                 "sample_small_rest_large", "two_valued", "denormal")


def _sample_positions(n: int, tile: int, tiles: int) -> np.ndarray:
    starts = (np.arange(tiles, dtype=np.int64) * n // tiles) // tile * tile
    return (starts[:, None] + np.arange(tile)).reshape(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BRACKET_CASES)
def test_bracket_exact_on_cases_built_to_defeat_it(device, case, small_bracket):
    rng = np.random.default_rng(BRACKET_CASES.index(case))
    sizes = [5003, 40, 2048]
    nat = [_bracket_case(case, n, rng) for n in sizes]
    if case == "sample_small_rest_large":
        for x in (nat[0], nat[2]):
            x[_sample_positions(x.size, 16, 16)] = rng.random(256, dtype=np.float32)
    nat_t = [torch.from_numpy(x).to(device) for x in nat]
    adv = [torch.randn(n).to(device) for n in sizes]
    for p in (0.3, 0.0, 0.999, 1.0, 0.5):
        updates = [torch.randn(n).to(device) for n in sizes]
        assert_matches_reference("triton", updates, nat_t, adv, alpha=1.0, p=p)
        bracketed, misses = small_bracket.last_bracket_misses()
        assert bracketed == 2
        if case == "sample_small_rest_large" and 0 < p < 1:
            assert misses == 2  # the counts show the ranks lie above hi: the radix path resolved them
        if case in ("zeros80", "nan", "two_valued") and 0 < p < 1:
            assert misses == 0


@pytest.mark.parametrize("device", DEVICES)
def test_bracket_candidate_overflow_falls_back(device, small_bracket, monkeypatch):
    monkeypatch.setattr(small_bracket, "CAND_FRACTION", 1000)  # room for 5 candidates in 5003 elements
    updates, nat, adv = _inputs("random", [5003, 2048], torch.float32, 3, device)
    assert_matches_reference("triton", updates, nat, adv, alpha=0.1, p=0.3)
    assert small_bracket.last_bracket_misses() == (2, 2)
    monkeypatch.setattr(small_bracket, "CAND_FRACTION", 2)
    updates, nat, adv = _inputs("random", [5003, 2048], torch.float32, 3, device)
    assert_matches_reference("triton", updates, nat, adv, alpha=0.1, p=0.3)
    assert small_bracket.last_bracket_misses() == (2, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_bracket_starts_at_the_cutoff(device, small_bracket):
    sizes = [2047, 2048, 2049]
    (group,) = small_bracket._plan([torch.empty(n) for n in sizes], 0.3)
    assert group.bracketed == 2 and group.tensors[:, 7].tolist() == [0, 1, 1]
    for kind in ("random", "ties", "zeros"):
        updates, nat, adv = _inputs(kind, sizes, torch.float32, 4, device)
        assert_matches_reference("triton", updates, nat, adv, alpha=0.3, p=0.7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_bracket_on_the_pathological_battery(device, kind, small_bracket):
    dtype = DTYPES[KINDS.index(kind) % len(DTYPES)]
    updates, nat, adv = _inputs(kind, [3000, 17, 2 * BLOCK + 3], dtype, KINDS.index(kind), device)
    for p, alpha in ((0.3, 0.1), (0.999, 0.7)):
        assert_matches_reference("triton", [u.clone() for u in updates], nat, adv, alpha=alpha, p=p)


@pytest.mark.parametrize("device", DEVICES)
def test_bracket_at_the_default_sizes_hits_on_random_gradients(device):
    n = triton_rgp_mask.BRACKET_MIN + 3
    updates, nat, adv = _inputs("random", [n, 100], torch.float32, 5, device)
    assert_matches_reference("triton", updates, nat, adv, alpha=0.1, p=0.3)
    assert triton_rgp_mask.last_bracket_misses() == (1, 0)


def test_bracket_ranks_widen_by_five_sigma_and_clamp():
    m = 16384
    r_lo, r_hi = triton_rgp_mask.bracket_ranks(10**6, 299_999, 300_000, m)
    sigma = math.sqrt(m * 0.3 * 0.7)
    assert r_lo == math.floor(m * 0.299999 - 5 * sigma) - 1 and r_hi == math.ceil(m * 0.300001 + 5 * sigma) + 1
    assert triton_rgp_mask.bracket_ranks(10**6, 0, 1, m)[0] == -1  # open below: lo = 0
    assert triton_rgp_mask.bracket_ranks(10**6, 999_999, 999_999, m)[1] == m  # open above: hi = +inf


# --- the radix path's digit widths ----------------------------------------------------------------------
def test_digit_widths_follow_the_triton_version():
    assert triton_rgp_mask._radix_digits("3.6.0") == (8, 8, 8, 7)
    assert triton_rgp_mask._radix_digits("3.5.1") == (8, 8, 8, 7)
    assert triton_rgp_mask._radix_digits("3.7.0") == (11, 10, 10)
    assert triton_rgp_mask._radix_digits("3.8.0+git1234") == (11, 10, 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("digits", [(8, 8, 8, 7), (11, 10, 10)], ids=str)
@pytest.mark.parametrize("kind", ["ties", "wide", "denormal", "nan", "inf", "zeros"])
def test_radix_path_exact_with_either_digit_widths(device, digits, kind, monkeypatch):
    monkeypatch.setattr(triton_rgp_mask, "RADIX_DIGITS", digits)
    rng = random.Random(kind)
    updates, nat, adv = _inputs(kind, SIZES, torch.float32, rng.randrange(2**31), device)
    for p in (0.3, 1.0, rng.random()):
        assert_matches_reference("triton", [u.clone() for u in updates], nat, adv, alpha=0.1, p=p)


@pytest.mark.parametrize("device", DEVICES)
def test_order_statistics_at_every_level_of_the_256_bin_digits(device, monkeypatch):
    monkeypatch.setattr(triton_rgp_mask, "RADIX_DIGITS", (8, 8, 8, 7))
    test_order_statistics_resolved_at_every_digit_level(device)
    test_exact_on_keys_sharing_long_prefixes(device, 0)


# --- layouts: zero copy, packed, non-contiguous ------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flat_buffer_views_are_used_without_copies(device, dtype, monkeypatch):
    spy = _LayoutSpy(monkeypatch, triton_rgp_mask)
    sizes = [7, 0, 1, BLOCK + 1, 33, 2]
    gen = torch.Generator().manual_seed(4)
    values = [make_case("ties", n, gen) if n else (torch.empty(0), torch.empty(0)) for n in sizes]
    _, nat = _flat_views(sizes, dtype, device, [v[0] for v in values])
    _, adv = _flat_views(sizes, dtype, device, [v[1] for v in values])
    upd_buf, updates = _flat_views(sizes, dtype, device, [torch.randn(n, generator=gen) for n in sizes])
    expected_buf = upd_buf.clone()
    expected = [expected_buf[u.storage_offset():u.storage_offset() + u.numel()] for u in updates]
    exp = reference.rgp_mask_reference(expected, nat, adv, 0.1, 0.3)
    stats = ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3, backend="triton")
    assert spy.packed == [False, False, False]  # g_nat, g_adv and the updates: all zero copy
    assert torch.equal(upd_buf, expected_buf)
    assert bitwise_equal_f32(stats.thresholds, exp[0]) and torch.equal(stats.kept.cpu(), exp[1].cpu())
    assert torch.equal(stats.nonfinite.cpu(), exp[2].cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_packed_and_zero_copy_layouts_agree(device, monkeypatch):
    spy = _LayoutSpy(monkeypatch, triton_rgp_mask)
    sizes = [129, 3, 0, 1000]
    gen = torch.Generator().manual_seed(6)
    values = [make_case("random", n, gen) if n else (torch.empty(0), torch.empty(0)) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    _, nat = _flat_views(sizes, torch.float32, device, [v[0] for v in values])
    _, adv = _flat_views(sizes, torch.float32, device, [v[1] for v in values])
    # Updates as separate tensors (packed, then copied back) while the gradients are zero copy.
    updates = [g.clone().to(device) for g in grads]
    assert_matches_reference("triton", updates, nat, adv, alpha=0.1, p=0.3)
    assert spy.packed == [False, False, True]
    # Views of one buffer, but listed out of order or with a gap: not back to back, so packed.
    spy.packed.clear()
    buf = torch.randn(1200, device=device)
    gapped = [buf[0:129], buf[130:133], buf[133:133], buf[140:1140]]
    assert_matches_reference("triton", gapped, nat, adv, alpha=0.1, p=0.3)
    assert spy.packed == [False, False, True]
    spy.packed.clear()
    order = [3, 1, 0, 2]
    assert_matches_reference("triton", [updates[i] for i in order], [nat[i] for i in order],
                             [adv[i] for i in order], alpha=0.1, p=0.3)
    assert spy.packed == [True, True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_updates_are_modified_in_place(device):
    gen = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    updates = [randn(37, 29).t(), randn(64, 33)[:, ::3]]
    nat = [randn(37, 29).t(), randn(11, 64).t()]
    adv = [randn(29, 74)[:, ::2], randn(64, 11)]
    assert not (updates[0].is_contiguous() or updates[1].is_contiguous() or nat[0].is_contiguous())
    ptrs = [u.data_ptr() for u in updates]
    assert_matches_reference("triton", updates, nat, adv, alpha=0.1, p=0.3)
    assert [u.data_ptr() for u in updates] == ptrs


def test_flat_view_detects_back_to_back_views_only():
    buf = torch.arange(20.0)
    views = [buf[2:5], buf[5:5], buf[5:9].view(2, 2), buf[9:10]]
    flat = triton_rgp_mask.flat_view(views)
    assert flat is not None and flat.data_ptr() == buf[2:].data_ptr() and flat.shape == (8,)
    assert torch.equal(flat, torch.arange(2.0, 10.0))
    assert triton_rgp_mask.flat_view([buf[0:3], buf[4:6]]) is None  # gap
    assert triton_rgp_mask.flat_view([buf[3:6], buf[0:3]]) is None  # out of order
    assert triton_rgp_mask.flat_view([buf[0:6].view(2, 3).t()]) is None  # not contiguous
    assert triton_rgp_mask.flat_view([torch.empty(0)]) is None


def k_stream(key) -> int:
    return key[1]


def test_tables_are_cached_per_layout():
    updates, nat, adv = _inputs("random", [5, 9], torch.float32, 0, DEVICES[0])
    ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.25, backend="triton")
    key = next(k for k in reversed(triton_rgp_mask._plans) if k[2] == 0.25)
    assert k_stream(key) == 0  # CPU tensors: no stream
    plan = triton_rgp_mask._plans[key]
    ck.rgp_mask_(updates, nat, adv, alpha=0.7, p=0.25, backend="triton")
    assert triton_rgp_mask._plans[key] is plan


def test_tensors_of_2_pow_31_elements_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"updates\[1\] has 2147483648 elements.*fewer than 2\*\*31"):
        triton_rgp_mask._plan([torch.empty(3, device="meta"), torch.empty(2**31, device="meta")], 0.3)


# --- revise ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_revise_exact(device, dtype):
    gen = torch.Generator().manual_seed(8)
    sizes = [0, 1, 2, 13, BLOCK + 1, 3]
    for decay in (0.0, 0.5, 0.999, 1.0, 0.123456789, random.Random(str(dtype)).random()):
        rev = [(torch.randn(n, generator=gen) * 100).to(device, dtype) for n in sizes]
        par = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes]
        rev[3][0], par[3][1] = math.inf, math.nan
        expected = [r.clone() for r in rev]
        reference.revise_reference(expected, par, decay)
        ck.revise_(rev, par, decay=decay, backend="triton")
        for r, e in zip(rev, expected):
            assert r.dtype == dtype and bitwise_equal_f32(r, e), decay


@pytest.mark.parametrize("device", DEVICES)
def test_revise_rounds_bfloat16_to_nearest_even(device):
    one_up = 1.0 + 2.0**-7  # the next bfloat16 after 1
    # decay 0.5: the float32 result is the exact mean, halfway between two bfloat16 values.
    rev = [torch.tensor([1.0, one_up, -one_up, 3.0e38, 1e-40], dtype=torch.bfloat16, device=device)]
    two_up = 1.0 + 2 * 2.0**-7
    par = [torch.tensor([one_up, two_up, -1.0, 3.0e38, 3e-40], dtype=torch.bfloat16, device=device)]
    expected = [rev[0].clone()]
    reference.revise_reference(expected, par, 0.5)
    ck.revise_(rev, par, decay=0.5, backend="triton")
    assert bitwise_equal_f32(rev[0], expected[0])
    assert rev[0][0].item() == 1.0 and rev[0][1].item() == 1.0 + 2.0**-6  # ties to the even neighbour


@pytest.mark.parametrize("device", DEVICES)
def test_revise_layouts(device, monkeypatch):
    spy = _LayoutSpy(monkeypatch, triton_revise)
    sizes = [5, 0, BLOCK + 1, 2]
    gen = torch.Generator().manual_seed(9)
    _, rev = _flat_views(sizes, torch.bfloat16, device, [torch.randn(n, generator=gen) for n in sizes])
    _, par = _flat_views(sizes, torch.bfloat16, device, [torch.randn(n, generator=gen) for n in sizes])
    expected = [r.clone() for r in rev]
    reference.revise_reference(expected, par, 0.9)
    ck.revise_(rev, par, decay=0.9, backend="triton")
    assert spy.packed == [False, False]
    assert all(bitwise_equal_f32(r, e) for r, e in zip(rev, expected))
    spy.packed.clear()
    rev2 = [torch.randn(4, 6, generator=gen).to(device)[:, ::2], torch.randn(3, generator=gen).to(device),
            torch.randn(5, generator=gen).to(device, torch.float16)]
    par2 = [torch.randn(6, 4, generator=gen).to(device).t()[:, ::2], torch.randn(3, generator=gen).to(device),
            torch.randn(5, generator=gen).to(device, torch.float16)]
    ptrs = [r.data_ptr() for r in rev2]
    expected = [r.clone() for r in rev2]
    reference.revise_reference(expected, par2, 0.3)
    ck.revise_(rev2, par2, decay=0.3, backend="triton")
    assert spy.packed == [True, True, False, False]  # the float32 group is packed; one fp16 tensor is flat
    assert [r.data_ptr() for r in rev2] == ptrs
    assert all(bitwise_equal_f32(r, e) for r, e in zip(rev2, expected))


# --- torch.library contract ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_revise_triton(device):
    rev = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    par = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    torch.library.opcheck(torch.ops.cure.revise_triton, (rev, par, 0.9))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()

    def step(updates, nat, adv, rev, par):
        stats = ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3, backend="triton")
        ck.revise_(rev, par, decay=0.99, backend="triton")
        return stats.thresholds * 2, stats.kept + stats.nonfinite

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    updates, nat, adv = _inputs("random", [40, 3, 17], torch.float32, 1, device)
    rev = [torch.randn(6, device=device)]
    expected = [u.clone() for u in updates], [r.clone() for r in rev]
    exp_thr, exp_counts = step(expected[0], nat, adv, expected[1], [torch.ones(6, device=device)])
    got_thr, got_counts = compiled(updates, nat, adv, rev, [torch.ones(6, device=device)])
    assert bitwise_equal_f32(got_thr, exp_thr) and torch.equal(got_counts, exp_counts)
    assert all(torch.equal(u, e) for u, e in zip(updates, expected[0]))
    assert bitwise_equal_f32(rev[0], expected[1][0])


# The compiled (non-interpreted) kernels: tests/test_triton_aot.py (every kernel through the real launchers).


# --- CUDA only -----------------------------------------------------------------------------------
@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU")
def test_no_host_synchronisation_on_cuda():
    updates, nat, adv = _inputs("random", [1000, 5, 3 * BLOCK], torch.float32, 1, "cuda")
    ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3, backend="triton")  # builds and uploads the tables
    ck.revise_(updates, nat, decay=0.9, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3, backend="triton")
        ck.revise_(updates, nat, decay=0.9, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_every_triton_entry_point_launches_on_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: each entry point makes its tensors' device current first.
    Checked without a GPU by recording the device the guard is entered with, and by the guard itself."""
    from cure_kernels import triton_sgd_step

    entered = []

    def record(device):
        entered.append(device)
        return contextlib.nullcontext()

    guard_of = triton_rgp_mask.device_context
    monkeypatch.setattr(triton_rgp_mask, "device_context", record)
    device = torch.device(DEVICES[0])
    updates, nat, adv = _inputs("random", [5, 9], torch.float32, 0, DEVICES[0])
    ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3, backend="triton")
    ck.rgp_select(nat, adv, alpha=0.1, p=0.3, backend="triton")
    params = [torch.randn(n, device=device) for n in (5, 9)]
    bufs = [torch.zeros(n, device=device) for n in (5, 9)]
    revs = [torch.randn(n, device=device) for n in (5, 9)]
    ck.rgp_sgd_step_(params, updates, nat, adv, bufs, lr=0.1, momentum=0.9, weight_decay=0.0, alpha=0.1, p=0.3,
                     revision=revs, decay=0.5, backend="triton")
    ck.revise_(revs, params, decay=0.5, backend="triton")
    assert entered == [device] * 4
    assert triton_sgd_step.rgp_sgd_step_triton.__wrapped__ is not None  # the guard wraps the public entry
    # The guard itself: the CUDA device context of the tensors' device (constructing it needs no GPU).
    guard = guard_of(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(guard_of(torch.device("cpu")), contextlib.nullcontext)
