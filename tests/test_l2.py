"""The L2 threat model: attacks stay in the ball, an L2 attack hurts a trained model, the defaults per
dataset, configuration and command line round trips, and the norm in evaluation results."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cure.attacks import mart_pgd, pgd, trades_pgd
from cure.cli import main
from cure.config import L2_RADII, ConfigError, TrainConfig, default_radius, resolve_config
from cure.data import DATASETS, deterministic_subset, load_split
from cure.evaluation import evaluate
from cure.models import build_model

FMNIST, CIFAR10 = DATASETS["fashion-mnist"], DATASETS["cifar10"]


def _attacks(model, x, y, eps, step):
    g = torch.Generator().manual_seed(0)
    kw = dict(eps=eps, step_size=step, steps=4, norm="l2", generator=g)
    yield "pgd-ce", pgd(model, x, y, loss="ce", **kw)
    yield "pgd-cw", pgd(model, x, y, loss="cw", **kw)
    yield "trades", trades_pgd(model, x, **kw)
    yield "mart", mart_pgd(model, x, y, **kw)


@pytest.mark.parametrize("spec, eps", [(FMNIST, 1.5), (CIFAR10, 0.5)], ids=["fmnist", "cifar10"])
@pytest.mark.parametrize("step_factor", [0.25, 3.0])  # the usual eps/4, and steps far past the boundary
def test_l2_attacks_stay_in_the_ball_and_the_box(spec, eps, step_factor):
    torch.manual_seed(0)
    model = build_model("cnn", spec)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((6, *spec.shape), generator=g)
    x[:2] = (x[:2] > 0.5).float()  # pixels exactly at 0 and 1: the box constraint is active
    y = torch.randint(0, spec.num_classes, (6,), generator=g)
    for name, x_adv in _attacks(model, x, y, eps, eps * step_factor):
        norms = (x_adv - x).flatten(1).norm(dim=1)
        assert float(norms.max()) <= eps + 1e-6, name
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0, name
        assert float(norms.max()) > 0.25 * eps, f"{name} did not move"  # it really attacked


def test_default_radii():
    assert L2_RADII == {"cifar10": 0.5, "cifar100": 0.5, "svhn": 0.5, "fashion-mnist": 1.5}
    assert default_radius("cifar10", "l2") == (0.5, 0.125)
    assert default_radius("fashion-mnist", "l2") == (1.5, 0.375)
    assert default_radius("cifar10", "linf") == (CIFAR10.eps, CIFAR10.step_size)


def _fmnist_subset(n: int, train: bool, seed: int = 0):
    images, labels = load_split("fashion-mnist", None, train=train)
    return deterministic_subset(images, labels, n, seed=seed)


def test_l2_attack_lowers_the_accuracy_of_a_trained_model():
    images, labels = _fmnist_subset(1000, train=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # logistic regression on [0, 1] pixels
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x = images.float() / 255
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        opt.step()
    test_x, test_y = _fmnist_subset(200, train=False)
    kw = dict(spec=FMNIST, batch_size=100, device="cpu", progress=False, norm="l2")
    res = evaluate(model, test_x, test_y, attacks=("nat", "pgd20", "cw"), eps=1.5, **kw)
    assert res["nat"] > 65
    assert res["pgd20"] < res["nat"] - 30 and res["cw"] < res["nat"] - 30
    smaller = evaluate(model, test_x, test_y, attacks=("pgd20",), eps=0.5, **kw)
    assert res["pgd20"] <= smaller["pgd20"] < res["nat"]
    zero = evaluate(model, test_x, test_y, attacks=("nat", "pgd20"), eps=0.0, **kw)
    assert zero["pgd20"] == zero["nat"] == res["nat"]
    # The default radius of evaluate in L2 is the dataset's L2 one (1.5), not its L-inf 0.1.
    assert evaluate(model, test_x, test_y, attacks=("pgd20",), **kw) == {"pgd20": res["pgd20"]}


def test_autoattack_gets_the_l2_norm(monkeypatch):
    import pyautoattack

    seen = {}

    class Recorder:
        def __init__(self, model, norm, eps, version, seed, device):
            seen.update(norm=norm, eps=eps, version=version)

        def run_standard_evaluation(self, x, y, batch_size):
            return x, y

    monkeypatch.setattr(pyautoattack, "AutoAttack", Recorder)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    res = evaluate(model, images, torch.zeros(4, dtype=torch.int64), spec=FMNIST, attacks=("aa",),
                   device="cpu", progress=False, norm="l2")
    assert seen == {"norm": "L2", "eps": 1.5, "version": "standard"} and res == {"aa": 100.0}


def test_evaluate_rejects_bad_norms_and_radii():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)  # equal logits: class 0 is predicted, and every label is 0
    images, labels = torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    kw = dict(spec=FMNIST, attacks=("nat",), device="cpu", progress=False)
    with pytest.raises(ValueError, match="norm must be 'linf' or 'l2'"):
        evaluate(model, images, labels, norm="l1", **kw)
    with pytest.raises(ValueError, match=r"eps must lie in \[0, 1\]"):
        evaluate(model, images, labels, eps=1.5, **kw)
    assert evaluate(model, images, labels, eps=1.5, norm="l2", **kw)["nat"] == 100.0
    with pytest.raises(ValueError, match="eps must be a finite number"):
        evaluate(model, images, labels, eps=float("inf"), norm="l2", **kw)


def test_config_defaults_and_round_trip():
    cfg = resolve_config({"norm": "l2"})  # Fashion-MNIST preset: its L-inf eps 0.1 is replaced
    assert (cfg.norm, cfg.eps, cfg.step_size) == ("l2", 1.5, 0.375)
    cfg = resolve_config({"norm": "l2", "dataset": "cifar10", "arch": "resnet18"})  # the paper preset
    assert (cfg.preset, cfg.eps, cfg.step_size) == ("paper-cifar10-resnet18", 0.5, 0.125)
    cfg = resolve_config({"norm": "l2", "eps": 1.0})
    assert (cfg.eps, cfg.step_size) == (1.0, 0.25)
    cfg = resolve_config({"norm": "l2", "eps": 1.0, "step_size": 0.1})
    assert (cfg.eps, cfg.step_size) == (1.0, 0.1)
    assert resolve_config({}).norm == "linf" and resolve_config({}).eps == 0.1
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.norm == "l2"
    assert TrainConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "norm"}).norm == "linf"
    with pytest.raises(ConfigError, match="norm must be one of 'linf', 'l2'; got 'l1'"):
        resolve_config({"norm": "l1"})
    with pytest.raises(ConfigError, match=r"eps must lie in \[0, 1\], got 1.5"):
        resolve_config({"eps": 1.5})
    with pytest.raises(ConfigError, match="eps must be positive"):
        resolve_config({"norm": "l2", "eps": -1.0})


def test_cli_l2_train_resume_and_eval(tmp_path, capsys):
    out = tmp_path / "l2"
    argv = ["train", "--method", "at", "--norm", "l2", "--dataset", "fashion-mnist", "--arch", "cnn",
            "--epochs", "1", "--batch-size", "32", "--train-samples", "64", "--val-size", "16",
            "--eval-samples", "16", "--attack-steps", "1", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["norm"], config["eps"], config["step_size"]) == ("l2", 1.5, 0.375)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["norm"], summary["eps"]) == ("l2", 1.5)
    assert "L2 eps 1.5" in capsys.readouterr().out
    # A resumed run cannot change the threat model.
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(out), "--resume", "--norm", "linf"])
    assert info.value.code == 2 and "norm: saved 'l2', given 'linf'" in capsys.readouterr().err
    # cure eval uses the run's norm and radius, and records them.
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--attacks", "nat,pgd20", "--eval-samples", "16",
                 "--device", "cpu", "--no-progress"]) == 0
    assert "L2 eps 1.5" in capsys.readouterr().out
    record = json.loads((out / "eval.json").read_text())["last.pt"]
    assert (record["norm"], record["eps"]) == ("l2", 1.5)
    # Another norm needs its own radius.
    with pytest.raises(SystemExit) as info:
        main(["eval", "--checkpoint", str(out / "last.pt"), "--norm", "linf", "--device", "cpu"])
    assert info.value.code == 2 and "give --eps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "bad"), "--norm", "l3"])
    assert info.value.code == 2 and "invalid choice: 'l3'" in capsys.readouterr().err
