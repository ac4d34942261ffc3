"""The C++ CPU backend (csrc/cpu/) against the reference oracle, bit for bit.

rgp_mask: the threshold must equal ``numpy.quantile(s, p)`` as float32 bits (any NaN equals any NaN),
``kept``/``nonfinite`` must match exactly, and every update must equal the reference's update as raw
bits (so a -0.0 written instead of +0.0 fails too). Inputs are the ones that break selection kernels:
heavy ties, exact zeros, all-equal tensors, denormals, magnitudes from 1e-30 to 1e30, +-inf, NaN,
sizes around powers of two and primes, many tiny tensors next to a large one, non-contiguous tensors,
float32/bfloat16/float16, and a tensor above 2^24 elements (where torch.quantile refuses to work).
revise: ``rev <- f32(decay)*rev + f32(1-decay)*param`` must equal the reference bit for bit.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cure_kernels as ck
from cure_kernels import reference

if "cpu" not in ck.available_backends("cpu"):
    pytest.skip("the C++ CPU backend is not available here (build the extension with "
                "`CURE_SKIP_CUDA_BUILD=1 pip install --no-build-isolation -e .`)", allow_module_level=True)

# numpy warns about inf - inf inside numpy.quantile (called by the reference): the NaN it yields is
# part of the specification these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


# --- inputs -----------------------------------------------------------------------------------------

def gradients(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 gradient tensors of n elements whose scores have the named pathology."""
    a = torch.randn(n, generator=gen)
    b = torch.randn(n, generator=gen)
    if kind == "random":
        pass
    elif kind == "ties":  # a handful of distinct scores: thresholds fall inside long runs of equal values
        a = torch.randint(-3, 4, (n,), generator=gen).float()
        b = torch.randint(-2, 3, (n,), generator=gen).float()
    elif kind == "zeros":  # 80 % exact zeros (dead units): low quantiles are 0
        keep = torch.rand(n, generator=gen) < 0.2
        a, b = a * keep, b * keep
    elif kind == "all_equal":
        a, b = torch.full((n,), 0.375), torch.full((n,), -1.5)
    elif kind == "two_values":  # ranks k and k+1 in different histogram bins
        a = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, 1024.0)
        b = torch.zeros(n)
    elif kind == "crowded":  # most scores distinct but inside one narrow range (one coarse bin)
        crowd = 1.0 + torch.randint(0, 1 << 12, (n,), generator=gen).float() * 2.0**-20
        a = torch.where(torch.rand(n, generator=gen) < 0.9, crowd, a * 100)
        b = torch.zeros(n)
    elif kind == "denormal":
        a, b = a * 1e-40, b * 1e-42
    elif kind == "wide":  # magnitudes from 1e-30 to 1e30 (overflow to inf / underflow to 0 in float16)
        scale = torch.pow(10.0, torch.empty(n).uniform_(-30, 30, generator=gen))
        a, b = a * scale, b * scale.flip(0)
    elif kind == "inf":
        a[torch.rand(n, generator=gen) < 0.1] = math.inf
        b[torch.rand(n, generator=gen) < 0.1] = -math.inf
    elif kind == "mostly_inf":  # the quantile itself is +inf (or inf - inf = NaN in the interpolation)
        a[torch.rand(n, generator=gen) < 0.8] = -math.inf
    elif kind == "nan":
        if n:
            a[torch.randint(0, n, (max(1, n // 50),), generator=gen)] = math.nan
    else:
        raise ValueError(kind)
    return a, b


KINDS = ("random", "ties", "zeros", "all_equal", "two_values", "crowded", "denormal", "wide", "inf",
         "mostly_inf", "nan")
# 0-2, primes, powers of two and one past them (block and histogram sizes), and one size past the
# points where an implementation may switch strategies (64 Ki, 128 Ki elements; see also
# test_sizes_around_strategy_switches).
SIZES = (0, 1, 2, 3, 5, 7, 31, 127, 128, 129, 255, 256, 257, 1025, 4097, 8191, 131073)
LARGE = 65536
PS = (0.0, 0.3, 0.999, 1.0)
ALPHAS = (0.0, 0.1, 1.0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def assert_same_thresholds(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == expected.shape
    both_nan = torch.isnan(got) & torch.isnan(expected)
    same = (got.view(torch.int32) == expected.view(torch.int32)) | both_nan
    assert bool(same.all()), f"thresholds differ:\n got      {got.tolist()}\n expected {expected.tolist()}"


def check_against_reference(updates, grads_nat, grads_adv, alpha: float, p: float) -> ck.MaskStats:
    """Run the CPU backend in place on ``updates`` and the reference on copies; require equal results."""
    expected_updates = [u.clone() for u in updates]
    exp_thr, exp_kept, exp_nonfinite = reference.rgp_mask_reference(expected_updates, grads_nat, grads_adv,
                                                                    alpha, p)
    ptrs = [u.data_ptr() for u in updates]
    got = ck.rgp_mask_(updates, grads_nat, grads_adv, alpha=alpha, p=p, backend="cpu")
    assert [u.data_ptr() for u in updates] == ptrs, "updates must be modified in place"
    assert_same_thresholds(got.thresholds, exp_thr)
    assert got.kept.dtype == torch.int64 and got.nonfinite.dtype == torch.int64
    assert torch.equal(got.kept, exp_kept), (got.kept, exp_kept)
    assert torch.equal(got.nonfinite, exp_nonfinite), (got.nonfinite, exp_nonfinite)
    for i, (u, e) in enumerate(zip(updates, expected_updates)):
        assert torch.equal(_bits(u), _bits(e)), f"tensor {i}: masked update differs from the reference"
    return got


def _case(kind: str, n: int, dtype: torch.dtype, gen: torch.Generator):
    a, b = gradients(kind, n, gen)
    update = torch.randn(n, generator=gen).to(dtype)
    return update, a.to(dtype), b.to(dtype)


# --- rgp_mask: one tensor ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_single_tensor_matches_reference(kind, dtype):
    gen = torch.Generator().manual_seed(KINDS.index(kind) * 10 + DTYPES.index(dtype))
    for i, n in enumerate(SIZES):
        # every (p, alpha) pair, spread over the sizes; plus a random pair for every size
        p, alpha = PS[i % len(PS)], ALPHAS[(i // len(PS)) % len(ALPHAS)]
        pairs = [(p, alpha), (float(torch.rand(1, generator=gen)), float(torch.rand(1, generator=gen)))]
        for p_, alpha_ in pairs[:1] if n >= LARGE else pairs:
            update, a, b = _case(kind, n, dtype, gen)
            check_against_reference([update], [a], [b], alpha_, p_)


@pytest.mark.parametrize("kind", ("random", "ties", "zeros", "crowded"))
def test_sizes_around_strategy_switches(kind):
    # csrc/cpu/rgp_mask_cpu.cpp: nth_element below 4096 elements, radix select above; a lone tensor of
    # 2^18 elements or more is split over the threads (with two or more threads), below it is not.
    gen = torch.Generator().manual_seed(20 + KINDS.index(kind))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for n in (4095, 4096, 4097, 2**18 - 1, 2**18):
            update, a, b = _case(kind, n, torch.float32, gen)
            check_against_reference([update], [a], [b], 0.1, 0.3)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("p", (0.0, 0.3, 0.5, 0.999, 1.0))
@pytest.mark.parametrize("alpha", (0.0, 0.1, 1.0, 0.7316))
def test_every_p_and_alpha_on_a_mid_sized_tensor(p, alpha):
    gen = torch.Generator().manual_seed(7)
    update, a, b = _case("random", 70001, torch.float32, gen)
    check_against_reference([update], [a], [b], alpha, p)


def test_nan_score_gives_nan_threshold_masks_nothing_and_is_counted():
    gen = torch.Generator().manual_seed(11)
    for n in (1, 300, 200003):
        a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        a[n // 3] = math.nan
        b[n // 2] = math.inf
        update = torch.randn(n, generator=gen)
        before = update.clone()
        stats = check_against_reference([update], [a], [b], 0.1, 0.3)
        assert math.isnan(stats.thresholds[0].item())
        assert torch.equal(update, before)
        assert stats.kept.item() == n
        assert stats.nonfinite.item() == (1 if n // 3 == n // 2 else 2)


def test_zero_times_inf_is_nan_like_torch():
    # alpha = 0 multiplies |g_nat| = inf by 0: the score is NaN, exactly as in the reference.
    a = torch.tensor([math.inf, 1.0, 2.0, 3.0])
    b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    stats = check_against_reference([torch.ones(4)], [a], [b], 0.0, 0.5)
    assert math.isnan(stats.thresholds[0].item()) and stats.nonfinite.item() == 1


def test_quantile_at_infinity():
    # v[k] finite, v[k+1] = +inf: numpy gives +inf (gamma > 0) or NaN (gamma = 0); all-inf gives NaN.
    finite = torch.arange(1.0, 5.0)
    for grads in (torch.cat([finite, torch.full((4,), math.inf)]), torch.full((5,), math.inf)):
        for p in (0.0, 0.3, 0.5, 0.55, 0.999, 1.0):
            check_against_reference([torch.ones(grads.numel())], [grads], [torch.zeros_like(grads)], 1.0, p)


def test_ties_at_the_threshold_are_kept():
    g = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    update = torch.full((5,), 7.0)
    stats = check_against_reference([update], [g], [g], 0.5, 0.5)
    assert stats.thresholds.item() == 2.0
    assert update.tolist() == [0.0, 7.0, 7.0, 7.0, 7.0] and stats.kept.item() == 4


def test_update_aliasing_a_gradient():
    # The update may be the very tensor a score is read from: scores are those of the inputs.
    gen = torch.Generator().manual_seed(3)
    for n in (1000, 150001):
        a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        expected = a.clone()
        exp = reference.rgp_mask_reference([expected], [a.clone()], [b], 0.3, 0.4)
        got = ck.rgp_mask_([a], [a], [b], alpha=0.3, p=0.4, backend="cpu")
        assert_same_thresholds(got.thresholds, exp[0])
        assert torch.equal(_bits(a), _bits(expected))


# --- rgp_mask: lists of tensors ---------------------------------------------------------------------

def test_many_tiny_tensors_next_to_one_large():
    gen = torch.Generator().manual_seed(5)
    sizes = [1, 2, 3, 0, 5] * 12 + [300007] + [64, 7, 0, 129] * 5
    cases = [_case(KINDS[i % len(KINDS)], n, DTYPES[i % 3], gen) for i, n in enumerate(sizes)]
    updates, nat, adv = (list(x) for x in zip(*cases))
    check_against_reference(updates, nat, adv, 0.1, 0.3)


def test_one_tensor_dominates_the_list():
    # One tensor holding most of the elements (a backend may then split it across threads).
    gen = torch.Generator().manual_seed(6)
    for kind in ("random", "ties", "zeros", "crowded", "nan"):
        cases = [_case(kind, 400009, torch.float32, gen), _case("random", 1000, torch.bfloat16, gen),
                 _case("random", 70000, torch.float16, gen)]
        updates, nat, adv = (list(x) for x in zip(*cases))
        check_against_reference(updates, nat, adv, 0.2, 0.3)


def test_resnet_like_mix_of_sizes_and_dtypes():
    gen = torch.Generator().manual_seed(8)
    sizes = [1728, 64, 64, 36864, 36864, 64, 64, 73728, 128, 8192, 147456, 256, 32768, 294912, 512, 5120, 10]
    for dtype in DTYPES:
        cases = [_case("random", n, dtype, gen) for n in sizes]
        updates, nat, adv = (list(x) for x in zip(*cases))
        check_against_reference(updates, nat, adv, 0.1, 0.3)


def test_concurrent_callers_from_python_threads():
    # The split path shares scratch buffers between its OpenMP threads; two Python threads masking large
    # tensors at the same time must still each get the exact result.
    import threading

    gen = torch.Generator().manual_seed(12)
    cases = [_case(kind, 300007, torch.float32, gen) for kind in ("random", "crowded", "ties", "zeros")]
    expected = []
    for update, a, b in cases:
        e = update.clone()
        expected.append((e, reference.rgp_mask_reference([e], [a], [b], 0.1, 0.3)[0]))
    results = [None] * len(cases)

    def run(i):
        update, a, b = cases[i]
        results[i] = ck.rgp_mask_([update], [a], [b], alpha=0.1, p=0.3, backend="cpu").thresholds

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (update, _, _), (e, thr), got in zip(cases, expected, results):
        assert_same_thresholds(got, thr)
        assert torch.equal(_bits(update), _bits(e))


def test_results_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(9)
    sizes = [5, 1000, 65537, 200003, 3, 131073, 0, 17]
    cases = [_case(KINDS[i % len(KINDS)], n, torch.float32, gen) for i, n in enumerate(sizes)]
    threads = torch.get_num_threads()
    outputs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            updates = [c[0].clone() for c in cases]
            stats = check_against_reference(updates, [c[1] for c in cases], [c[2] for c in cases], 0.1, 0.3)
            outputs.append((stats, updates))
    finally:
        torch.set_num_threads(threads)
    for stats, updates in outputs[1:]:
        assert_same_thresholds(stats.thresholds, outputs[0][0].thresholds)
        assert all(torch.equal(_bits(u), _bits(v)) for u, v in zip(updates, outputs[0][1]))


def test_non_contiguous_inputs_are_masked_in_place():
    gen = torch.Generator().manual_seed(10)
    base = torch.randn(400, 300, generator=gen)
    update = base[:, ::3]                                  # strided view into a larger buffer
    nat = torch.randn(300, 400, generator=gen).t()[:, ::3]  # transposed and strided
    adv = torch.randn(400, 100, generator=gen)
    outside = base[:, 1::3].clone(), base[:, 2::3].clone()
    small_update = torch.randn(9, 4, generator=gen).t()
    small_nat, small_adv = torch.randn(4, 9, generator=gen), torch.randn(9, 4, generator=gen).t()
    half_update = torch.randn(64, 70, generator=gen).half()[::2, 1::2]
    half_nat = torch.randn(32, 35, 2, generator=gen).half()[..., 0]
    half_adv = torch.randn(35, 32, generator=gen).half().t()
    check_against_reference([update, small_update, half_update], [nat, small_nat, half_nat],
                            [adv, small_adv, half_adv], 0.1, 0.3)
    assert torch.equal(base[:, 1::3], outside[0]) and torch.equal(base[:, 2::3], outside[1])


def test_tensor_above_two_to_the_24_matches_numpy_quantile():
    # torch.quantile refuses inputs this large; numpy.quantile is the definition. Gradients rounded
    # through bfloat16 make heavy ties (at most 2^15 distinct magnitudes with alpha = 1).
    n = 2**24 + 3
    gen = torch.Generator().manual_seed(12)
    nat = torch.randn(n, generator=gen).bfloat16().float()
    adv = torch.randn(n, generator=gen)
    update = torch.randn(n, generator=gen)
    for alpha, p in ((1.0, 0.3), (0.1, 0.999)):
        scores = reference.rgp_scores(nat, adv, alpha)
        thr = np.float32(np.quantile(scores.numpy(), p))
        below = scores < torch.tensor(thr)
        expected = update.masked_fill(below, 0)
        stats = ck.rgp_mask_([update], [nat], [adv], alpha=alpha, p=p, backend="cpu")
        assert stats.thresholds[0].view(torch.int32).item() == torch.tensor(thr).view(torch.int32).item()
        assert stats.kept.item() == n - int(below.sum()) and stats.nonfinite.item() == 0
        assert torch.equal(_bits(update), _bits(expected))
        update = expected


_SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-40, -1e-45, 3e38, -3e38, 65504.0, 6e-8, 1e-30, 1e30,
            math.inf, -math.inf, math.nan]
_values = st.one_of(st.sampled_from(_SPECIAL), st.floats(-1e6, 1e6, allow_nan=False, width=32))
_fraction = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.3, 0.999]), st.floats(0.0, 1.0))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_matches_reference(data):
    count = data.draw(st.integers(1, 4), label="tensors")
    updates, nat, adv = [], [], []
    for _ in range(count):
        n = data.draw(st.integers(0, 300), label="n")
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        pool = data.draw(st.lists(_values, min_size=1, max_size=6), label="pool")  # few values: ties
        seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
        pick = torch.randint(0, len(pool), (2, n), generator=torch.Generator().manual_seed(seed))
        values = torch.tensor(pool, dtype=torch.float32)[pick]
        updates.append(torch.arange(n, dtype=torch.float32).add(1).to(dtype))
        nat.append(values[0].to(dtype))
        adv.append(values[1].to(dtype))
    alpha = data.draw(_fraction, label="alpha")
    p = data.draw(_fraction, label="p")
    check_against_reference(updates, nat, adv, alpha, p)


# --- revise ------------------------------------------------------------------------------------------

def _assert_same_values(got: torch.Tensor, expected: torch.Tensor) -> None:
    both_nan = torch.isnan(got) & torch.isnan(expected)
    same = (_bits(got) == _bits(expected)) | both_nan
    assert bool(same.all()), "revision differs from the reference"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decay", (0.0, 0.5, 0.999, 1.0, 0.123456789))
def test_revise_matches_reference(dtype, decay):
    gen = torch.Generator().manual_seed(13)
    sizes = (0, 1, 2, 3, 127, 129, 32767, 32769, 70001, 5)
    revision = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    revision[4][:3] = torch.tensor([math.inf, math.nan, 1e-40]).to(dtype)
    params[4][:3] = torch.tensor([1.0, 2.0, -1e-40]).to(dtype)
    params[5][0] = -math.inf
    expected = [r.clone() for r in revision]
    reference.revise_reference(expected, params, decay)
    ptrs = [r.data_ptr() for r in revision]
    ck.revise_(revision, params, decay=decay, backend="cpu")
    assert [r.data_ptr() for r in revision] == ptrs
    for r, e in zip(revision, expected):
        assert r.dtype == dtype
        _assert_same_values(r, e)


def test_revise_non_contiguous_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(14)
    base = torch.randn(50, 60, generator=gen)
    revision = [base[:, ::2], torch.randn(70, 3, generator=gen).bfloat16().t(), torch.randn(100, generator=gen).half()]
    params = [torch.randn(60, 50, generator=gen).t()[:, ::2], torch.randn(3, 70, generator=gen).bfloat16(),
              torch.randn(200, generator=gen).half()[::2]]
    untouched = base[:, 1::2].clone()
    expected = [r.clone() for r in revision]
    reference.revise_reference(expected, params, 0.9)
    ck.revise_(revision, params, decay=0.9, backend="cpu")
    for r, e in zip(revision, expected):
        _assert_same_values(r, e)
    assert torch.equal(base[:, 1::2], untouched)


# --- the sampling bracket of the selection (csrc/cpu/select_cpu.cpp, docs/selection.md) ---------------

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bracket_hit_rate import BRACKET_MIN, bracket_keys, bracket_outcome, sample_index  # noqa: E402

PATHS = ("empty", "direct", "bracket", "fallback", "nonfinite")
APPLIES = ("classes", "scores")


def _path_counts() -> dict[str, int]:
    return dict(zip(PATHS, torch.ops.cure.cpu_selection_counters(True).tolist()))


def _apply_counts() -> dict[str, int]:
    return dict(zip(APPLIES, torch.ops.cure.cpu_apply_counters(True).tolist()))


def predicted_apply(scores: torch.Tensor, p: float, threshold: float) -> str | None:
    """How the CPU kernels' apply pass decides s < thr for one tensor (select_cpu.h, Classes): None where the
    threshold masks nothing (NaN or 0), "classes" where the bracket hit and lo <= thr <= hi with thr > lo or no
    key below lo, else "scores" (recomputed from g_nat and g_adv)."""
    if not threshold > 0:
        return None
    if bracket_outcome(scores, p)[0] != "bracket":
        return "scores"
    lo, hi, below, _, _ = bracket_keys(scores, p)
    t = int(torch.tensor([threshold], dtype=torch.float32).view(torch.int32)) & 0xFFFFFFFF
    return "classes" if lo <= t <= hi and (t > lo or below == 0) else "scores"


def _expected_applies(nats, advs, alpha, p, thresholds) -> dict[str, int]:
    applies = [predicted_apply(reference.rgp_scores(x, y, alpha).reshape(-1), p, float(t))
               for x, y, t in zip(nats, advs, thresholds)]
    return {k: applies.count(k) for k in APPLIES}


def bracket_gradients(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (with alpha = 0.5 in mind) built to defeat the sampling bracket in the named way."""
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    sampled = torch.zeros(n, dtype=torch.bool)
    sampled[sample_index(n)] = True
    if kind == "random":
        pass
    elif kind == "all_equal":
        a, b = torch.full((n,), 0.75), torch.full((n,), -0.25)
    elif kind == "ties_at_lo":  # four values: the bracket's lo is one of them, with a run of copies
        a = torch.randint(0, 4, (n,), generator=gen).float()
        b = a.clone()
    elif kind == "run_straddling_k":  # half of the scores equal, covering ranks 0.1 n .. 0.6 n
        s = torch.rand(n, generator=gen)
        s = torch.where(s < 0.1, s, torch.where(s < 0.6, torch.tensor(0.5), s + 1.0))
        a, b = s, s
    elif kind in ("zeros30", "zeros80"):
        keep = torch.rand(n, generator=gen) < (0.7 if kind == "zeros30" else 0.2)
        a, b = a * keep, b * keep
    elif kind == "nan":
        a[torch.randint(0, n, (3,), generator=gen)] = math.nan
    elif kind == "inf":  # +inf scores (legal keys), 40 %: the quantile's neighbours may be inf
        a[torch.rand(n, generator=gen) < 0.4] = math.inf
    elif kind == "sorted":
        a = torch.sort(a.abs()).values
        b = a.clone()
    elif kind == "sample_small":  # the sampled tiles hold tiny scores, the rest is large: ranks above hi
        a = torch.where(sampled, a * 1e-3, a + 10.0)
        b = a.clone()
    elif kind == "sample_large":  # the sampled tiles hold huge scores: ranks below lo
        a = torch.where(sampled, a + 1e6, a)
        b = a.clone()
    elif kind == "two_values":
        a = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, 1024.0)
        b = a.clone()
    elif kind == "denormal":
        a, b = a * 1e-40, b * 1e-41
    elif kind == "overflow":  # the sample is uniform on [0, 1); the rest crowds inside the bracket
        u = torch.rand(n, generator=gen)
        a = torch.where(sampled, u, 0.3 + 1e-4 * u)
        b = a.clone()
    else:
        raise ValueError(kind)
    return a, b


BRACKET_KINDS = ("random", "all_equal", "ties_at_lo", "run_straddling_k", "zeros30", "zeros80", "nan", "inf",
                 "sorted", "sample_small", "sample_large", "two_values", "denormal", "overflow")
# Kinds whose outcome is known by construction (the others depend on the draw; the mirror predicts them).
EXPECTED_PATH = {"random": "bracket", "all_equal": "bracket", "zeros30": "bracket", "zeros80": "bracket",
                 "nan": "nonfinite", "sample_small": "fallback", "sample_large": "fallback", "overflow": "fallback"}


def _sgd_lists(nat, adv, gen):
    n = nat.numel()
    return [torch.randn(n, generator=gen), torch.randn(n, generator=gen), nat, adv,
            0.1 * torch.randn(n, generator=gen), torch.randn(n, generator=gen)]


def check_sgd_step_against_reference(lists, alpha, p, **kw) -> ck.MaskStats:
    expected = [[t.clone() for t in ts] for ts in lists]
    common = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3, "alpha": alpha, "p": p, **kw}
    exp = ck.rgp_sgd_step_(expected[0], expected[1], expected[2], expected[3], expected[4], revision=expected[5],
                           decay=0.99, backend="reference", **common)
    got = ck.rgp_sgd_step_(lists[0], lists[1], lists[2], lists[3], lists[4], revision=lists[5], decay=0.99,
                           backend="cpu", **common)
    assert_same_thresholds(got.thresholds, exp.thresholds)
    assert torch.equal(got.kept, exp.kept) and torch.equal(got.nonfinite, exp.nonfinite)
    for name, i in (("params", 0), ("grads", 1), ("momentum_buffers", 4), ("revision", 5)):
        for j, (x, y) in enumerate(zip(lists[i], expected[i])):
            same = (_bits(x) == _bits(y)) | (torch.isnan(x) & torch.isnan(y))
            assert bool(same.all()), f"{name}[{j}] differs from the reference"
    return got


@pytest.mark.parametrize("layout", ["alone", "with_peer"])
@pytest.mark.parametrize("kind", BRACKET_KINDS)
def test_bracket_defeating_inputs_are_exact_and_take_the_predicted_path(kind, layout):
    """Exact for both ops whatever the bracket does; the path each tensor took (bracket hit, radix fallback
    after a miss, NaN) is the one the Python mirror of the algorithm predicts, and where the construction
    decides it, the intended one. "alone" splits the tensor over two threads, "with_peer" does not."""
    gen = torch.Generator().manual_seed(100 + BRACKET_KINDS.index(kind))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, p in ((BRACKET_MIN, 0.3), (BRACKET_MIN + 1, 0.5), (300007, 0.3)):
            a, b = bracket_gradients(kind, n, gen)
            nats, advs = [a], [b]
            if layout == "with_peer":
                nats.append(torch.randn(n, generator=gen))
                advs.append(torch.randn(n, generator=gen))
            predicted = [bracket_outcome(reference.rgp_scores(x, y, 0.5).reshape(-1), p)[0] for x, y in zip(nats, advs)]
            if kind in EXPECTED_PATH:
                assert predicted[0] == EXPECTED_PATH[kind], (n, predicted)
            _path_counts()
            _apply_counts()
            stats = check_against_reference([torch.randn(n, generator=gen) for _ in nats], nats, advs, 0.5, p)
            counts = _path_counts()
            assert counts == {k: predicted.count(k) for k in PATHS}, (n, counts, predicted)
            # The apply pass decided each tensor from the bracket's classes exactly where they decide it.
            assert _apply_counts() == _expected_applies(nats, advs, 0.5, p, stats.thresholds), n
            for skip in (None, torch.tensor(0.0)):  # applied right after each selection / after all of them
                stats = check_sgd_step_against_reference([[t] for t in _sgd_lists(a, b, gen)], 0.5, p,
                                                         mask_mode="update", skip=skip)
                assert _path_counts()[predicted[0]] == 1
                assert _apply_counts() == _expected_applies([a], [b], 0.5, p, stats.thresholds), n
    finally:
        torch.set_num_threads(threads)


def test_apply_pass_takes_the_classes_only_where_they_decide_the_threshold():
    """Random scores: the bracket's classes decide every element. A run of equal scores straddling rank k
    with scores below it: thr == lo with keys below lo, which the classes (key <= lo) cannot tell apart,
    so the apply pass recomputes the scores; both exact."""
    gen = torch.Generator().manual_seed(77)
    n = 300007
    # zeros30 at p = 0.31: lo is the zero key (no key below it), thr > 0: every zero is masked.
    for kind, p, expected in (("random", 0.3, "classes"), ("run_straddling_k", 0.3, "scores"),
                              ("zeros30", 0.31, "classes")):
        a, b = bracket_gradients(kind, n, gen)
        _apply_counts()
        stats = check_against_reference([torch.randn(n, generator=gen)], [a], [b], 0.5, p)
        scores = reference.rgp_scores(a, b, 0.5)
        assert predicted_apply(scores, p, float(stats.thresholds[0])) == expected, kind
        assert _apply_counts() == {k: int(k == expected) for k in APPLIES}, kind
        if kind == "zeros30":
            assert bracket_keys(scores, p)[0] == 0 and float(stats.thresholds[0]) > 0


@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_classes_across_apply_chunks_and_thread_slices(threads, dtype):
    """Sizes around the apply chunk (2^15) and the slices of a tensor split over the threads (multiples of
    it), one of them split, for every dtype: bit for bit the reference, decided from the classes."""
    gen = torch.Generator().manual_seed(78 + threads)
    sizes = (1 << 16, (1 << 16) + 1, 3 * (1 << 15) - 1, 3 * (1 << 15) + 63, 1 << 20 | 5)
    nats = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    advs = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _apply_counts()
        check_against_reference([torch.randn(n, generator=gen).to(dtype) for n in sizes], nats, advs, 0.3, 0.3)
        assert _apply_counts() == {"classes": len(sizes), "scores": 0}
        for skip in (None, torch.tensor(0.0)):
            lists = [[torch.randn(n, generator=gen).to(dtype) for n in sizes], [torch.randn(n, generator=gen).to(dtype)
                     for n in sizes], nats, advs, [torch.randn(n, generator=gen).to(dtype) for n in sizes],
                     [torch.randn(n, generator=gen).to(dtype) for n in sizes]]
            check_sgd_step_against_reference(lists, 0.3, 0.3, mask_mode="grad", skip=skip)
            assert _apply_counts() == {"classes": len(sizes), "scores": 0}
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("p", (0.0, 1e-6, 0.3, 0.999, 1.0))
def test_bracket_at_extreme_quantiles(p):
    # Clamped sample ranks open the bracket at one end (lo = key 0 or hi = the largest key).
    gen = torch.Generator().manual_seed(30)
    for kind in ("random", "zeros80", "two_values"):
        a, b = bracket_gradients(kind, 200003, gen)
        check_against_reference([torch.randn(200003, generator=gen)], [a], [b], 0.5, p)


# --- rgp_sgd_step ---------------------------------------------------------------------------------------

SGD_SIZES = (0, 1, 2, 13, 257, 4097, 65537, 300007)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
@pytest.mark.parametrize("skip", [None, 0.0, 1.0, math.nan, "nan_score"])
def test_sgd_step_matches_reference(dtype, mask_mode, skip):
    gen = torch.Generator().manual_seed(40 + DTYPES.index(dtype))
    lists = [[] for _ in range(6)]
    for i, n in enumerate(SGD_SIZES):
        a, b = gradients(KINDS[i % 8], n, gen)  # "nan" is KINDS[10]: not drawn here
        for ts, t in zip(lists, _sgd_lists(a, b, gen)):
            ts.append(t.to(dtype))
    kw = {}
    if skip == "nan_score":
        lists[2][5][7] = math.nan
        kw["skip"] = torch.tensor(False)
    elif skip is not None:
        kw["skip"] = torch.tensor(skip)
    for revise in (False, True):
        run = [[t.clone() for t in ts] for ts in lists]
        if not revise:
            before = [t.clone() for t in run[5]]
        got = check_sgd_step_against_reference(run, 0.1, 0.3, mask_mode=mask_mode, **kw) if revise else None
        if not revise:
            expected = [[t.clone() for t in ts] for ts in run]
            exp = ck.rgp_sgd_step_(*expected[:5], lr=0.1, momentum=0.9, weight_decay=5e-3, alpha=0.1, p=0.3,
                                   mask_mode=mask_mode, backend="reference", **kw)
            got = ck.rgp_sgd_step_(*run[:5], lr=0.1, momentum=0.9, weight_decay=5e-3, alpha=0.1, p=0.3,
                                   mask_mode=mask_mode, backend="cpu", **kw)
            assert_same_thresholds(got.thresholds, exp.thresholds)
            assert torch.equal(got.kept, exp.kept)
            for i in range(5):
                assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(run[i], expected[i]))
            assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(run[5], before))
        # with skip given, a non-finite score anywhere (float16 overflow in "wide") skips the step too
        skipped = skip is not None and (skip != 0.0 or int(got.nonfinite.sum()) > 0)
        moved = any(not torch.equal(x, y) for x, y in zip(run[0], lists[0]))
        assert moved != skipped
        assert int(got.kept.sum()) < sum(SGD_SIZES)


@pytest.mark.parametrize("hyper", [{"p": 0.0, "momentum": 0.0, "weight_decay": 0.0},
                                   {"p": 1.0, "lr": 1.0, "alpha": 1.0},
                                   {"p": 0.999, "momentum": 1.0, "alpha": 0.0, "lr": 0.0}])
def test_sgd_step_at_extreme_hyperparameters(hyper):
    gen = torch.Generator().manual_seed(50)
    lists = [[t.bfloat16() for t in ts] for ts in zip(*[_sgd_lists(*gradients("ties", n, gen), gen)
                                                        for n in (2, 77, 70001)])]
    lists = [list(ts) for ts in lists]
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3, "alpha": 0.1, "p": 0.3, **hyper}
    alpha, p = kw.pop("alpha"), kw.pop("p")
    expected = [[t.clone() for t in ts] for ts in lists]
    exp = ck.rgp_sgd_step_(*expected[:5], revision=expected[5], decay=0.0, alpha=alpha, p=p, mask_mode="update",
                           backend="reference", **kw)
    got = ck.rgp_sgd_step_(*lists[:5], revision=lists[5], decay=0.0, alpha=alpha, p=p, mask_mode="update",
                           backend="cpu", **kw)
    assert_same_thresholds(got.thresholds, exp.thresholds)
    for i in range(6):
        assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(lists[i], expected[i]))


def test_sgd_step_mixed_dtypes_non_contiguous_and_aliased_gradients():
    gen = torch.Generator().manual_seed(51)
    dtypes = [torch.float32, torch.float16, torch.float32, torch.bfloat16]
    shapes = [(300, 400), (9, 7), (700, 300), (50, 41)]

    def tensor(i):  # transposed (non-contiguous) 2-D tensors of each dtype
        return torch.randn(*shapes[i], generator=gen).to(dtypes[i]).t()

    lists = [[tensor(i) for i in range(4)] for _ in range(6)]
    lists[1][3] = lists[3][3]  # the update gradient is the adversarial gradient itself
    assert not any(t.is_contiguous() for ts in lists for t in ts)
    originals = [list(ts) for ts in lists]
    check_sgd_step_against_reference(lists, 0.1, 0.3, mask_mode="grad")
    assert all(a is b for ts, os in zip(lists, originals) for a, b in zip(ts, os))


def test_sgd_step_above_two_to_the_24_elements():
    n = 2**24 + 5
    gen = torch.Generator().manual_seed(52)
    nat = torch.randn(n, generator=gen).bfloat16().float()
    lists = [[t] for t in _sgd_lists(nat, torch.randn(n, generator=gen), gen)]
    check_sgd_step_against_reference(lists, 1.0, 0.3, mask_mode="update")


def test_sgd_step_bad_arguments_reach_the_kernel_checks():
    lists = [[torch.zeros(4)] for _ in range(5)]
    op = torch.ops.cure.rgp_sgd_step
    with pytest.raises(RuntimeError, match="mask_mode must be 'grad' or 'update'"):
        op(*lists, [], 0.1, 0.9, 0.0, 0.1, 0.3, "weights", 0.0, None)
    with pytest.raises(RuntimeError, match="momentum_buffers"):
        op(*lists[:4], [], [], 0.1, 0.9, 0.0, 0.1, 0.3, "grad", 0.0, None)
    with pytest.raises(RuntimeError, match="grads_adv\\[0\\] has shape"):
        op(*lists[:3], [torch.zeros(5)], lists[4], [], 0.1, 0.9, 0.0, 0.1, 0.3, "grad", 0.0, None)
    with pytest.raises(RuntimeError, match="skip must be a one-element"):
        op(*lists, [], 0.1, 0.9, 0.0, 0.1, 0.3, "grad", 0.0, torch.zeros(2))
