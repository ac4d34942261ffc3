"""CURE (Conserve-Update-Revise) adversarial training: methods, trainer, checkpoints and command line.

>>> import cure
>>> model = cure.load_model("runs/cure/last.pt")  # eval mode, inputs in [0, 1], logits out
>>> revision = cure.load_model("runs/cure/last.pt", which="revision")  # the revision model

The training entry points are :func:`cure.train.train` (Python) and ``cure train`` (command line).
For your own loop, :class:`cure.CureStep` (a whole CURE step on your model and optimizer), the losses
:func:`cure.trades_loss`, :func:`cure.mart_loss`, :func:`cure.consistency_loss`, :func:`cure.cure_loss`,
the attacks :func:`cure.pgd` and :func:`cure.trades_pgd`, and :class:`cure.RevisionModel`.
"""

from cure.checkpoint import load_model

_LAZY = {  # imported on first use (they import torch's training stack and the kernels)
    "CureStep": "cure.step", "trades_loss": "cure.methods", "mart_loss": "cure.methods",
    "consistency_loss": "cure.methods", "cure_loss": "cure.methods", "pgd": "cure.attacks",
    "trades_pgd": "cure.attacks", "RevisionModel": "cure.revision",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cure' has no attribute {name!r}")


__all__ = ["load_model", *_LAZY]
__version__ = "0.1.0"
