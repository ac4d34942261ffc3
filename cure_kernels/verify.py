"""``backend="auto"`` verifies before it trusts: a one-time check of the picked backend against the torch backend.

The fast backends on CUDA (Triton, the C++ CUDA kernels) are tested bit for bit against the reference, but
here only in Triton's interpreter and an emulation harness; a compiler, driver or GPU the tests never met can
still break them. So on the device types of :data:`cure_kernels.backends.VERIFY_DEVICE_TYPES` (CUDA unless
``CURE_KERNELS_VERIFY`` says otherwise), the first call of an op with ``backend="auto"`` for a device and a
combination of dtypes:

1. takes the first backend of :data:`~cure_kernels.backends.AUTO_ORDER`'s row that can run there;
2. unless it is the torch backend or the reference, runs it and the torch backend
   (:mod:`cure_kernels.torch_backend`, PyTorch operations, bit for bit the reference) on the same small
   built-in problem (:func:`check_problem`) in those dtypes, and compares every output bit for bit
   (thresholds, kept and non-finite counts, and every tensor the op writes; NaN equals NaN);
3. on a difference or an exception, warns once (``RuntimeWarning`` naming the backend, the op and what
   differed) and tries the next backend of the row the same way; the torch backend ends every row it is in.

The decision is cached per (device, op, dtypes) for the life of the process: later calls read a dict and
never check again. :func:`cure_kernels.backends.resolved_backends` reports the decisions.

Cost: the check runs each op once on about 0.2 M elements per dtype and compares on the host, so the first
``auto`` call per op and dtypes synchronises with the device once (later calls do not). Under
``torch.compile`` the check runs in eager mode while the op is traced (the decision is a constant of the
graph; a recompilation reads the cache).

``CURE_KERNELS_VERIFY=0`` (read at import) turns the check off: ``auto`` then trusts the first backend of the
row, as it did before the check existed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cure_kernels import backends

__all__ = ["VERIFIER", "OPS", "check_problem", "check_backend", "verified_backend", "decisions", "dtypes_key"]

#: The backend every other is compared with; trusted without a check (it is tested bit for bit against the
#: reference on every dtype, and the reference needs the host, so on a GPU it is the independent witness).
VERIFIER = "torch"
#: Backends "auto" may take without a check: the verifier itself and the reference (the oracle).
TRUSTED = (VERIFIER, "reference")
OPS = backends.CXX_OPS

#: (device, op, dtypes) -> the backend "auto" runs; filled by :func:`verified_backend`.
decisions: dict[tuple[str, str, tuple[str, ...]], str] = {}

ALPHA, P = 0.3, 0.3  # the check's scalars: p of the paper's range, alpha away from 0 and 1
BRACKET_MIN = 65536  # the fast backends' sampling bracket starts here (docs/selection.md)


def dtypes_key(tensors: Sequence[Tensor]) -> tuple[str, ...]:
    """The dtypes of ``tensors`` as a sorted tuple of names ("bfloat16", "float32", ...), the cache's key."""
    return tuple(sorted({str(t.dtype).removeprefix("torch.") for t in tensors}))


def _gradients(gen: torch.Generator) -> list[tuple[str, Tensor, Tensor]]:
    """(what it exercises, g_nat, g_adv) per tensor of the check problem, float32 on the CPU."""
    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    n_big = BRACKET_MIN + 4463  # above the bracket's cutoff: the fast backends sample, count and compact
    zeros = (torch.rand(n_big, generator=gen) < 0.2).float()  # 80 % exact zeros: lo = 0 and a run at rank k
    ties_nat = torch.randint(-3, 4, (BRACKET_MIN + 7,), generator=gen).float()
    ties_adv = torch.randint(-3, 4, (BRACKET_MIN + 7,), generator=gen).float()
    small_nat, small_adv = randn(4099), randn(4099)  # below the cutoff: the radix path
    small_nat[::97] = math.inf  # +inf scores sort last (counted as non-finite)
    nan_nat = randn(33, 31)
    nan_nat[5, 7] = math.nan  # one NaN: the threshold is NaN, nothing masked
    return [
        ("bracket", randn(n_big), randn(n_big)),
        ("zeros", randn(n_big) * zeros, randn(n_big) * zeros),
        ("ties", ties_nat, ties_adv),
        ("radix+inf", small_nat, small_adv),
        ("nan", nan_nat, randn(33, 31)),
        ("tiny", randn(3), randn(3)),
        ("empty", randn(0), randn(0)),
    ]


