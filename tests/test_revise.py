"""revise_: rev <- decay*rev + (1-decay)*param on every backend, and its argument checks."""

from __future__ import annotations

import pytest
import torch
from rgp_cases import DTYPES, bitwise_equal_f32

import cure_kernels as ck
from cure_kernels import reference

FAST = [b for b in ck.available_backends("cpu") if b != "reference"]


def _lists(sizes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rev = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    par = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    return rev, par


def test_reference_is_the_float32_formula():
    rev, par = _lists([10], torch.float32, 0)
    expected = torch.tensor(0.9, dtype=torch.float32) * rev[0] + torch.tensor(0.1, dtype=torch.float32) * par[0]
    ck.revise_(rev, par, decay=0.9, backend="reference")
    assert bitwise_equal_f32(rev[0], expected)


def test_decay_one_keeps_and_decay_zero_copies():
    rev, par = _lists([7, 3], torch.float32, 1)
    before = [r.clone() for r in rev]
    ck.revise_(rev, par, decay=1.0)
    assert all(torch.equal(r, b) for r, b in zip(rev, before))
    ck.revise_(rev, par, decay=0.0)
    assert all(torch.equal(r, q) for r, q in zip(rev, par))


@pytest.mark.skipif(not FAST, reason="no fast backend can run here (build the extension)")
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.999, 1.0, 0.123456789])
def test_backend_matches_reference_bitwise(backend, dtype, decay):
    sizes = [0, 1, 2, 3, 127, 128, 129, 1025, 4099, 1]
    rev, par = _lists(sizes, dtype, 2)
    expected = [r.clone() for r in rev]
    reference.revise_reference(expected, par, decay)
    ck.revise_(rev, par, decay=decay, backend=backend)
    for r, e in zip(rev, expected):
        assert r.dtype == dtype and bitwise_equal_f32(r, e)


@pytest.mark.skipif(not FAST, reason="no fast backend can run here (build the extension)")
@pytest.mark.parametrize("backend", FAST)
def test_backend_non_contiguous_in_place(backend):
    gen = torch.Generator().manual_seed(3)
    rev = [torch.randn(20, 30, generator=gen)[:, ::3], torch.randn(9, 4, generator=gen).t()]
    par = [torch.randn(30, 20, generator=gen).t()[:, ::3], torch.randn(4, 9, generator=gen)]
    expected = [r.clone() for r in rev]
    reference.revise_reference(expected, par, 0.7)
    ptrs = [r.data_ptr() for r in rev]
    ck.revise_(rev, par, decay=0.7, backend=backend)
    assert [r.data_ptr() for r in rev] == ptrs
    assert all(bitwise_equal_f32(r, e) for r, e in zip(rev, expected))


@pytest.mark.parametrize(("kwargs", "exc", "words"), [
    ({"decay": 1.01}, ValueError, "decay must be a finite number in"),
    ({"decay": -1}, ValueError, "decay"),
    ({"decay": None}, TypeError, "decay"),
    ({"decay": 0.5, "backend": "fast"}, ValueError, "unknown backend 'fast'"),
])
def test_bad_arguments(kwargs, exc, words):
    rev, par = _lists([4], torch.float32, 4)
    before = rev[0].clone()
    with pytest.raises(exc, match=words):
        ck.revise_(rev, par, **kwargs)
    assert torch.equal(rev[0], before)


def test_mismatched_lists():
    rev, par = _lists([4, 5], torch.float32, 5)
    with pytest.raises(ValueError, match=r"params\[1\] has shape \(4,\) but revision\[1\] has shape \(5,\)"):
        ck.revise_(rev, [par[0], par[0]], decay=0.5)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.bfloat16"):
        ck.revise_(rev, [par[0].bfloat16(), par[1]], decay=0.5)


def test_opcheck_reference():
    rev, par = _lists([3, 8], torch.float32, 6)
    torch.library.opcheck(torch.ops.cure.revise_reference, (rev, par, 0.9))
    if "cpu" in FAST:
        torch.library.opcheck(torch.ops.cure.revise, (rev, par, 0.9))
