"""Checkpoints: atomic saves, exact-resume state, readable errors, and :func:`load_model`.

A checkpoint is one ``torch.save`` file holding a dict (loadable with ``weights_only=True``)::

    format, version                      "cure-checkpoint", 1
    config                               the resolved TrainConfig as a dict
    model, revision                      state dicts (revision: None when the run keeps none)
    optimizer, scheduler                 state dicts
    progress                             {epoch, batch, step, cure_step}: where training resumes
    rng                                  torch CPU / CUDA / numpy / python states and the trainer's generators
    trainer                              the rest of the loop state (partial-epoch sums, history, best)

Saving writes ``NAME.tmp`` in the same directory, flushes and fsyncs it, renames it over ``NAME``
(``os.replace`` is atomic on POSIX) and fsyncs the directory, so a crash or a failed save never leaves a
half-written file under the real name and never destroys the previous good checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "atomic_save",
    "atomic_write_text",
    "load_checkpoint",
    "load_model",
    "capture_rng",
    "restore_rng",
]

FORMAT = "cure-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a CURE checkpoint."""


class NotACheckpointError(CheckpointError):
    """The file is readable but no `cure train` checkpoint, or unreadable with ``weights_only=True`` (it may
    be another kind of model file: ``cure eval`` then tries TorchScript and pickled modules)."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through ``path.tmp`` + fsync + ``os.replace`` + directory fsync."""
    _atomic_write(Path(path), lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically (same protocol as :func:`atomic_save`)."""
    _atomic_write(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def _reason(exc: BaseException) -> str:
    """The informative line of a loading error (torch's weights-only errors put it last)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error"):
            return ln
    return lines[0] if lines else "no message"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a trainer checkpoint; raise :class:`CheckpointError` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # any failure to unpickle means the file is unusable; report which one
        raise NotACheckpointError(
            f"checkpoint {path} cannot be read: the file is truncated, corrupt or not a trainer checkpoint "
            f"({type(exc).__name__}: {_reason(exc)}); use another checkpoint or train again"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise NotACheckpointError(f"{path} is not a CURE training checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')!r}; this code reads {VERSION}"
        )
    for key in ("config", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks its '{key}' entry")
    return state


def load_model(
    path: str | os.PathLike, which: str = "model", map_location: str | torch.device = "cpu"
) -> nn.Module:
    """The network stored in a checkpoint, in eval mode: inputs in [0, 1] (normalisation inside), logits out.

    Args:
        path: a checkpoint written by ``cure train`` (``DIR/last.pt`` or ``DIR/best.pt``).
        which: "model" (the trained model) or "revision" (CURE's revision model).
        map_location: device to load the weights onto.
    """
    from cure.data import DATASETS
    from cure.models import build_model

    if which not in ("model", "revision"):
        raise ValueError(f"which must be 'model' or 'revision', got {which!r}")
    state = load_checkpoint(path, map_location=map_location)
    cfg = state["config"]
    if which == "revision":
        if state.get("revision") is None:
            raise CheckpointError(
                f"checkpoint {path} holds no revision model (method {cfg.get('method')!r}"
                f"{', no_revision' if cfg.get('no_revision') else ''}); use which='model'"
            )
        weights = state["revision"]["module"]
    else:
        weights = state["model"]
    model = build_model(cfg["arch"], DATASETS[cfg["dataset"]])
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path}: its {which} weights do not fit a {cfg['arch']} for {cfg['dataset']}: {exc}"
        ) from exc
    model.to(map_location)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------------
# Random number generator states
def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state a run depends on, in a form ``torch.load(weights_only=True)`` accepts."""
    mt_name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": mt_name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for name, g in generators.items():
        if name not in state["generators"]:
            raise CheckpointError(f"the checkpoint has no state for the '{name}' generator")
        g.set_state(state["generators"][name].cpu())
