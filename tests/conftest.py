"""Test configuration. On a machine without a GPU, Triton kernels run in Triton's interpreter on CPU
tensors; the variable must be set before triton is imported anywhere.

``tiny_config`` is the one small training configuration the end-to-end tests share: the small CNN on a
few dozen Fashion-MNIST images, one epoch, one attack step, on the CPU. Tests override what they need.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: The tiny run. ``from_scratch``: CURE starts from random weights here (these runs test the trainer's
#: mechanics; the starting-point check itself has its own tests).
TINY_RUN = dict(
    dataset="fashion-mnist",
    arch="cnn",
    epochs=1,
    batch_size=32,
    train_samples=64,
    val_size=16,
    eval_samples=16,
    attack_steps=1,
    progress=False,
    kernel_backend="auto",
    device="cpu",
    from_scratch=True,
)


def make_tiny_config(preset="auto", **overrides):
    """The tiny configuration with ``overrides`` applied, resolved and validated (``from_scratch`` is
    dropped when the overrides name an ``init`` checkpoint)."""
    from cure.config import resolve_config

    values = {**TINY_RUN, **overrides}
    if values.get("init") is not None and "from_scratch" not in overrides:
        values.pop("from_scratch")
    return resolve_config(values, preset=preset)


@pytest.fixture(scope="session")
def tiny_config():
    """A factory: ``tiny_config(method="cure", epochs=2)`` -> a validated TrainConfig."""
    return make_tiny_config