def check_problem(device: torch.device, dtypes: Sequence[str], with_nan: bool = True
                  ) -> tuple[list[str], dict[str, list[Tensor]]]:
    """The built-in problem: names and the lists ``grads_nat``, ``grads_adv``, ``params``, ``grads``,
    ``momentum_buffers``, ``revision`` (one entry per tensor of :func:`_gradients` and dtype), on ``device``.

    Deterministic (a fixed seed); ``with_nan=False`` leaves out the tensor with a NaN score (the fused step
    with ``skip`` would otherwise skip every tensor, and compare nothing but unchanged bits).
    """
    gen = torch.Generator().manual_seed(20240401)
    names: list[str] = []
    lists: dict[str, list[Tensor]] = {k: [] for k in ("grads_nat", "grads_adv", "params", "grads",
                                                       "momentum_buffers", "revision")}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for name, nat, adv in _gradients(gen):
            if name == "nan" and not with_nan:
                continue
            names.append(f"{name}/{dtype_name}")
            shape = nat.shape
            values = {"grads_nat": nat, "grads_adv": adv, "params": torch.randn(shape, generator=gen),
                      "grads": torch.randn(shape, generator=gen),
                      "momentum_buffers": 0.1 * torch.randn(shape, generator=gen),
                      "revision": torch.randn(shape, generator=gen)}
            for key, value in values.items():
                lists[key].append(value.to(device=device, dtype=dtype))
    return names, lists


def _clone(lists: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
    return {k: [t.clone() for t in ts] for k, ts in lists.items()}


def _bits(t: Tensor) -> Tensor:
    t = t.detach().reshape(-1)
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _first_difference(x: Tensor, y: Tensor) -> int | None:
    """Index of the first element whose bits differ (NaN equals NaN), or None; reads the device once."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return -1
    same = _bits(x) == _bits(y)
    if x.is_floating_point():
        same |= torch.isnan(x.reshape(-1)) & torch.isnan(y.reshape(-1))
    bad = (~same).nonzero()
    return int(bad[0, 0]) if bad.numel() else None


def _describe(what: str, names: Sequence[str], got: Sequence[Tensor], expected: Sequence[Tensor],
              per_tensor: bool) -> str | None:
    """What differs between two lists (per-tensor tensors, or one stats vector), or None."""
    for j, (x, y) in enumerate(zip(got, expected)):
        i = _first_difference(x, y)
        if i is None:
            continue
        label = f"{what}[{names[j]}]" if per_tensor else what
        if i < 0:
            return f"{label} has shape {tuple(x.shape)} and dtype {x.dtype}, expected {tuple(y.shape)} and {y.dtype}"
        a, b = x.reshape(-1)[i].item(), y.reshape(-1)[i].item()
        if not per_tensor:  # entry i of a stats vector belongs to tensor i
            return f"{what}[{names[i]}] is {a!r}, expected {b!r}"
        return f"{label} differs at element {i}: {a!r}, expected {b!r}"
    return None


def _compare(names: list[str], got: dict[str, Sequence[Tensor]], expected: dict[str, Sequence[Tensor]]
             ) -> str | None:
    for what in got:
        per_tensor = what not in ("thresholds", "kept", "nonfinite")
        g = got[what] if per_tensor else [got[what]]
        e = expected[what] if per_tensor else [expected[what]]
        message = _describe(what, names, g, e, per_tensor)
        if message is not None:
            return message
    return None


def _run_rgp_mask(backend: str, names: list[str], lists: dict[str, list[Tensor]]) -> dict[str, object]:
    import cure_kernels as ck

    updates = lists["grads"]
    stats = ck.rgp_mask_(updates, lists["grads_nat"], lists["grads_adv"], alpha=ALPHA, p=P, backend=backend)
    return {"thresholds": stats.thresholds, "kept": stats.kept, "nonfinite": stats.nonfinite, "updates": updates}


def _run_rgp_select(backend: str, names: list[str], lists: dict[str, list[Tensor]]) -> dict[str, object]:
    import cure_kernels as ck

    thresholds, nonfinite = ck.rgp_select(lists["grads_nat"], lists["grads_adv"], alpha=ALPHA, p=P, backend=backend)
    return {"thresholds": thresholds, "nonfinite": nonfinite}


def _run_revise(backend: str, names: list[str], lists: dict[str, list[Tensor]]) -> dict[str, object]:
    import cure_kernels as ck

    ck.revise_(lists["revision"], lists["params"], decay=0.999, backend=backend)
    return {"revision": lists["revision"]}


def _run_rgp_sgd_step(backend: str, names: list[str], lists: dict[str, list[Tensor]]) -> dict[str, object]:
    """The fused step with its own selection, mask_mode "grad" and a revision list."""
    import cure_kernels as ck

    stats = ck.rgp_sgd_step_(lists["params"], lists["grads"], lists["grads_nat"], lists["grads_adv"],
                             lists["momentum_buffers"], lr=0.1, momentum=0.9, weight_decay=5e-4, alpha=ALPHA, p=P,
                             mask_mode="grad", revision=lists["revision"], decay=0.99, backend=backend)
    return {"thresholds": stats.thresholds, "kept": stats.kept, "nonfinite": stats.nonfinite,
            "params": lists["params"], "grads": lists["grads"], "momentum_buffers": lists["momentum_buffers"],
            "revision": lists["revision"]}


def _run_rgp_sgd_step_given(backend: str, names: list[str], lists: dict[str, list[Tensor]]) -> dict[str, object]:
    """The apply pass alone: mask_mode "update", the verifier's thresholds given, and a ``skip`` that is zero."""
    import cure_kernels as ck

    thresholds, nonfinite = ck.rgp_select(lists["grads_nat"], lists["grads_adv"], alpha=ALPHA, p=P,
                                          backend=VERIFIER)
    skip = torch.zeros((), dtype=torch.bool, device=thresholds.device)
    stats = ck.rgp_sgd_step_(lists["params"], lists["grads"], lists["grads_nat"], lists["grads_adv"],
                             lists["momentum_buffers"], lr=0.05, momentum=0.9, weight_decay=1e-3, alpha=ALPHA, p=P,
                             mask_mode="update", skip=skip, thresholds=thresholds, nonfinite=nonfinite,
                             backend=backend)
    return {"thresholds": stats.thresholds, "kept": stats.kept, "nonfinite": stats.nonfinite,
            "params": lists["params"], "grads": lists["grads"], "momentum_buffers": lists["momentum_buffers"]}


# Per op: the runs of the check, each (run, whether its problem holds the NaN tensor).
_RUNS: dict[str, tuple[tuple[Callable[..., dict[str, object]], bool], ...]] = {
    "rgp_mask": ((_run_rgp_mask, True),),
    "rgp_select": ((_run_rgp_select, True),),
    "revise": ((_run_revise, True),),
    "rgp_sgd_step": ((_run_rgp_sgd_step, True), (_run_rgp_sgd_step_given, False)),
}


def check_backend(backend: str, device: torch.device, op: str, dtypes: Sequence[str]) -> str | None:
    """Run ``op`` on ``backend`` and on the torch backend over :func:`check_problem` (in each of ``dtypes``) on
    ``device``; None when every output agrees bit for bit, else what differed (an exception of ``backend`` is
    reported as a difference; one of the torch backend propagates). Synchronises with the device."""
    if op not in _RUNS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(map(repr, _RUNS))}")
    for run, with_nan in _RUNS[op]:
        names, lists = check_problem(device, dtypes, with_nan)
        expected_lists = _clone(lists)
        with warnings.catch_warnings():  # the verifier's own "no fast backend" notice is not the user's business
            warnings.simplefilter("ignore")
            expected = run(VERIFIER, names, expected_lists)
        try:
            got = run(backend, names, lists)
        except Exception as exc:  # noqa: BLE001 (any failure of the candidate is a reason not to trust it)
            return f"{run.__name__.removeprefix('_run_')} raised {type(exc).__name__}: {exc}"
        message = _compare(names, got, expected)
        if message is not None:
            return f"{run.__name__.removeprefix('_run_')}: {message}"
    return None


