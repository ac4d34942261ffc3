"""MART (Wang et al., ICLR 2020): the loss against a direct re-derivation, its attack, its steps in the
trainer (training, fault skipping, data-parallel ranks) and the command line."""

from __future__ import annotations

import copy
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from cure.attacks import mart_pgd
from cure.cli import main
from cure.config import METHOD_BETA, TrainConfig, resolve_config
from cure.data import DATASETS
from cure.distributed import DistributedContext
from cure.methods import STEP_FUNCTIONS, build_step_context, mart_loss, mart_step
from cure.models import build_model

SPEC = DATASETS["fashion-mnist"]


def _direct_mart_loss(logits_nat, logits_adv, y, beta):
    """MART's loss written out from its definition with probabilities, in float64, one example at a time."""
    total_bce, total_kl = 0.0, 0.0
    n = len(y)
    p_nat = F.softmax(logits_nat.double(), dim=1)
    p_adv = F.softmax(logits_adv.double(), dim=1)
    for i in range(n):
        t = int(y[i])
        wrong = max(p_adv[i, k] for k in range(p_adv.shape[1]) if k != t)
        total_bce = total_bce - torch.log(p_adv[i, t]) - torch.log(1 - wrong)
        kl = sum(p_nat[i, c] * (torch.log(p_nat[i, c]) - torch.log(p_adv[i, c])) for c in range(p_nat.shape[1]))
        total_kl = total_kl + kl * (1 - p_nat[i, t])
    return total_bce / n + beta * total_kl / n


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_mart_loss_equals_the_direct_derivation(beta, seed):
    g = torch.Generator().manual_seed(seed)
    logits_nat = 2 * torch.randn(6, 5, generator=g)
    logits_adv = 2 * torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    got = mart_loss(logits_nat, logits_adv, y, beta)
    assert got.dtype == torch.float32
    expected = _direct_mart_loss(logits_nat, logits_adv, y, beta)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_mart_loss_gradients_equal_the_direct_derivation():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    mart_loss(a1, b1, y, 6.0).backward()
    _direct_mart_loss(a2, b2, y, 6.0).backward()
    # Gradients reach the natural logits through the KL and through the weight 1 - p_y(x).
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-4, atol=1e-6)


def test_mart_loss_parts():
    # Identical natural and adversarial logits: the KL term vanishes and the boosted CE remains.
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    y = torch.tensor([0, 2])
    p = F.softmax(logits.double(), 1)
    boosted = (-(p[0, 0].log()) - (1 - p[0, 1]).log() - p[1, 2].log() - (1 - p[1, 1]).log()) / 2
    torch.testing.assert_close(mart_loss(logits, logits, y, 6.0).double(), boosted, rtol=1e-6, atol=1e-6)
    # A confidently right natural prediction scales its KL by 1 - p_y(x), which is about 0.
    nat = torch.tensor([[30.0, 0.0, 0.0]])
    adv = torch.tensor([[0.0, 5.0, 0.0]])
    only_bce = mart_loss(nat, adv, torch.tensor([0]), 0.0)
    assert float(mart_loss(nat, adv, torch.tensor([0]), 6.0) - only_bce) < 1e-9


def test_mart_loss_is_finite_for_extreme_confidence():
    # p_k(x') rounds to 1 in float32: 1 - p_k would be 0; the log-sum-exp form stays finite.
    nat = torch.tensor([[0.0, 80.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[0.0, 80.0, -5.0]], requires_grad=True)
    loss = mart_loss(nat, adv, torch.tensor([0]), 6.0)
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 80
    assert torch.isfinite(nat.grad).all() and torch.isfinite(adv.grad).all()


def _config(**kw) -> TrainConfig:
    base = dict(method="mart", dataset="fashion-mnist", arch="cnn", lr=0.02, attack_steps=3, eps=0.1,
                step_size=0.03, beta=6.0, kernel_backend="auto")
    base.update(kw)
    return TrainConfig(**base).validate()


def _batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SPEC.shape), generator=g), torch.randint(0, SPEC.num_classes, (n,), generator=g)


