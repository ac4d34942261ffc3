"""Which backends can run here, which one "auto" picks, and why the others cannot.

Everything is probed once, at import, so that choosing a backend inside ``torch.compile`` reads
constants only.

When each backend synchronises the host with the device (waits for queued device work):

* ``reference``: on every call. It computes the quantiles with numpy, so it copies the scores to the
  host; the statistics it returns are built on the host and copied back.
* ``triton``: ``rgp_mask_``, ``rgp_select`` and ``rgp_sgd_step_`` build per-tensor tables (offsets, ranks,
  interpolation weights) on the host and copy them to the device with ``torch.tensor(..., device=...)``,
  a blocking copy that waits for the current stream. This happens on the first call for each combination of
  device, ``p`` and per-tensor dtypes and sizes; the tables are then cached (the 32 most recently used
  combinations), so a training loop with a fixed ``p`` pays it once, and a ``p`` that changes every step
  pays it every step. ``revise_`` never synchronises.
* ``cpu`` and ``cuda`` (the C++ ops): never. On CPU tensors everything runs on the calling thread
  anyway; the CUDA kernels take every table from the shapes and launch on the current stream.
* ``torch`` (PyTorch operations, :mod:`cure_kernels.torch_backend`): never. Everything that depends on the
  data stays on the device: the order statistics come from ``torch.kthvalue``, the interpolation and the
  NaN rule are tensor operations, and the fused step's skip decision is a ``torch.where`` on a device
  boolean; only ``p`` and the shapes (``h = (n - 1)*p``, ``k``, ``g``) are computed on the host.
* ``backend="auto"`` on a device type of :data:`VERIFY_DEVICE_TYPES` (CUDA by default): once per device,
  op and combination of dtypes, on the first call, it checks the backend it picks against the torch
  backend (:mod:`cure_kernels.verify`); that check reads its results on the host, so that first call
  synchronises once. Later calls only read the cached decision. ``CURE_KERNELS_VERIFY=0`` turns it off.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda", "torch")
PYTHON_BACKENDS = ("reference", "triton", "torch")  # registered from Python as cure::<op>_<backend>
BUILD_COMMAND = "pip install --no-build-isolation -e .   (from the repository root)"
CXX_OPS = ("rgp_mask", "revise", "rgp_sgd_step", "rgp_select")  # the C++ op names (csrc/cure_ops.cpp)

# The backend "auto" picks, per device type: the first of the row that can run here.
#
# * cpu: the C++ kernel (ResNet-18's 62 tensors masked in 29.5 ms on 2 cores, where the official
#   code's masking takes 330 ms: bench/results/mask_cpu.csv); the reference, a numpy round trip per
#   tensor meant as the oracle, only when the extension is not built.
# * cuda: no measurement on a GPU exists yet, so this order is not a speed ranking. Triton comes first
#   because it is tested bit for bit against the reference end to end (in Triton's interpreter), while
#   the C++ CUDA kernels run here only in an emulation harness; the C++ CUDA kernels come next because,
#   like Triton, they never synchronise with the host; the torch backend (PyTorch operations, exact,
#   slower, never synchronises either) is the last resort. The reference is not in the row: the torch
#   backend runs wherever it does, returns the same bits (tests/test_torch_backend.py) and never waits
#   for the device, where the reference waits on every call. Before trusting Triton or the CUDA kernels,
#   "auto" checks them against the torch backend once per op and dtypes (cure_kernels.verify,
#   VERIFY_DEVICE_TYPES below) and moves down the row on a mismatch. Revisit this row with
#   bench/bench_mask.py on a GPU.
# * any other device type: the reference (the only backend that runs there).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "torch"),
}


def _verify_device_types(raw: str | None) -> frozenset[str]:
    """The device types on which ``backend="auto"`` checks its choice, from ``CURE_KERNELS_VERIFY``:
    unset or "1": CUDA only; "0": none; otherwise a comma-separated list of device types ("cuda,cpu")."""
    if raw is None or raw.strip() == "1":
        return frozenset({"cuda"})
    if raw.strip() == "0":
        return frozenset()
    types = set()
    for name in (part.strip() for part in raw.split(",")):
        try:
            device = torch.device(name)
        except RuntimeError:
            device = None
        if device is None or device.index is not None:
            raise ValueError(f"CURE_KERNELS_VERIFY={raw!r}: expected 0 (no check), 1 (check on CUDA, the default) "
                             f"or a comma-separated list of device types such as 'cuda,cpu'; {name!r} is not a "
                             f"device type")
        types.add(device.type)
    return frozenset(types)


# Device types on which backend="auto" verifies the backend it picks before trusting it (cure_kernels.verify):
# the first call of each op for each combination of dtypes runs the picked backend and the torch backend on a
# small built-in problem, compares the results bit for bit and, on a difference or an exception, warns once and
# moves down AUTO_ORDER's row. Read once, at import, from the environment variable CURE_KERNELS_VERIFY.
VERIFY_DEVICE_TYPES: frozenset[str] = _verify_device_types(os.environ.get("CURE_KERNELS_VERIFY"))


@dataclass(frozen=True)
class _Probe:
    extension_error: str | None  # why cure_kernels._C could not be imported, or None
    extension_has_cpu: bool  # the extension registered CPU kernels (of cure::rgp_mask)
    extension_has_cuda: bool  # the extension registered CUDA kernels (of cure::rgp_mask)
    cxx_kernels: frozenset[tuple[str, str]]  # (op, dispatch key) pairs with a registered C++ kernel
    triton_error: str | None  # why Triton cannot be imported, or None
    triton_interpret: bool  # TRITON_INTERPRET=1: Triton kernels run on CPU tensors
    cuda_device: bool  # torch sees a CUDA GPU


def _probe() -> _Probe:
    kernels: set[tuple[str, str]] = set()
    try:
        from cure_kernels import _C  # noqa: F401  (imported for its op registrations)

        extension_error = None
        for op in CXX_OPS:
            for key in ("CPU", "CUDA"):
                if (hasattr(torch.ops.cure, op)
                        and torch._C._dispatch_has_kernel_for_dispatch_key(f"cure::{op}", key)):
                    kernels.add((op, key))
    except ImportError as exc:
        extension_error = f"the C++ extension cure_kernels._C is not built ({exc}); build it with: {BUILD_COMMAND}"
    if importlib.util.find_spec("triton") is None:
        triton_error = "Triton is not installed (pip install triton; it ships with CUDA builds of PyTorch)"
    else:
        triton_error = None
    return _Probe(extension_error, ("rgp_mask", "CPU") in kernels, ("rgp_mask", "CUDA") in kernels,
                  frozenset(kernels), triton_error, os.environ.get("TRITON_INTERPRET", "0") == "1",
                  torch.cuda.is_available())


PROBE = _probe()


def _runnable_elsewhere(backend: str, device: torch.device, op: str) -> str:
    """' use X or Y' naming the backends other than ``backend`` that can run on ``device``."""
    others = [b for b in BACKENDS if b != backend and _reason(b, device, op, name_others=False) is None]
    return "use " + " or ".join(repr(b) for b in others) if others else "no backend runs there"


def unavailable_reason(backend: str, device: torch.device, op: str = "rgp_mask") -> str | None:
    """Why ``backend`` cannot run ``op`` (a name of :data:`CXX_OPS`) on tensors on ``device``; None if it can."""
    return _reason(backend, device, op, name_others=True)


def _reason(backend: str, device: torch.device, op: str, name_others: bool) -> str | None:
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of 'auto', " + ", ".join(repr(b) for b in BACKENDS)
    if backend in ("reference", "torch"):
        return None  # PyTorch operations: wherever PyTorch runs (meta tensors are refused by the argument checks)
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return (f"backend {backend!r} runs on {backend.upper()} tensors, but the tensors are on {device}"
                    + ("; " + _runnable_elsewhere(backend, device, op) if name_others else ""))
        if PROBE.extension_error is not None:
            return PROBE.extension_error
        if (op, backend.upper()) not in PROBE.cxx_kernels:
            if backend == "cuda" and ("rgp_mask", "CUDA") not in PROBE.cxx_kernels:
                return ("the C++ extension was built without its CUDA kernels (no CUDA toolkit at build time, "
                        "or CURE_SKIP_CUDA_BUILD=1); rebuild with: CUDA_HOME=/usr/local/cuda " + BUILD_COMMAND)
            return (f"the C++ extension has no {backend.upper()} kernel of cure::{op} (built from older sources?); "
                    f"rebuild it with: {BUILD_COMMAND}")
        return None
    # triton
    if PROBE.triton_error:
        return PROBE.triton_error
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if PROBE.triton_interpret:
            return None
        return ("backend 'triton' needs CUDA tensors; on CPU tensors it runs only in Triton's interpreter "
                "(set TRITON_INTERPRET=1 before Python starts; slow, meant for tests)")
    return (f"backend 'triton' does not run on {device} tensors"
            + ("; " + _runnable_elsewhere(backend, device, op) if name_others else ""))


def auto_backend(device: torch.device, op: str = "rgp_mask") -> str:
    """The backend ``backend="auto"`` runs ``op`` with on ``device``: the first of :data:`AUTO_ORDER`'s
    row for the device type that can run here (the comment above the table says why that order)."""
    for backend in AUTO_ORDER.get(device.type, ("reference",)):
        if unavailable_reason(backend, device, op) is None:
            return backend
    return "reference"


def resolve_backend(backend: str, device: torch.device, op: str = "rgp_mask") -> str:
    """Map ``backend`` ("auto" or a name) to a backend that can run ``op`` on ``device``, or raise."""
    if backend == "auto":
        return auto_backend(device, op)
    reason = unavailable_reason(backend, device, op)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return backend


def resolved_backends(device: torch.device | str) -> dict[str, str]:
    """The backend ``backend="auto"`` runs each op with on ``device``, for a trainer to print and record.

    ``{op: backend}`` for the ops of :data:`CXX_OPS` ("rgp_mask", "revise", "rgp_sgd_step", "rgp_select").
    Where "auto" checks its pick (:data:`VERIFY_DEVICE_TYPES`) the value is the checked decision; when the
    decisions for several dtype combinations differ, it lists them ("cuda (bfloat16); triton (float32)"),
    and before the op's first call it is the first candidate followed by " (not checked yet)".
    """
    from cure_kernels import verify  # (imports this module)

    device = torch.device(device)
    if device.type == "cuda" and device.index is None and PROBE.cuda_device:
        device = torch.device("cuda", torch.cuda.current_device())
    out = {}
    for op in CXX_OPS:
        first = auto_backend(device, op)
        if device.type not in VERIFY_DEVICE_TYPES:
            out[op] = first
            continue
        made = {dtypes: name for (dev, o, dtypes), name in verify.decisions.items() if dev == str(device) and o == op}
        if not made:
            out[op] = first + ("" if first in verify.TRUSTED else " (not checked yet)")
        elif len(set(made.values())) == 1:
            out[op] = next(iter(made.values()))
        else:
            out[op] = "; ".join(f"{name} ({', '.join(dtypes)})" for dtypes, name in sorted(made.items()))
    return out


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run here: on ``device`` if given, else on any device this machine has."""
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if PROBE.cuda_device else [])
    return [b for b in BACKENDS if any(unavailable_reason(b, d) is None for d in devices)]
