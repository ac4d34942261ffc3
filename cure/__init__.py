"""CURE (Conserve-Update-Revise) adversarial training: methods, trainer, checkpoints and command line.

>>> import cure
>>> model = cure.load_model("runs/cure/last.pt")  # eval mode, inputs in [0, 1], logits out
>>> revision = cure.load_model("runs/cure/last.pt", which="revision")  # the revision model

The training entry points are :func:`cure.train.train` (Python) and ``cure train`` (command line).
"""

from cure.checkpoint import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"
