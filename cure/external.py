"""Models from outside this project for ``cure eval`` (torchattacks/RobustBench style).

A model source is one of

* a checkpoint of ``cure train`` (``DIR/last.pt``): handled by :mod:`cure.checkpoint`, not here;
* a TorchScript file (``torch.jit.save`` of ``torch.jit.script``/``trace``), read with ``torch.jit.load``;
* a file written by ``torch.save(model)`` of a whole ``nn.Module``: unpickling it runs code named in the
  file, so it is read (``torch.load(weights_only=False)``) only when the caller allows it explicitly;
* ``module.path:function``: the function is imported (the current directory first on ``sys.path``) and
  called without arguments; it returns the ``nn.Module``.

Every such model follows RobustBench's convention: inputs in [0, 1] (any normalisation inside the
model), logits out. :func:`check_logits` verifies that on one batch before any long attack.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["ModelSourceError", "is_function_source", "load_external_model", "check_logits"]

_FUNCTION_SOURCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ModelSourceError(ValueError):
    """A model source that cannot be loaded or whose model does not fit the dataset; the message says why
    and what to do."""


def is_function_source(source: str) -> bool:
    """Whether ``source`` names ``module.path:function`` rather than a file (an existing file wins)."""
    return not Path(source).exists() and bool(_FUNCTION_SOURCE.match(source))


def _from_function(source: str) -> nn.Module:
    module_name, function_name = source.split(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSourceError(
            f"--model {source}: cannot import module {module_name!r} ({exc}); run from the directory that "
            f"holds it or add that directory to PYTHONPATH"
        ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ModelSourceError(
            f"--model {source}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no function "
            f"{function_name!r}"
        )
    model = function()
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"--model {source}: {function_name}() returned {type(model).__name__}, not a torch.nn.Module; "
            f"it must return the model (inputs in [0, 1], logits out)"
        )
    return model


def _from_file(path: Path, allow_pickle: bool, map_location: torch.device) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location=map_location)
    except Exception:  # not TorchScript: try the pickle of a whole module below
        pass
    if not allow_pickle:
        raise ModelSourceError(
            f"--model {path} is neither a checkpoint of `cure train` nor a TorchScript file; if it was written "
            f"by torch.save(model) of a whole nn.Module and you trust it, add --allow-pickle (loading it runs "
            f"code named in the file)"
        )
    try:
        model = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ModelSourceError(
            f"--model {path} cannot be read as a checkpoint, a TorchScript file or a pickled nn.Module "
            f"({type(exc).__name__}: {exc}); its class must be importable when it is a pickled module"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"--model {path} holds a {type(model).__name__}, not a whole nn.Module (a state_dict needs its "
            f"architecture: wrap it in a `module:function` that builds the model and loads the weights)"
        )
    return model


def load_external_model(source: str, *, allow_pickle: bool = False, map_location="cpu") -> nn.Module:
    """The ``nn.Module`` that ``source`` (a file or ``module.path:function``, see the module docstring) names,
    on ``map_location`` and in eval mode."""
    device = torch.device(map_location)
    if is_function_source(source):
        model = _from_function(source)
    elif Path(source).is_file():
        model = _from_file(Path(source), allow_pickle, device)
    else:
        raise ModelSourceError(
            f"--model {source} does not exist: give a model file (checkpoint, TorchScript, pickled nn.Module) "
            f"or module.path:function"
        )
    return model.to(device).eval()


def check_logits(model: nn.Module, images: Tensor, num_classes: int, dataset: str, source: str) -> None:
    """Run ``model`` on one batch of ``images`` ((B, C, H, W) in [0, 1], on the model's device) and raise
    :class:`ModelSourceError` unless it returns (B, num_classes) logits: the cheap check before the attacks."""
    try:
        with torch.no_grad():
            out = model(images)
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = lines[-1] if lines else type(exc).__name__  # TorchScript puts the cause last
        raise ModelSourceError(
            f"--model {source} fails on {dataset} images of shape {tuple(images.shape[1:])} ({reason}); pass "
            f"the --dataset it was trained on"
        ) from exc
    expected = (images.shape[0], num_classes)
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelSourceError(
            f"--model {source} returns {got} on a batch of {images.shape[0]} {dataset} images; expected "
            f"{expected} logits ({num_classes} classes): pass the --dataset it was trained on, and make it "
            f"return logits only"
        )
