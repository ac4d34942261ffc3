"""Device selection shared by the trainer, the evaluation commands and the analyses."""

from __future__ import annotations

import torch

from cure.config import ConfigError

__all__ = ["select_device"]


def select_device(name: str) -> torch.device:
    """The device for ``name``: "auto" is CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)
