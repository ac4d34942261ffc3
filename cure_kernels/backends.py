"""Which backends can run here, which one "auto" picks, and why the others cannot.

Everything is probed once, at import, so that choosing a backend inside ``torch.compile`` reads
constants only.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
BUILD_COMMAND = "pip install --no-build-isolation -e .   (from the repository root)"


@dataclass(frozen=True)
class _Probe:
    extension_error: str | None  # why cure_kernels._C could not be imported, or None
    extension_has_cpu: bool  # the extension registered CPU kernels
    extension_has_cuda: bool  # the extension registered CUDA kernels
    triton_error: str | None  # why Triton cannot be imported, or None
    triton_interpret: bool  # TRITON_INTERPRET=1: Triton kernels run on CPU tensors
    cuda_device: bool  # torch sees a CUDA GPU


def _probe() -> _Probe:
    try:
        from cure_kernels import _C  # noqa: F401  (imported for its op registrations)

        extension_error = None
        has_cpu, has_cuda = (torch._C._dispatch_has_kernel_for_dispatch_key("cure::rgp_mask", key)
                             for key in ("CPU", "CUDA"))
    except ImportError as exc:
        extension_error = f"the C++ extension cure_kernels._C is not built ({exc}); build it with: {BUILD_COMMAND}"
        has_cpu = has_cuda = False
    if importlib.util.find_spec("triton") is None:
        triton_error = "Triton is not installed (pip install triton; it ships with CUDA builds of PyTorch)"
    else:
        triton_error = None
    return _Probe(extension_error, has_cpu, has_cuda, triton_error,
                  os.environ.get("TRITON_INTERPRET", "0") == "1", torch.cuda.is_available())


PROBE = _probe()


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors on ``device``; None if it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of 'auto', " + ", ".join(repr(b) for b in BACKENDS)
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, but the tensors are on {device}; use 'cuda' or 'triton'"
        if PROBE.extension_error is None and not PROBE.extension_has_cpu:
            return "the C++ extension has no CPU kernels registered; rebuild it with: " + BUILD_COMMAND
        return PROBE.extension_error
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, but the tensors are on {device}; use 'cpu'"
        if PROBE.extension_error:
            return PROBE.extension_error
        if not PROBE.extension_has_cuda:
            return ("the C++ extension was built without its CUDA kernels (no CUDA toolkit at build time, "
                    "or CURE_SKIP_CUDA_BUILD=1); rebuild with: CUDA_HOME=/usr/local/cuda " + BUILD_COMMAND)
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
    return f"backend 'triton' does not run on {device} tensors"


def auto_backend(device: torch.device) -> str:
    """The fastest backend measured for ``device`` among those that can run here.

    The CUDA kernels stay out of this choice until they are measured on a GPU (see bench/).
    """
    if device.type == "cpu":
        return "cpu" if unavailable_reason("cpu", device) is None else "reference"
    if device.type == "cuda" and unavailable_reason("triton", device) is None:
        return "triton"
    return "reference"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` ("auto" or a name) to a backend that can run on ``device``, or raise."""
    if backend == "auto":
        return auto_backend(device)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return backend


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run here: on ``device`` if given, else on any device this machine has."""
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if PROBE.cuda_device else [])
    return [b for b in BACKENDS if any(unavailable_reason(b, d) is None for d in devices)]
