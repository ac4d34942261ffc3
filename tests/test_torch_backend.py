"""The "torch" backend (cure_kernels/torch_backend.py): PyTorch operations only, bit for bit the reference,
and no host synchronisation.

Every op against the reference on the exactness battery (tests/rgp_cases.py: ties, zeros, all-equal,
denormals, a 1e-30..1e30 range, +-inf, NaN; empty tensors; p = 0 and 1) in float32, bfloat16 and float16;
the fused step in both mask modes, with ``skip`` and with given thresholds; a tensor of 2**24 + 3 elements;
and every op run with every host read of a tensor made to raise.
"""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import pytest
import torch
from rgp_cases import DTYPES, KINDS, assert_matches_reference, bitwise_equal_f32, make_case_lists

import cure_kernels as ck
from cure_kernels import backends, reference, torch_backend

# numpy warns about inf - inf inside numpy.quantile (the reference): the NaN is part of the specification.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

SIZES = (0, 1, 2, 3, 7, 31, 128, 129, 1025, 4099)
ALPHAS = (0.0, 0.1, 1.0)
PS = (0.0, 0.3, 0.5, 0.999, 1.0)
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3}


def _pairs(seed: str) -> list[tuple[float, float]]:
    """(alpha, p) pairs: every alpha with several p, every p with several alpha, plus random ones."""
    rng = random.Random(seed)
    alphas, ps = ALPHAS + (rng.random(),), PS + (rng.random(),)
    return [(alphas[i % len(alphas)], ps[(i + shift) % len(ps)]) for shift in (0, 2) for i in range(len(ps))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _same(xs, ys) -> bool:
    """Same bits, NaN equal to NaN (a NaN payload is not part of the contract)."""
    return len(xs) == len(ys) and all(
        x.dtype == y.dtype and bool(((_bits(x) == _bits(y)) | (x.isnan() & y.isnan())).all()) for x, y in zip(xs, ys))


def _step_lists(kind, sizes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    nat, adv = make_case_lists(kind, sizes, dtype, gen)
    rand = [[torch.randn(n, generator=gen).to(dtype) for n in sizes] for _ in range(4)]
    return {"params": rand[0], "grads": rand[1], "grads_nat": nat, "grads_adv": adv,
            "momentum_buffers": [(0.1 * r).to(dtype) for r in rand[2]], "revision": rand[3]}


def _clone(lists):
    return {k: [t.clone() for t in ts] for k, ts in lists.items()}


def _step(backend, lists, revise=False, **kw):
    """rgp_sgd_step_ on the lists (with their revision list when ``revise``)."""
    return ck.rgp_sgd_step_(lists["params"], lists["grads"], lists["grads_nat"], lists["grads_adv"],
                            lists["momentum_buffers"], revision=lists["revision"] if revise else None,
                            backend=backend, **kw)


def _assert_step_matches_reference(lists, **kw):
    expected = _clone(lists)
    exp = _step("reference", expected, **kw)
    got = _step("torch", lists, **kw)
    assert bitwise_equal_f32(got.thresholds, exp.thresholds), (got.thresholds, exp.thresholds)
    assert torch.equal(got.kept, exp.kept) and torch.equal(got.nonfinite, exp.nonfinite)
    for name in ("params", "grads", "momentum_buffers", "revision"):
        assert _same(lists[name], expected[name]), name
    return got


# --- the threshold formula ------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [[1.0, 2.0, math.inf], [3.0, math.inf], [math.inf], [0.0, math.inf, math.inf],
                                    [1.0, 1.0, 1.0, 2.0], [5.0], [0.0] * 7 + [1e-45], [2.0, math.nan, 1.0]])
@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.7, 0.999999, 1.0])
def test_quantile_threshold_equals_numpy(values, p):
    """+inf sorts last, so it interpolates like numpy: inf - inf is NaN, also at p = 1 (where docs/method.md's
    shorthand says v[n - 1]); a finite neighbour interpolated with inf gives inf or NaN (inf * 0)."""
    s = torch.tensor(values, dtype=torch.float32)
    with np.errstate(invalid="ignore"):
        expected = np.float32(np.quantile(s.numpy(), p))
    got = torch_backend.quantile_threshold(s, p)
    assert got.dtype == torch.float32 and got.shape == ()
    assert bitwise_equal_f32(got.reshape(1), torch.tensor([expected])), (values, p, got, expected)


def test_quantile_threshold_of_an_empty_tensor_is_nan():
    assert math.isnan(torch_backend.quantile_threshold(torch.empty(0), 0.3).item())


