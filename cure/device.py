"""Device selection shared by the trainer, the evaluation commands and the analyses."""

from __future__ import annotations

import os

import torch

from cure.config import ConfigError

__all__ = ["pin_inductor_cpu_isa", "select_device"]


def select_device(name: str) -> torch.device:
    """The device for ``name``: "auto" is CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)


def pin_inductor_cpu_isa(device: torch.device) -> int | None:
    """Before ``torch.compile`` on the CPU: make Inductor's vector width part of its FX-graph cache key.

    Inductor picks the width of its C++ code from ``ATEN_CPU_CAPABILITY`` when ``cpp.simdlen`` is unset,
    but the environment variable is not in the key of its on-disk graph cache (torch 2.14.1). A graph
    compiled once with the AVX-512 kernels (16 floats per vector) and replayed under
    ``ATEN_CPU_CAPABILITY=avx2`` is rebuilt with 8-float vectors: its loops step over 16 floats with
    8-float loads and stores, half of every tensor is never written, and the compiled model returns
    garbage (non-finite losses, or out-of-range max-pool indices in its backward). The other order breaks
    the same way. ``scripts/repro_inductor_isa_cache.py`` reproduces it outside this project.

    Setting ``cpp.simdlen`` to the width Inductor would pick anyway changes no generated code and puts the
    width into the key (the key covers Inductor's config). Done only when ``ATEN_CPU_CAPABILITY`` is set
    (without it the width is fixed per machine) and ``cpp.simdlen`` is not set already. Returns the pinned
    width in bits (0: no vector ISA), or None when nothing was changed.
    """
    if device.type != "cpu" or not os.environ.get("ATEN_CPU_CAPABILITY"):
        return None
    from torch._inductor import config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if inductor_config.cpp.simdlen is not None:
        return None
    inductor_config.cpp.simdlen = pick_vec_isa().bit_width()
    return inductor_config.cpp.simdlen
