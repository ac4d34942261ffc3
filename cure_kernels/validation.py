"""Argument checks shared by every op. They read metadata only: no host synchronisation.

Every message names the argument, the offending value, and what to do instead. Checks run before
anything is modified, so a rejected call leaves every tensor untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float in [0, 1]; ``ValueError``/``TypeError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            raise TypeError(f"{name} must be a Python float, got a tensor ({value!r}); "
                            f"pass float({name}) (reading a tensor would synchronise the device)")
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")
    return value


def _as_tensor_list(name: str, tensors: object) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of tensors (one per parameter), got a single "
                        f"tensor of shape {tuple(tensors.shape)}; wrap it in a list")
    try:
        out = list(tensors)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of tensors, got {type(tensors).__name__}") from None
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return out


def check_tensor_lists(names: Sequence[str], lists: Sequence[object]) -> list[list[torch.Tensor]]:
    """Check parallel tensor lists: equal lengths; matching shape, dtype and device per index;
    floating dtypes we support; all tensors on one device. The first list is written in place.
    """
    tls = [_as_tensor_list(n, tl) for n, tl in zip(names, lists)]
    lengths = [len(tl) for tl in tls]
    if len(set(lengths)) > 1:
        described = ", ".join(f"len({n})={k}" for n, k in zip(names, lengths))
        raise ValueError(f"tensor lists must have equal lengths, got {described}")
    device = None
    for i, group in enumerate(zip(*tls)):
        first = group[0]
        for name, t in zip(names, group):
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; supported dtypes are {_DTYPE_NAMES}")
            if t.shape != first.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but {names[0]}[{i}] has "
                                 f"shape {tuple(first.shape)}; corresponding tensors must match")
            if t.dtype != first.dtype:
                raise TypeError(f"{name}[{i}] has dtype {t.dtype} but {names[0]}[{i}] has dtype "
                                f"{first.dtype}; corresponding tensors must match")
            if device is None:
                device = t.device
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device} but {names[0]}[0] is on {device}; "
                                 f"all tensors of one call must be on the same device")
        if first.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{names[0]}[{i}] requires grad and would be modified in place; "
                               f"pass .grad tensors or call under torch.no_grad()")
    return tls