# --- every op against the reference on the battery ----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rgp_mask_is_the_reference(kind, dtype):
    for j, (alpha, p) in enumerate(_pairs(f"mask{kind}{dtype}")):
        gen = torch.Generator().manual_seed(j)
        nat, adv = make_case_lists(kind, SIZES, dtype, gen)
        updates = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
        assert_matches_reference("torch", updates, nat, adv, alpha, p)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rgp_select_is_the_reference(kind, dtype):
    for j, (alpha, p) in enumerate(_pairs(f"select{kind}{dtype}")):
        nat, adv = make_case_lists(kind, SIZES, dtype, torch.Generator().manual_seed(j))
        before = [t.clone() for t in (*nat, *adv)]
        exp_thr, exp_nonfinite = reference.rgp_select_reference(nat, adv, alpha, p)
        thr, nonfinite = ck.rgp_select(nat, adv, alpha=alpha, p=p, backend="torch")
        assert thr.dtype == torch.float32 and nonfinite.dtype == torch.int64 and thr.shape == (len(SIZES),)
        assert bitwise_equal_f32(thr, exp_thr), (alpha, p, thr, exp_thr)
        assert torch.equal(nonfinite, exp_nonfinite)
        assert _same([*nat, *adv], before)  # reads only


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
def test_rgp_sgd_step_is_the_reference(kind, dtype, mask_mode):
    for j, (alpha, p) in enumerate(_pairs(f"step{kind}{dtype}{mask_mode}")[::3]):
        lists = _step_lists(kind, SIZES, dtype, seed=j)
        _assert_step_matches_reference(lists, alpha=alpha, p=p, mask_mode=mask_mode, revise=True,
                                       decay=0.99, **HYPER)


