"""rgp_mask_: the public API, exactness of every backend that can run here, and bad input."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rgp_cases import DTYPES, KINDS, assert_matches_reference, bitwise_equal_f32, make_case

import cure_kernels as ck
from cure_kernels import reference

# numpy warns about inf - inf inside numpy.quantile (called by the reference) and Triton's interpreter
# about the same arithmetic: the NaN it yields is part of the specification these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

FAST_BACKENDS = [b for b in ck.available_backends("cpu") if b != "reference"]
if torch.cuda.is_available():
    FAST_BACKENDS += [f"{b}@cuda" for b in ck.available_backends("cuda") if b != "reference"]
SIZES = (1, 2, 3, 7, 31, 127, 128, 129, 1023, 1025, 4099)
ALPHAS = (0.0, 0.1, 1.0)
PS = (0.0, 0.3, 0.999, 1.0)


def _split(backend: str) -> tuple[str, str]:
    name, _, device = backend.partition("@")
    return name, device or "cpu"


def _inputs(kind: str, sizes, dtype: torch.dtype, seed: int, device: str):
    gen = torch.Generator().manual_seed(seed)
    nat, adv = zip(*(make_case(kind, n, gen) for n in sizes))
    nat = [t.to(device=device, dtype=dtype) for t in nat]
    adv = [t.to(device=device, dtype=dtype) for t in adv]
    updates = [torch.randn(n, generator=gen).to(device=device, dtype=dtype) for n in sizes]
    return updates, nat, adv


# --- the oracle itself ----------------------------------------------------------------------------
def test_scores_are_rounded_like_numpy_float32():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    for alpha in (0.1, 0.3, 1 / 3, 0.7):
        expected = np.float32(alpha) * np.abs(a.numpy()) + np.float32(1 - alpha) * np.abs(b.numpy())
        assert bitwise_equal_f32(reference.rgp_scores(a, b, alpha), torch.from_numpy(expected))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", (1, 2, 5, 100, 1001))
def test_written_out_formula_equals_numpy_quantile(kind, n):
    """The formula of docs/method.md section 2 from the k-th and (k+1)-th order statistics reproduces numpy exactly."""
    gen = torch.Generator().manual_seed(n)
    a, b = make_case(kind, n, gen)
    s = reference.rgp_scores(a, b, 0.3).numpy()
    v = np.sort(s)
    for p in (0.0, 0.3, 0.5, 0.999, 1.0, random.Random(n).random()):
        h = (n - 1) * p
        k = math.floor(h)
        lo, hi = (v[-1], v[-1]) if k >= n - 1 else (v[k], v[k + 1])
        got = reference.threshold_from_order_statistics(lo, hi, n, p)
        if np.isnan(s).any():
            got = math.nan
        with np.errstate(invalid="ignore"):
            expected = np.float32(np.quantile(s, p))
        assert bitwise_equal_f32(torch.tensor([got]), torch.tensor([expected])), (p, got, expected)


def test_reference_masks_below_threshold_and_keeps_ties():
    upd = [torch.arange(1.0, 11.0)]
    g = torch.tensor([1.0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    stats = ck.rgp_mask_(upd, [g], [g], alpha=0.5, p=0.3, backend="reference")
    # sorted scores 1,1,1,2,... ; h = 2.7 -> between v[2]=1 and v[3]=2 -> 1.7; the three 1s are masked.
    assert stats.thresholds.tolist() == [pytest.approx(1.7)]
    assert upd[0].tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 9, 10]
    assert stats.kept.tolist() == [7] and stats.nonfinite.tolist() == [0]
    upd = [torch.ones(4)]
    g = torch.full((4,), 2.0)
    stats = ck.rgp_mask_(upd, [g], [g], alpha=0.5, p=0.9, backend="reference")
    assert upd[0].tolist() == [1, 1, 1, 1] and stats.kept.tolist() == [4]  # all tied: nothing below


def test_nan_score_masks_nothing_and_is_counted():
    upd = [torch.ones(5)]
    g = torch.tensor([1.0, math.nan, 3, 4, 5])
    stats = ck.rgp_mask_(upd, [g], [torch.zeros(5)], alpha=1.0, p=0.5, backend="reference")
    assert math.isnan(stats.thresholds.item()) and stats.nonfinite.tolist() == [1]
    assert upd[0].tolist() == [1, 1, 1, 1, 1]


# --- every fast backend against the oracle --------------------------------------------------------
needs_fast = pytest.mark.skipif(not FAST_BACKENDS, reason="no fast backend can run here (build the extension)")


@needs_fast
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_exact_on_pathological_inputs(backend, kind, dtype):
    name, device = _split(backend)
    rng = random.Random(f"{kind}{dtype}")
    # Every alpha meets several p and every p several alpha, without the full cross product.
    alphas = ALPHAS + (rng.random(),)
    ps = PS + (rng.random(),)
    pairs = [(alphas[i % len(alphas)], ps[(i + shift) % len(ps)]) for shift in (0, 2) for i in range(len(ps))]
    for alpha, p in pairs:
        updates, nat, adv = _inputs(kind, SIZES, dtype, seed=rng.randrange(10**6), device=device)
        assert_matches_reference(name, updates, nat, adv, alpha, p)


@needs_fast
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_exact_on_many_tiny_tensors_next_to_a_large_one(backend):
    name, device = _split(backend)
    sizes = [1, 0, 2, 3, 5, 1, 1, 7, 0, 11] * 4 + [40_009]
    updates, nat, adv = _inputs("random", sizes, torch.float32, seed=3, device=device)
    assert_matches_reference(name, updates, nat, adv, alpha=0.1, p=0.3)


@needs_fast
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_exact_on_mixed_dtypes_and_empty_tensors(backend):
    name, device = _split(backend)
    gen = torch.Generator().manual_seed(5)
    updates, nat, adv = [], [], []
    for n, dtype in [(0, torch.float32), (300, torch.float16), (1, torch.bfloat16), (513, torch.float32),
                     (0, torch.bfloat16), (64, torch.bfloat16)]:
        a, b = make_case("random", n, gen)
        nat.append(a.to(device, dtype))
        adv.append(b.to(device, dtype))
        updates.append(torch.randn(n, generator=gen).to(device, dtype))
    stats = assert_matches_reference(name, updates, nat, adv, alpha=0.2, p=0.4)
    assert math.isnan(stats.thresholds[0].item()) and stats.kept[0].item() == 0


@needs_fast
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_exact_on_non_contiguous_inputs(backend):
    name, device = _split(backend)
    gen = torch.Generator().manual_seed(7)
    base_u = torch.randn(37, 29, generator=gen).to(device)
    base_a = torch.randn(29, 37, generator=gen).to(device)
    base_b = torch.randn(37, 58, generator=gen).to(device)
    updates = [base_u, torch.randn(64, 33, generator=gen).to(device)[:, ::3]]
    updates[0] = base_u.t().contiguous().t()  # transposed layout, same shape
    nat = [base_a.t(), torch.randn(64, 11, generator=gen).to(device)]
    adv = [base_b[:, ::2], torch.randn(11, 64, generator=gen).to(device).t()]
    assert not updates[1].is_contiguous() and not nat[0].is_contiguous() and not adv[0].is_contiguous()
    before = updates[1].data_ptr()
    assert_matches_reference(name, updates, nat, adv, alpha=0.1, p=0.3)
    assert updates[1].data_ptr() == before  # modified in place, not replaced


@needs_fast
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_backend_exact_property(backend, data):
    name, device = _split(backend)
    sizes = data.draw(st.lists(st.integers(0, 600), min_size=1, max_size=6))
    dtype = data.draw(st.sampled_from(DTYPES))
    kind = data.draw(st.sampled_from(KINDS))
    alpha = data.draw(st.floats(0, 1))
    p = data.draw(st.floats(0, 1))
    updates, nat, adv = _inputs(kind, sizes, dtype, seed=data.draw(st.integers(0, 2**31)), device=device)
    assert_matches_reference(name, updates, nat, adv, alpha, p)


# --- API contract -----------------------------------------------------------------------------
def test_available_backends_always_has_reference():
    assert ck.available_backends()[0] == "reference"
    assert set(ck.available_backends()) <= set(ck.BACKENDS)


def test_empty_list_returns_empty_stats():
    stats = ck.rgp_mask_([], [], [], alpha=0.1, p=0.3)
    assert stats.thresholds.shape == (0,) and stats.kept.shape == (0,) and stats.nonfinite.shape == (0,)


def _valid():
    return [torch.randn(5)], [torch.randn(5)], [torch.randn(5)]


@pytest.mark.parametrize(("kwargs", "exc", "words"), [
    ({"alpha": 1.5}, ValueError, "alpha"),
    ({"alpha": -0.1}, ValueError, "alpha"),
    ({"alpha": math.nan}, ValueError, "alpha"),
    ({"p": 2.0}, ValueError, "p must"),
    ({"p": math.inf}, ValueError, "p must"),
    ({"p": "0.3"}, TypeError, "p must"),
    ({"p": True}, TypeError, "p must"),
    ({"p": torch.tensor(0.3)}, TypeError, "float(p)"),
    ({"backend": "gpu"}, ValueError, "unknown backend 'gpu'"),
])
def test_bad_scalars_are_named(kwargs, exc, words):
    upd, nat, adv = _valid()
    before = upd[0].clone()
    args = {"alpha": 0.1, "p": 0.3} | kwargs
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        ck.rgp_mask_(upd, nat, adv, **args)
    assert torch.equal(upd[0], before)


def _r(*shape, dtype=torch.float32, **kw):
    return torch.randn(*shape, **kw).to(dtype)


# Each case: (updates, grads_nat, grads_adv) whose entry 0 is valid and a later entry is wrong.
BAD_LISTS = {
    "lengths": (lambda: ([_r(4), _r(5)], [_r(4), _r(5)], [_r(4)]), ValueError, "equal lengths"),
    "shape": (lambda: ([_r(4), _r(5)], [_r(4), _r(6)], [_r(4), _r(5)]), ValueError,
              r"grads_nat\[1\] has shape \(6,\) but updates\[1\] has shape \(5,\)"),
    "float64": (lambda: ([_r(4), _r(5)], [_r(4), _r(5)], [_r(4), _r(5, dtype=torch.float64)]), TypeError,
                r"grads_adv\[1\] has dtype torch.float64; supported dtypes are float32, bfloat16, float16"),
    "dtype_mismatch": (lambda: ([_r(4), _r(5)], [_r(4), _r(5, dtype=torch.half)], [_r(4), _r(5)]), TypeError,
                       r"grads_nat\[1\] has dtype torch.float16 but updates\[1\] has dtype torch.float32"),
    "integer": (lambda: ([_r(4), torch.arange(5)], [_r(4), _r(5)], [_r(4), _r(5)]), TypeError,
                r"updates\[1\] has dtype torch.int64"),
    "not_a_list": (lambda: (_r(4), [_r(4)], [_r(4)]), TypeError, "sequence of tensors"),
    "not_a_tensor": (lambda: ([_r(4), _r(5)], [_r(4), 5.0], [_r(4), _r(5)]), TypeError,
                     r"grads_nat\[1\] must be a torch.Tensor"),
    "requires_grad": (lambda: ([_r(4), _r(5).requires_grad_()], [_r(4), _r(5)], [_r(4), _r(5)]), RuntimeError,
                      r"updates\[1\] requires grad"),
}


@pytest.mark.parametrize("case", BAD_LISTS)
def test_bad_tensors_are_named_and_nothing_changes(case):
    make, exc, words = BAD_LISTS[case]
    updates, nat, adv = make()
    first = updates[0].clone() if isinstance(updates, list) else updates.clone()
    with pytest.raises(exc, match=words):
        ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3)
    assert torch.equal(updates[0] if isinstance(updates, list) else updates, first)


def test_tensors_on_two_devices_are_rejected():
    # meta is a second device on every machine, with or without a GPU.
    meta = torch.empty(5, device="meta")
    with pytest.raises(ValueError, match=r"updates\[1\] is on meta but updates\[0\] is on cpu"):
        ck.rgp_mask_([_r(4), meta], [_r(4), meta], [_r(4), meta], alpha=0.1, p=0.3)
    with pytest.raises(ValueError, match=r"grads_adv\[0\] is on meta but updates\[0\] is on cpu"):
        ck.rgp_mask_([_r(5)], [_r(5)], [meta], alpha=0.1, p=0.3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without a GPU")
def test_backend_that_cannot_run_here_says_why():
    upd, nat, adv = _valid()
    with pytest.raises(ValueError, match="backend='cuda' cannot run here: backend 'cuda' runs on CUDA tensors"):
        ck.rgp_mask_(upd, nat, adv, alpha=0.1, p=0.3, backend="cuda")
    if "triton" not in ck.available_backends():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            ck.rgp_mask_(upd, nat, adv, alpha=0.1, p=0.3, backend="triton")


# --- torch.library contract ---------------------------------------------------------------------
def _op_names():
    names = ["rgp_mask_reference"]
    if "cpu" in ck.available_backends("cpu"):
        names.append("rgp_mask")
    if "triton" in ck.available_backends("cpu"):
        names.append("rgp_mask_triton")
    return names


@pytest.mark.parametrize("op_name", _op_names())
def test_opcheck(op_name):
    op = getattr(torch.ops.cure, op_name)
    # No empty tensor here: its threshold is NaN, which opcheck compares as unequal to itself.
    for seed, sizes in enumerate(([5, 1, 33], [2, 17])):
        updates, nat, adv = _inputs("random", sizes, torch.float32, seed=seed, device="cpu")
        torch.library.opcheck(op, (updates, nat, adv, 0.1, 0.3))


@pytest.mark.parametrize("backend", ["reference"] + [b for b in ("cpu",) if b in ck.available_backends("cpu")])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def step(updates, nat, adv):
        stats = ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3, backend=backend)
        return stats.thresholds * 2, stats.kept

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    updates, nat, adv = _inputs("random", [40, 3, 17], torch.float32, seed=1, device="cpu")
    expected_updates = [u.clone() for u in updates]
    exp_thr, exp_kept = step(expected_updates, nat, adv)
    got_thr, got_kept = compiled(updates, nat, adv)
    assert bitwise_equal_f32(got_thr, exp_thr) and torch.equal(got_kept, exp_kept)
    assert all(torch.equal(u, e) for u, e in zip(updates, expected_updates))
