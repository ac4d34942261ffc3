"""`cure eval --model` on models that are not checkpoints of `cure train`: TorchScript files, pickled
nn.Modules (--allow-pickle) and module:function; each gives the checkpoint's own numbers, and the errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tiny_runs import write_checkpoint
from torch import nn

from cure.checkpoint import load_model
from cure.cli import main
from cure.data import DATASETS
from cure.models import build_model
from cure.train import nrr

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

EVAL = ["--eval-samples", "16", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny trained CNN checkpoint and its evaluation (nat, pgd20) through `cure eval --checkpoint`."""
    path = write_checkpoint(tmp_path_factory.mktemp("run") / "last.pt", seed=0, steps=3)
    assert main(["eval", "--checkpoint", str(path), "--attacks", "nat,pgd20", *EVAL]) == 0
    return path, json.loads((path.parent / "eval.json").read_text())["last.pt"]["model"]


def _write_module(directory, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text("import torch\nfrom cure.checkpoint import load_model\n\n" + body)


def _save(kind: str, model: nn.Module, directory, monkeypatch) -> tuple[str, list[str]]:
    """``model`` saved as ``kind``: (the --model value, the extra options it needs)."""
    if kind == "script":
        torch.jit.save(torch.jit.script(model), directory / "model.ts")
        return str(directory / "model.ts"), []
    if kind == "trace":
        torch.jit.save(torch.jit.trace(model, torch.rand(2, 1, 28, 28)), directory / "traced.pt")
        return str(directory / "traced.pt"), []
    if kind == "pickle":
        torch.save(model, directory / "whole.pt")
        return str(directory / "whole.pt"), ["--allow-pickle"]
    torch.save(model.state_dict(), directory / "weights.pt")
    _write_module(
        directory,
        "tiny_zoo",
        "def cnn():\n    from cure.data import DATASETS\n    from cure.models import build_model\n\n"
        "    model = build_model('cnn', DATASETS['fashion-mnist'])\n"
        "    model.load_state_dict(torch.load('weights.pt', weights_only=True))\n    return model\n",
    )
    monkeypatch.chdir(directory)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return "tiny_zoo:cnn", ["--out", str(directory / "results")]


@pytest.mark.parametrize("kind", ["script", "trace", "pickle", "function"])
def test_every_kind_of_model_gives_the_checkpoints_numbers(kind, checkpoint, tmp_path, capsys, monkeypatch):
    ckpt, expected = checkpoint
    source, extra = _save(kind, load_model(ckpt), tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(["eval", "--model", source, "--attacks", "nat,pgd20", *EVAL, *extra]) == 0
    printed = capsys.readouterr().out
    assert "model on fashion-mnist, 16 test images, L-inf eps 0.1, ours evaluation protocol" in printed
    assert "PGD-20" in printed and "NRR" in printed
    out_dir = tmp_path / "results" if kind == "function" else tmp_path
    name = "tiny_zoo:cnn" if kind == "function" else source.rsplit("/", 1)[1]
    entry = json.loads((out_dir / "eval.json").read_text())[name]
    assert entry["model"] == expected  # same subset, same attack seed: the checkpoint's numbers exactly
    assert entry["dataset"] == "fashion-mnist" and entry["eps"] == 0.1 and entry["test_images"] == 16
    # A second evaluation merges into the entry.
    assert main(["eval", "--model", source, "--attacks", "cw", *EVAL, *extra]) == 0
    merged = json.loads((out_dir / "eval.json").read_text())[name]
    assert merged["attacks"] == ["nat", "pgd20", "cw"] and merged["model"]["pgd20_acc"] == expected["pgd20_acc"]
    assert merged["model"]["nrr_cw"] == pytest.approx(nrr(expected["nat_acc"], merged["model"]["cw_acc"]))


def test_a_function_writes_eval_json_into_the_current_directory(tmp_path, monkeypatch, capsys):
    _write_module(tmp_path, "tiny_zoo_cwd", "def untrained():\n    return torch.nn.Sequential("
                  "torch.nn.Flatten(), torch.nn.Linear(784, 10))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["eval", "--model", "tiny_zoo_cwd:untrained", "--attacks", "nat", *EVAL]) == 0
    assert set(json.loads((tmp_path / "eval.json").read_text())) == {"tiny_zoo_cwd:untrained"}



def test_attacks_and_corruptions_build_the_model_once(tmp_path, monkeypatch):
    """--attacks with 'corruptions' runs two evaluations on one opened model: a module:function is called
    once (it may be slow, or have side effects), and both results land in the same eval.json entry."""
    _write_module(tmp_path, "tiny_zoo_once", "CALLS = []\n\ndef counted():\n    CALLS.append(1)\n"
                  "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["eval", "--model", "tiny_zoo_once:counted", "--attacks", "nat,corruptions", "--severities", "1",
                 *EVAL]) == 0
    import tiny_zoo_once

    assert len(tiny_zoo_once.CALLS) == 1
    entry = json.loads((tmp_path / "eval.json").read_text())["tiny_zoo_once:counted"]
    assert entry["attacks"] == ["nat", "corruptions"] and "corruption_acc" in entry["model"]
    assert "nat_acc" in entry["model"]

MODULE = (
    "def not_a_model():\n    return {'weights': 1}\n\n"
    "def seven_classes():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 7))\n\n"
    "def for_cifar():\n    from cure.data import DATASETS\n    from cure.models import build_model\n\n"
    "    return build_model('cnn', DATASETS['cifar10'])\n"
)


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("tiny_errors:not_a_model", [], "not_a_model() returned dict, not a torch.nn.Module"),
        ("tiny_errors:seven_classes", [], "returns (4, 7) on a batch of 4 fashion-mnist images; expected (4, 10)"),
        ("tiny_errors:for_cifar", [], "fails on fashion-mnist images of shape (1, 28, 28)"),
        ("tiny_errors:missing", [], "module 'tiny_errors'"),
        ("no_such_module_here:f", [], "cannot import module 'no_such_module_here'"),
        ("tiny_errors:seven_classes", ["--which", "both"], "--which both: only a checkpoint"),
        ("whole.pt", [], "add --allow-pickle"),
        ("junk.pt", [], "neither a checkpoint of `cure train` nor a TorchScript file"),
        ("junk.pt", ["--allow-pickle"], "cannot be read as a checkpoint, a TorchScript file or a pickled"),
        ("missing.pt", [], "--model missing.pt does not exist"),
    ],
)
def test_models_that_do_not_fit_are_refused_before_the_attacks(model, extra, message, tmp_path, monkeypatch,
                                                                capsys):
    _write_module(tmp_path, "tiny_errors", MODULE)
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", model, "--attacks", "nat,pgd20", *EVAL, *extra])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()


def test_a_checkpoint_keeps_its_own_dataset(checkpoint, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--checkpoint", str(checkpoint[0]), "--dataset", "cifar10", *EVAL])
    assert info.value.code == 2
    assert "--dataset cifar10: checkpoint" in capsys.readouterr().err


def test_the_threat_model_comes_from_the_command_line(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(build_model("cnn", DATASETS["fashion-mnist"])), path)
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", str(path), "--eps", "2", *EVAL])
    assert info.value.code == 2 and "--eps must lie in [0, 1], got 2.0" in capsys.readouterr().err
    assert main(["eval", "--model", str(path), "--attacks", "pgd20", "--norm", "l2", *EVAL]) == 0
    entry = json.loads((tmp_path / "eval.json").read_text())["model.ts"]
    assert entry["norm"] == "l2" and entry["eps"] == 1.5 and entry["attack_settings"]["pgd20"]["step_size"] == 0.375
