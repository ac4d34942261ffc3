"""cure.CureStep, the public CURE step for a user's loop: it is the trainer's step (same bits from the same
state), it uses the user's optimizer (lr schedule, momentum buffers), refuses a mismatched optimizer, and
the README's example runs as written."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import cure
import cure.methods as methods
from cure.config import TrainConfig
from cure.data import DATASETS
from cure.methods import build_step_context
from cure.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SPEC = DATASETS["fashion-mnist"]


def _batch(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n,) + tuple(SPEC.shape), generator=g), torch.randint(0, 10, (n,), generator=g)


def test_cure_step_is_the_trainers_step_bit_for_bit():
    torch.manual_seed(0)
    model = build_model("cnn", SPEC)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = cure.CureStep(model, optimizer, eps=0.1, step_size=0.05, attack_steps=2, revision_rate=0.5, seed=3)
    cfg = TrainConfig(method="cure", lr=0.05, attack_steps=2, eps=0.1, step_size=0.05, revision_rate=0.5).validate()
    ctx = build_step_context(cfg, twin, eps=0.1, step_size=0.05, attack_seed=3, revision_seed=4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5**k)
    for k in range(3):
        x, y = _batch(k)
        ctx.optimizer.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]  # the user's schedule
        ours, theirs = step(x, y), methods.cure_step(ctx, x, y)
        scheduler.step()
        assert torch.equal(ours.loss, theirs.loss) and ours.revised == theirs.revised
        assert torch.equal(ours.loss_cr, theirs.loss_cr)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(step.revision_model.state_dict().values(), ctx.revision.module.state_dict().values()):
        assert torch.equal(a, b)
    bufs = [optimizer.state[q]["momentum_buffer"] for q in model.parameters()]
    assert all(b.any() for b in bufs) and step.steps == 3  # the user's optimizer holds the momentum


def test_an_optimizer_without_the_models_parameters_is_refused():
    model = build_model("cnn", SPEC)
    other = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not hold .* trainable parameters"):
        cure.CureStep(model, other, eps=0.1, step_size=0.025)


def test_the_readme_example_runs_as_written(capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### A whole CURE step in your loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.startswith("loss ") and "kept 7" in printed  # ResNet-20: about 1 - p of the entries kept
    assert not namespace["revision_model"].training


def test_cure_loss_is_the_steps_loss(monkeypatch):
    """cure.cure_loss on the step's own logits equals the loss the step minimised, bit for bit."""
    torch.manual_seed(0)
    model = build_model("cnn", SPEC)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = cure.CureStep(model, optimizer, eps=0.1, step_size=0.05, attack_steps=2, beta=3.0, gamma=0.7)
    step(*_batch(5))  # the revision model moves away from the model
    before, rev_before = copy.deepcopy(model).train(), copy.deepcopy(step.revision_model).train()
    x, y = _batch(6)
    seen = {}
    real = methods.trades_pgd
    monkeypatch.setattr(methods, "trades_pgd", lambda *a, **k: seen.setdefault("x_adv", real(*a, **k)))
    result = step(x, y)
    x_adv = seen["x_adv"]
    with torch.no_grad():
        rev_nat, rev_adv = rev_before(x), rev_before(x_adv)
        expected = cure.cure_loss(before(x), before(x_adv), y, rev_nat, rev_adv, beta=3.0, gamma=0.7)
    assert torch.equal(result.loss, expected)
    assert torch.equal(cure.cure_loss(before(x), before(x_adv), y, None, None, beta=3.0, gamma=0.7),
                       cure.trades_loss(before(x), before(x_adv), y, 3.0))
