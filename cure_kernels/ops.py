"""Public ops and their ``torch.library`` registrations.

One op name per operation and backend family:

* ``cure::rgp_mask`` / ``cure::revise`` -- C++ (``csrc/``): the CPU kernel under the CPU dispatch
  key, the CUDA kernel under the CUDA key. Defined in C++; their fake (meta) implementations are
  registered here.
* ``cure::rgp_mask_triton`` / ``cure::revise_triton`` -- Triton kernels (``triton_*.py``).
* ``cure::rgp_mask_reference`` / ``cure::revise_reference`` -- the oracle (``reference.py``).
* ``cure::rgp_mask_torch`` / ``cure::revise_torch`` -- PyTorch tensor operations on any device
  (``torch_backend.py``): the oracle's results without its host round trip.

Every op mutates its first tensor list in place and has a fake implementation, so the public
functions work under ``torch.compile(fullgraph=True)``.

Like PyTorch's own in-place ops, every op bumps the version counter of each tensor it writes, so
autograd refuses a backward pass that would read a value saved before the op overwrote it. The
Python ops get this from ``torch.library.custom_op`` (``mutates_args``); the C++ ops get it from an
``ADInplaceOrView`` kernel registered below for each of them that writes (``cure::rgp_mask``,
``cure::revise``, ``cure::rgp_sgd_step``; ``cure::rgp_select``, in :mod:`cure_kernels.select`, only
reads), which bumps every argument the schema marks as written (``Tensor(a!)[]``) and redispatches to
the CPU or CUDA kernel.

Host synchronisation: :mod:`cure_kernels.backends` states when each backend waits for the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from cure_kernels import backends, reference, torch_backend, verify
from cure_kernels.validation import check_fraction, check_tensor_lists

__all__ = ["MaskStats", "rgp_mask_", "revise_", "available_backends"]

available_backends = backends.available_backends


class MaskStats(NamedTuple):
    """Per-tensor results of :func:`rgp_mask_`, on the tensors' device (returning them takes no host
    synchronisation; :mod:`cure_kernels.backends` says when a backend synchronises anyway).

    thresholds: float32[T], each tensor's p-quantile of the scores (NaN for an empty tensor or
        when a score is NaN). kept: int64[T], entries not zeroed. nonfinite: int64[T], scores that
        are NaN or infinite.
    """

    thresholds: Tensor
    kept: Tensor
    nonfinite: Tensor


def _mask_stats_like(updates: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    device = updates[0].device if updates else torch.device("cpu")
    n = len(updates)
    return (torch.empty(n, dtype=torch.float32, device=device),
            torch.empty(n, dtype=torch.int64, device=device),
            torch.empty(n, dtype=torch.int64, device=device))


def _rgp_mask_fake(updates: list[Tensor], grads_nat: list[Tensor], grads_adv: list[Tensor],
                   alpha: float, p: float) -> tuple[Tensor, Tensor, Tensor]:
    return _mask_stats_like(updates)


def _revise_fake(revision: list[Tensor], params: list[Tensor], decay: float) -> None:
    return None


# --- reference ------------------------------------------------------------------------------
@torch.library.custom_op("cure::rgp_mask_reference", mutates_args=("updates",))
def _rgp_mask_reference(updates: list[Tensor], grads_nat: list[Tensor], grads_adv: list[Tensor],
                        alpha: float, p: float) -> tuple[Tensor, Tensor, Tensor]:
    return reference.rgp_mask_reference(updates, grads_nat, grads_adv, alpha, p)


@torch.library.custom_op("cure::revise_reference", mutates_args=("revision",))
def _revise_reference(revision: list[Tensor], params: list[Tensor], decay: float) -> None:
    reference.revise_reference(revision, params, decay)


# --- triton (imported lazily: TRITON_INTERPRET must be read when the kernels are defined) ---
@torch.library.custom_op("cure::rgp_mask_triton", mutates_args=("updates",))
def _rgp_mask_triton(updates: list[Tensor], grads_nat: list[Tensor], grads_adv: list[Tensor],
                     alpha: float, p: float) -> tuple[Tensor, Tensor, Tensor]:
    from cure_kernels.triton_rgp_mask import rgp_mask_triton

    return rgp_mask_triton(updates, grads_nat, grads_adv, alpha, p)


@torch.library.custom_op("cure::revise_triton", mutates_args=("revision",))
def _revise_triton(revision: list[Tensor], params: list[Tensor], decay: float) -> None:
    from cure_kernels.triton_revise import revise_triton

    revise_triton(revision, params, decay)


# --- torch ----------------------------------------------------------------------------------
@torch.library.custom_op("cure::rgp_mask_torch", mutates_args=("updates",))
def _rgp_mask_torch(updates: list[Tensor], grads_nat: list[Tensor], grads_adv: list[Tensor],
                    alpha: float, p: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch_backend.rgp_mask_torch(updates, grads_nat, grads_adv, alpha, p)


@torch.library.custom_op("cure::revise_torch", mutates_args=("revision",))
def _revise_torch(revision: list[Tensor], params: list[Tensor], decay: float) -> None:
    torch_backend.revise_torch(revision, params, decay)


for _op in (_rgp_mask_reference, _rgp_mask_triton, _rgp_mask_torch):
    _op.register_fake(_rgp_mask_fake)
for _op in (_revise_reference, _revise_triton, _revise_torch):
    _op.register_fake(_revise_fake)

# --- C++ (CPU and CUDA keys of one op name) -------------------------------------------------
if backends.PROBE.extension_error is None:
    torch.library.register_fake("cure::rgp_mask")(_rgp_mask_fake)
    torch.library.register_fake("cure::revise")(_revise_fake)


def _writes(name: str) -> bool:
    """Whether the C++ op ``cure::name`` writes any of its arguments (``cure::rgp_select`` writes none)."""
    return any(a.alias_info is not None and a.alias_info.is_write
               for a in getattr(torch.ops.cure, name).default._schema.arguments)


def _register_version_bumps(library: torch.library.Library, name: str) -> None:
    """Register, for the C++ op ``cure::name``, an ``ADInplaceOrView`` kernel that bumps the version
    counter of every tensor of every argument its schema marks as written, then runs the op's kernel.

    The same kernel ``torch.library.custom_op`` gives the Python ops. It sits above functionalization,
    so under ``torch.compile`` it bumps the traced (fake or functional) tensors, as eager mode does.
    """
    op = getattr(torch.ops.cure, name).default
    arguments = op._schema.arguments
    written = [(i, a.name) for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write]
    after_view_keyset = torch._C._after_ADInplaceOrView_keyset
    increment = torch._C._increment_version

    def bump_then_redispatch(keyset, *args, **kwargs):
        for i, arg_name in written:
            value = args[i] if i < len(args) else kwargs.get(arg_name)
            if value is not None:
                increment(value if isinstance(value, (list, tuple)) else (value,))
        return op.redispatch(keyset & after_view_keyset, *args, **kwargs)

    library.impl(name, bump_then_redispatch, "ADInplaceOrView", with_keyset=True)


_cxx_library = torch.library.Library("cure", "IMPL")  # kept alive: its registrations last as long as it
for _name in backends.CXX_OPS:
    if (backends.PROBE.extension_error is None and hasattr(torch.ops.cure, _name) and _writes(_name)
            and not torch._C._dispatch_has_kernel_for_dispatch_key(f"cure::{_name}", "ADInplaceOrView")):
        _register_version_bumps(_cxx_library, _name)


def backend_op(op: str, name: str):
    """The registered op that runs ``op`` (``rgp_mask``, ``revise``, ``rgp_select``, ``rgp_sgd_step``) on backend
    ``name``: the Python-registered ``cure::<op>_<name>`` for :data:`~cure_kernels.backends.PYTHON_BACKENDS`,
    else the C++ ``cure::<op>`` (which dispatches to the CPU or CUDA kernel by device)."""
    return getattr(torch.ops.cure, f"{op}_{name}" if name in backends.PYTHON_BACKENDS else op)


_warned_fallback: set[str] = set()


def _resolve(backend: str, device: torch.device, op: str, tensors: Sequence[Tensor] = ()) -> str:
    """The backend that runs ``op`` on ``device`` for ``tensors`` (any list of the call: its dtypes are the key
    of the check): ``backend`` itself when it can run there (else a ``ValueError`` saying why); for "auto",
    :func:`cure_kernels.backends.auto_backend`'s pick, checked first on the device types of
    :data:`~cure_kernels.backends.VERIFY_DEVICE_TYPES` (:func:`cure_kernels.verify.verified_backend`)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__} {backend!r}")
    if backend == "auto" and tensors and device.type in backends.VERIFY_DEVICE_TYPES:
        dtypes = verify.dtypes_key(tensors)
        if torch.compiler.is_compiling():
            name = verify.verified_backend_constant(device, op, dtypes)
        else:
            name = verify.verified_backend(device, op, dtypes)
    else:
        name = backends.resolve_backend(backend, device, op)
    if (backend == "auto" and name in verify.TRUSTED and device.type not in _warned_fallback
            and not torch.compiler.is_compiling()):
        fast = [b for b in backends.AUTO_ORDER.get(device.type, ()) if b not in verify.TRUSTED]
        reasons = [(b, backends.unavailable_reason(b, device, op)) for b in fast]
        if all(reason is not None for _, reason in reasons):  # (else the check turned a fast one down, and said so)
            _warned_fallback.add(device.type)
            why = "; ".join(f"{b}: {reason}" for b, reason in reasons) or "none exists"
            what = ("the reference implementation, which synchronises with the host on every call"
                    if name == "reference" else
                    "the torch backend (PyTorch operations: exact and free of host synchronisation, but slower)")
            warnings.warn(f"cure_kernels: no fast backend for {device.type} tensors ({why}); using {what}",
                          stacklevel=3)
    return name


