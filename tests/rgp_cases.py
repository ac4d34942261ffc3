"""Inputs that break selection kernels, and the exact comparison every backend must pass."""

from __future__ import annotations

import math

import torch

import cure_kernels as ck
from cure_kernels import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _randn(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=gen)


def make_case(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 gradient tensors of n elements with the named pathology."""
    a, b = _randn(n, gen), _randn(n, gen)
    if kind == "random":
        pass
    elif kind == "ties":  # few distinct values: the threshold lands inside a run of equal scores
        a = torch.randint(-3, 4, (n,), generator=gen).float()
        b = torch.randint(-3, 4, (n,), generator=gen).float()
    elif kind == "zeros":  # most entries exactly zero
        keep = torch.rand(n, generator=gen) < 0.2
        a, b = a * keep, b * keep
    elif kind == "all_equal":
        a = torch.full((n,), 0.25)
        b = torch.full((n,), -0.5)
    elif kind == "denormal":
        a = a * 1e-40
        b = b * 1e-41
    elif kind == "wide":  # magnitudes from 1e-30 to 1e30
        scale = torch.pow(10.0, torch.empty(n).uniform_(-30, 30, generator=gen))
        a, b = a * scale, b * scale.flip(0)
    elif kind == "inf":
        a[torch.rand(n, generator=gen) < 0.1] = math.inf
        b[torch.rand(n, generator=gen) < 0.1] = -math.inf
    elif kind == "nan":
        if n:  # an empty tensor has no entry to poison
            a[torch.randint(0, n, (max(1, n // 50),), generator=gen)] = math.nan
    else:
        raise ValueError(kind)
    return a, b


KINDS = ("random", "ties", "zeros", "all_equal", "denormal", "wide", "inf", "nan")


def make_case_lists(kind: str, sizes, dtype: torch.dtype, gen: torch.Generator, device="cpu"):
    """g_nat and g_adv lists with one tensor of each size (make_case; an empty tensor for size 0)."""
    nat, adv = [], []
    for n in sizes:
        a, b = make_case(kind, n, gen) if n else (torch.empty(0), torch.empty(0))
        nat.append(a.to(device=device, dtype=dtype))
        adv.append(b.to(device=device, dtype=dtype))
    return nat, adv


def bitwise_equal_f32(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal as float32 bit patterns, except that any NaN equals any NaN."""
    x, y = x.float().cpu(), y.float().cpu()
    both_nan = torch.isnan(x) & torch.isnan(y)
    return bool(((x.view(torch.int32) == y.view(torch.int32)) | both_nan).all())


def assert_matches_reference(backend: str, updates: list[torch.Tensor], grads_nat: list[torch.Tensor],
                             grads_adv: list[torch.Tensor], alpha: float, p: float) -> ck.MaskStats:
    """Run ``backend`` and the reference on copies of the same inputs; require identical results."""
    expected_updates = [u.clone() for u in updates]
    exp = reference.rgp_mask_reference(expected_updates, grads_nat, grads_adv, alpha, p)
    got = ck.rgp_mask_(updates, grads_nat, grads_adv, alpha=alpha, p=p, backend=backend)
    assert got.thresholds.dtype == torch.float32 and got.kept.dtype == torch.int64
    assert got.nonfinite.dtype == torch.int64 and got.thresholds.shape == (len(updates),)
    assert bitwise_equal_f32(got.thresholds, exp[0]), (got.thresholds, exp[0])
    assert torch.equal(got.kept.cpu(), exp[1].cpu()), (got.kept, exp[1])
    assert torch.equal(got.nonfinite.cpu(), exp[2].cpu()), (got.nonfinite, exp[2])
    for i, (u, e) in enumerate(zip(updates, expected_updates)):
        assert torch.equal(u.isnan(), e.isnan()), f"tensor {i}: NaN positions differ"
        assert torch.equal(torch.nan_to_num(u), torch.nan_to_num(e)), f"tensor {i}: masked update differs"
    return got