def verified_backend(device: torch.device, op: str, dtypes: tuple[str, ...],
                     order: Sequence[str] | None = None) -> str:
    """The backend ``backend="auto"`` runs ``op`` with on ``device`` for tensors of ``dtypes``, checked.

    The first backend of ``order`` (default: :data:`~cure_kernels.backends.AUTO_ORDER`'s row for the device
    type) that can run there and, unless it is in :data:`TRUSTED`, passes :func:`check_backend`; a backend
    that fails is named in a ``RuntimeWarning`` (once: the decision is cached) and the next one is tried.
    Falls back to the verifier when every candidate fails. Cached per (device, op, dtypes).
    """
    key = (str(device), op, dtypes)
    name = decisions.get(key)
    if name is not None:
        return name
    if order is None:
        order = backends.AUTO_ORDER.get(device.type, ("reference",))
    candidates = [b for b in order if backends.unavailable_reason(b, device, op) is None]
    name = VERIFIER
    for j, candidate in enumerate(candidates):
        if candidate in TRUSTED:
            name = candidate
            break
        failure = check_backend(candidate, device, op, dtypes)
        if failure is None:
            name = candidate
            break
        after = candidates[j + 1] if j + 1 < len(candidates) else VERIFIER
        warnings.warn(
            f"cure_kernels: backend {candidate!r} failed the check of {op} on {device} ({', '.join(dtypes)}) "
            f"against the torch backend: {failure}. backend='auto' moves on to {after!r} for this op and these "
            f"dtypes (set CURE_KERNELS_VERIFY=0 to skip the check; please report this with your GPU, driver, "
            f"CUDA and Triton versions)", RuntimeWarning, stacklevel=4)
    decisions[key] = name
    return name


def verified_backend_constant(device: torch.device, op: str, dtypes: tuple[str, ...]) -> str:
    """:func:`verified_backend` as a constant for ``torch.compile``: Dynamo runs it in eager mode while it
    traces the op (the check needs real tensors) and compiles its answer into the graph."""
    return verified_backend(device, op, dtypes)


# What torch.compiler.assume_constant_result(verified_backend_constant) does, set here directly: that function
# imports torch._dynamo, which takes seconds, and importing cure_kernels does not otherwise need it. (PyTorch
# marks its own justknobs_check the same way; test_verify.py's torch.compile test fails if this stops working.)
verified_backend_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]