@pytest.mark.parametrize("kind", ["random", "inf", "nan"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
def test_rgp_sgd_step_skip_is_decided_on_the_device_like_the_reference(kind, skip, mask_mode):
    """skip nonzero, or any non-finite score (kinds inf and nan), keeps every param and buffer's bits."""
    for dtype in DTYPES:
        lists = _step_lists(kind, SIZES, dtype, seed=7)
        before = _clone(lists)
        flag = torch.tensor([1.0 if skip else 0.0])
        got = _assert_step_matches_reference(lists, alpha=0.1, p=0.3, mask_mode=mask_mode, skip=flag,
                                             revise=True, decay=0.9, **HYPER)
        skipped = skip or int(got.nonfinite.sum()) > 0
        assert skipped == (kind != "random" or skip)
        for name in ("params", "momentum_buffers"):
            assert _same(lists[name], before[name]) == skipped, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
def test_rgp_sgd_step_with_given_thresholds_is_the_reference(kind, mask_mode):
    for dtype in DTYPES:
        lists = _step_lists(kind, SIZES, dtype, seed=11)
        thr, nonfinite = ck.rgp_select(lists["grads_nat"], lists["grads_adv"], alpha=0.2, p=0.4, backend="torch")
        without = _clone(lists)
        _assert_step_matches_reference(lists, alpha=0.2, p=0.4, mask_mode=mask_mode, thresholds=thr,
                                       nonfinite=nonfinite, skip=torch.tensor(False), **HYPER)
        _step("torch", without, alpha=0.2, p=0.4, mask_mode=mask_mode, skip=torch.tensor(False), **HYPER)
        assert all(_same(lists[k], without[k]) for k in ("params", "grads", "momentum_buffers"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_revise_is_the_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    rev = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    par = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    expected = [r.clone() for r in rev]
    for decay in (0.0, 0.5, 0.999, 1.0, 1 / 3):
        reference.revise_reference(expected, par, decay)
        ck.revise_(rev, par, decay=decay, backend="torch")
        assert _same(rev, expected), decay


def test_mixed_dtypes_and_non_contiguous_tensors_in_one_call():
    gen = torch.Generator().manual_seed(5)
    updates, nat, adv = [], [], []
    for n, dtype in [(0, torch.float32), (300, torch.float16), (1, torch.bfloat16), (513, torch.float32),
                     (64, torch.bfloat16)]:
        nat.append(torch.randn(n, generator=gen).to(dtype))
        adv.append(torch.randn(n, generator=gen).to(dtype))
        updates.append(torch.randn(n, generator=gen).to(dtype))
    updates.append(torch.randn(37, 29, generator=gen).t())
    nat.append(torch.randn(37, 58, generator=gen)[:, ::2].t())
    adv.append(torch.randn(29, 37, generator=gen))
    assert not updates[-1].is_contiguous() and not nat[-1].is_contiguous()
    assert_matches_reference("torch", updates, nat, adv, alpha=0.2, p=0.4)


def test_a_tensor_above_2_to_the_24_elements():
    """float32 counts and indices would fail here (2**24 + 1 is not a float32); ties and exact zeros."""
    n = 2**24 + 3
    gen = torch.Generator().manual_seed(24)
    nat = torch.randint(0, 5, (n,), generator=gen).float()  # five values: ties at every rank
    adv = torch.zeros(n)
    nat[-1] = math.inf
    for p in (0.3, 1 - 1e-7):
        updates = [torch.ones(n)]
        stats = assert_matches_reference("torch", updates, [nat], [adv], alpha=0.5, p=p)
        assert 0 < int(stats.kept) < n


# --- no host synchronisation ----------------------------------------------------------------------------
@contextlib.contextmanager
def _host_reads_raise(monkeypatch):
    """Every way Python code reads a tensor's values on the host raises inside the block."""
    def refuse(name):
        def raising(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name}")
        return raising

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__array__"):
            m.setattr(torch.Tensor, name, refuse(name))
        yield


def _all_ops(backend, lists):
    ck.rgp_mask_([g.clone() for g in lists["grads"]], lists["grads_nat"], lists["grads_adv"], alpha=0.1, p=0.3,
                 backend=backend)
    thr, nonfinite = ck.rgp_select(lists["grads_nat"], lists["grads_adv"], alpha=0.1, p=0.3, backend=backend)
    _step(backend, lists, alpha=0.1, p=0.3, mask_mode="update", revise=True, decay=0.9,
          skip=torch.tensor(False), **HYPER)
    _step(backend, lists, alpha=0.1, p=0.3, mask_mode="grad", thresholds=thr, nonfinite=nonfinite,
          skip=torch.tensor(0.0), **HYPER)
    ck.revise_(lists["revision"], lists["params"], decay=0.9, backend=backend)


@pytest.mark.parametrize("kind", ["random", "nan", "inf", "ties"])
def test_no_host_reads(monkeypatch, kind):
    lists = _step_lists(kind, SIZES, torch.float32, seed=1)
    expected = _clone(lists)
    with _host_reads_raise(monkeypatch):
        _all_ops("torch", lists)
    _all_ops("reference", expected)  # and the same results as the reference
    assert all(_same(lists[k], expected[k]) for k in lists)


def test_the_host_read_trap_catches_the_reference(monkeypatch):
    """The trap works: the reference (numpy) trips it."""
    lists = _step_lists("random", SIZES, torch.float32, seed=1)
    with _host_reads_raise(monkeypatch), pytest.raises(AssertionError, match="host read"):
        _all_ops("reference", lists)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_synchronisation_on_cuda():
    lists = {k: [t.cuda() for t in ts] for k, ts in _step_lists("nan", SIZES, torch.float32, seed=2).items()}
    skip = torch.zeros((), dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ck.rgp_mask_([g.clone() for g in lists["grads"]], lists["grads_nat"], lists["grads_adv"], alpha=0.1,
                     p=0.3, backend="torch")
        thr, nonfinite = ck.rgp_select(lists["grads_nat"], lists["grads_adv"], alpha=0.1, p=0.3, backend="torch")
        _step("torch", lists, alpha=0.1, p=0.3, mask_mode="update", revise=True, decay=0.9,
              skip=skip, thresholds=thr, nonfinite=nonfinite, **HYPER)
        ck.revise_(lists["revision"], lists["params"], decay=0.9, backend="torch")
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- registration -----------------------------------------------------------------------------------------
def test_torch_is_available_on_every_device():
    assert "torch" in ck.available_backends() and "torch" in ck.available_backends("cpu")
    for device in ("cpu", "cuda", "cuda:1"):
        for op in backends.CXX_OPS:
            assert backends.unavailable_reason("torch", torch.device(device), op) is None
            assert backends.resolve_backend("torch", torch.device(device), op) == "torch"
    assert backends.AUTO_ORDER["cuda"][-1] == "torch"


@pytest.mark.parametrize("op_name", ["rgp_mask_torch", "rgp_select_torch"])
def test_opcheck(op_name):
    for seed, sizes in enumerate(([5, 1, 33], [2, 17])):
        nat, adv = make_case_lists("random", sizes, torch.float32, torch.Generator().manual_seed(seed))
        args = (nat, adv, 0.1, 0.3) if op_name == "rgp_select_torch" else ([t.clone() for t in nat], nat, adv, 0.1, 0.3)
        torch.library.opcheck(getattr(torch.ops.cure, op_name), args)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def step(lists):
        thr, nonfinite = ck.rgp_select(lists["grads_nat"], lists["grads_adv"], alpha=0.1, p=0.3, backend="torch")
        stats = _step("torch", lists, alpha=0.1, p=0.3, mask_mode="update", thresholds=thr, nonfinite=nonfinite,
                      skip=torch.tensor(False), revise=True, decay=0.9, **HYPER)
        ck.revise_(lists["revision"], lists["params"], decay=0.5, backend="torch")
        return stats.thresholds * 2, stats.kept

    lists = _step_lists("random", [40, 3, 17], torch.float32, seed=1)
    expected = _clone(lists)
    exp_thr, exp_kept = step(expected)
    got_thr, got_kept = torch.compile(step, fullgraph=True, backend="aot_eager")(lists)
    assert bitwise_equal_f32(got_thr, exp_thr) and torch.equal(got_kept, exp_kept)
    assert all(_same(lists[k], expected[k]) for k in lists)