def rgp_mask_(updates: Sequence[Tensor], grads_nat: Sequence[Tensor], grads_adv: Sequence[Tensor],
              *, alpha: float, p: float, backend: str = "auto") -> MaskStats:
    """Conserve step of CURE: zero the least prominent entries of each update, in place.

    For every tensor i, with s = alpha*|grads_nat[i]| + (1-alpha)*|grads_adv[i]| (Robust Gradient
    Prominence, paper Eq. 6, in float32), sets ``updates[i][s < quantile(s, p)] = 0`` where the
    quantile is exactly ``numpy.quantile`` (docs/method.md). ``p`` is the conserved fraction.

    Like PyTorch's in-place ops: the whole call is checked before anything is written; the updates
    must not overlap themselves or each other (an update may alias a gradient it is scored from); the
    version counter of every update is bumped, so autograd refuses a backward pass that would read a
    value saved before the masking.

    Args:
        updates: the gradients to mask (typically ``param.grad``), modified in place.
        grads_nat: gradients of the natural cross-entropy, one per update.
        grads_adv: gradients of the adversarial cross-entropy, one per update.
        alpha: weight of the natural gradient in the score, in [0, 1] (a Python or numpy scalar).
        p: fraction of entries to conserve per tensor, in [0, 1].
        backend: "auto" (:data:`cure_kernels.backends.AUTO_ORDER`: the C++ kernel on CPU; on CUDA Triton,
            else the C++ CUDA kernel, else the torch backend, each checked once against the torch backend
            before it is trusted, :mod:`cure_kernels.verify`), "reference", "cpu", "triton", "cuda" or "torch"
            (PyTorch operations, any device, never synchronises).

    Returns:
        :class:`MaskStats` on the tensors' device. The C++ backends and the torch backend never synchronise
        with the host (``auto`` on CUDA once, for its check, on its first call per dtypes); Triton does on the
        first call for each set of tensor sizes, dtypes and ``p`` (it uploads its
        tables; :mod:`cure_kernels.backends` says exactly when); the reference on every call.
    """
    alpha = check_fraction("alpha", alpha)
    p = check_fraction("p", p)
    ups, gns, gas = check_tensor_lists(("updates", "grads_nat", "grads_adv"), (updates, grads_nat, grads_adv))
    name = _resolve(backend, ups[0].device if ups else torch.device("cpu"), "rgp_mask", ups)
    if not ups:
        return MaskStats(*_mask_stats_like(ups))
    return MaskStats(*backend_op("rgp_mask", name)(ups, gns, gas, alpha, p))


def revise_(revision: Sequence[Tensor], params: Sequence[Tensor], *, decay: float,
            backend: str = "auto") -> None:
    """Revise step of CURE (paper Eq. 7): ``rev <- decay*rev + (1-decay)*param`` over the list, in place.

    In float32 with ``f32(decay)`` and ``f32(1 - decay)``, each product and the sum rounded separately,
    stored rounded to nearest-even. The revision tensors are written like :func:`rgp_mask_` writes its
    updates (checked first, no overlap among them, version counters bumped); a revision tensor may
    alias its param. No backend but the reference synchronises with the host (and ``auto`` on CUDA once, for
    its check, on its first call per dtypes).
    """
    decay = check_fraction("decay", decay)
    revs, prms = check_tensor_lists(("revision", "params"), (revision, params))
    name = _resolve(backend, revs[0].device if revs else torch.device("cpu"), "revise", revs)
    if revs:
        backend_op("revise", name)(revs, prms, decay)