def _context(cfg, seed: int = 0, module=None):
    torch.manual_seed(seed)
    module = build_model(cfg.arch, SPEC) if module is None else module
    return build_step_context(cfg, module, eps=cfg.eps, step_size=cfg.step_size, attack_seed=1, revision_seed=2)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_mart_pgd_starts_near_x_stays_in_the_ball_and_raises_ce(norm):
    torch.manual_seed(0)
    model = build_model("cnn", SPEC).eval()
    x, y = _batch(8)
    eps = 0.1 if norm == "linf" else 1.5
    start = mart_pgd(model, x, y, eps=eps, step_size=eps / 4, steps=0, norm=norm,
                     generator=torch.Generator().manual_seed(0))
    assert 0 < float((start - x).abs().max()) < 0.01  # x + 0.001 N(0, I), clipped to [0, 1]
    x_adv = mart_pgd(model, x, y, eps=eps, step_size=eps / 4, steps=5, norm=norm,
                     generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + 1e-6
    else:
        assert float(delta.norm(dim=1).max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(start), y)


def test_mart_step_uses_the_loss_on_its_attack(monkeypatch):
    """The step's loss is mart_loss on (f(x), f(x_adv)) in train mode, x_adv from mart_pgd."""
    import cure.methods as methods

    ctx = _context(_config())
    x, y = _batch()
    seen = {}
    real = methods.mart_pgd

    def attack(*args, **kw):
        seen["x_adv"] = real(*args, **kw)
        seen["kw"] = kw
        return seen["x_adv"]

    monkeypatch.setattr(methods, "mart_pgd", attack)
    model0 = copy.deepcopy(ctx.module).train()
    result = mart_step(ctx, x, y)
    assert seen["kw"]["norm"] == "linf" and seen["kw"]["steps"] == 3
    with torch.no_grad():
        expected = mart_loss(model0(x), model0(seen["x_adv"]), y, 6.0)
    torch.testing.assert_close(result.loss, expected)


def test_mart_training_steps_reduce_the_loss():
    cfg = _config()
    ctx = _context(cfg)
    x, y = _batch()
    assert STEP_FUNCTIONS["mart"] is mart_step

    def fixed_loss() -> float:
        probe = copy.deepcopy(ctx.module)
        x_adv = mart_pgd(probe, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps,
                         generator=torch.Generator().manual_seed(7))
        probe.train()
        with torch.no_grad():
            return float(mart_loss(probe(x), probe(x_adv), y, cfg.beta))

    before = fixed_loss()
    losses = []
    for _ in range(12):
        result = mart_step(ctx, x, y)
        assert not bool(result.skipped)
        losses.append(float(result.loss))
    after = fixed_loss()
    assert after < 0.8 * before, f"MART loss on a repeated batch went {before} -> {after}"
    assert losses[-1] < losses[0]


def test_mart_skips_a_non_finite_step():
    ctx = _context(_config())
    x, y = _batch()
    x[0, 0, 0, 0] = float("nan")
    before = [q.detach().clone() for q in ctx.module.parameters()]
    buffers = [b.clone() for b in ctx.module.buffers()]
    result = mart_step(ctx, x, y)
    assert bool(result.skipped) and not torch.isfinite(result.loss)
    assert all(torch.equal(a, q) for a, q in zip(before, ctx.module.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, ctx.module.buffers()))
    ok = mart_step(ctx, *_batch(seed=1))  # the next good batch trains normally
    assert not bool(ok.skipped)


def test_mart_beta_default_and_override():
    assert METHOD_BETA["mart"][0] == 6.0
    assert resolve_config({"method": "mart"}).beta == 6.0
    assert resolve_config({"method": "mart", "beta": 2.0}).beta == 2.0
    for method in ("trades", "cure"):  # the other methods keep their own value
        assert resolve_config({"method": method}).beta == METHOD_BETA[method][0]


# ------------------------------------------------------------------------------------------------
# Data-parallel: two ranks take MART steps on their shards and end with identical weights.
class _NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))

    def forward(self, x):
        return self.net(x)


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", store=tdist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        cfg = _config(eps=0.0)  # eps 0: x_adv = x, so the per-rank attack noise plays no part
        module = _NoBatchNorm()
        ctx = build_step_context(cfg, module, eps=0.0, step_size=0.01, attack_seed=rank, revision_seed=2,
                                 dist=DistributedContext(rank, 2, rank))
        x, y = _batch(16, seed=0)
        for _ in range(2):
            mart_step(ctx, x[rank::2], y[rank::2])
        torch.save(module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def test_mart_data_parallel_ranks_agree_with_one_process(tmp_path):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # One process on the whole batch takes the same steps (gradients are means over the batch).
    torch.manual_seed(0)
    cfg = _config(eps=0.0)
    module = _NoBatchNorm()
    ctx = build_step_context(cfg, module, eps=0.0, step_size=0.01, attack_seed=0, revision_seed=2)
    x, y = _batch(16, seed=0)
    for _ in range(2):
        mart_step(ctx, torch.cat([x[0::2], x[1::2]]), torch.cat([y[0::2], y[1::2]]))
    for key, value in module.state_dict().items():
        torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
def test_cli_trains_mart(tmp_path, capsys):
    out = tmp_path / "mart"
    argv = ["train", "--method", "mart", "--dataset", "fashion-mnist", "--arch", "cnn", "--epochs", "1",
            "--batch-size", "32", "--train-samples", "64", "--val-size", "16", "--eval-samples", "16",
            "--attack-steps", "1", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert config["method"] == "mart" and config["beta"] == 6.0
    assert summary["method"] == "mart" and summary["norm"] == "linf" and summary["eps"] == 0.1
    assert 0 <= summary["pgd20_acc"] <= 100 and 0 <= summary["nat_acc"] <= 100
    assert "MART on fashion-mnist" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    assert "mart (Wang et al. 2020; beta 6 unless --beta)" in " ".join(capsys.readouterr().out.split())
