"""The command line: argument errors (exit 2 before any work), train, eval, presets, python -m cure."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from cure.cli import main
from cure.config import (
    METHOD_BETA,
    PRESETS,
    ConfigError,
    TrainConfig,
    resolve_config,
    resolve_config_with_sources,
    scale_milestones,
)
from cure.train import nrr

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--dataset",
    "fashion-mnist",
    "--arch",
    "cnn",
    "--epochs",
    "1",
    "--batch-size",
    "32",
    "--train-samples",
    "64",
    "--val-size",
    "16",
    "--eval-samples",
    "16",
    "--attack-steps",
    "1",
    "--kernel-backend",
    "auto",
    "--device",
    "cpu",
    "--no-progress",
]


def _exit_code(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "madry"], "invalid choice: 'madry'"),
        (["--dataset", "imagenet"], "dataset must be one of"),
        (["--arch", "vgg16"], "arch must be one of"),
        (["-p", "1.5"], "p must lie in [0, 1], got 1.5"),
        (["--alpha", "-0.1"], "alpha must lie in [0, 1], got -0.1"),
        (["--epochs", "0"], "epochs must be at least 1, got 0"),
        (["--lr", "-1"], "lr must be positive"),
        (["--lr", "fast"], "invalid float value: 'fast'"),
        (["--revision-decay", "1.2"], "revision_decay must lie in [0, 1]"),
        (["--batch-size", "0"], "batch_size must be at least 1"),
        (["--eps", "2"], "eps must lie in [0, 1]"),
        (["--eval-attacks", "nat,fgsm"], "eval_attacks must be one of"),
        (["--warmup-epochs", "1", "--epochs", "1"], "warmup_epochs must be smaller than epochs"),
        (
            ["--preset", "paper-cifar10-resnet18"],
            "preset 'paper-cifar10-resnet18' is for resnet18 on cifar10",
        ),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--init", "/nonexistent/last.pt"], "does not exist"),
        (["--mask-mode", "weights"], "invalid choice: 'weights'"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code, err = _exit_code(
        ["train", "--out", str(out), "--dataset", "fashion-mnist", "--arch", "cnn", *argv], capsys
    )
    assert code == 2
    assert message in err
    assert not out.exists()  # nothing was started


def test_existing_output_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("not ours")  # not a run's leftover: the directory is occupied
    code, err = _exit_code(["train", "--method", "st", "--out", str(out), *FAST], capsys)
    assert code == 2 and "already exists" in err and "--resume" in err and "--overwrite" in err
    code, err = _exit_code(["train", "--out", str(out), "--resume", *FAST], capsys)
    assert code == 2 and "last.pt" in err
    code, err = _exit_code(["train", "--out", str(out), "--resume", "--overwrite"], capsys)
    assert code == 2 and "contradict" in err
    assert main(["train", "--method", "st", "--out", str(out), "--overwrite", *FAST]) == 0
    assert (out / "notes.txt").read_text() == "not ours" and (out / "summary.json").is_file()
    assert json.loads((out / "config.json").read_text())["method"] == "st"


def test_train_eval_and_resume_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "cure", "--from-scratch", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "PGD-20" in printed and "revision" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "cure" and "nrr" in summary and "rev_nrr" in summary

    # Resuming a finished run with a different hyper-parameter is refused; the same run is fine.
    code, err = _exit_code(["train", "--out", str(out), "--resume", "--lr", "0.3"], capsys)
    assert code == 2 and "lr" in err and "differ" in err
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    capsys.readouterr()

    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out / "last.pt"),
                "--attacks",
                "nat,pgd20",
                "--which",
                "both",
                "--eval-samples",
                "16",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Nat" in printed and "PGD-20" in printed and "NRR" in printed and "revision" in printed
    results = json.loads((out / "eval.json").read_text())["last.pt"]
    assert results["test_images"] == 16 and set(results) >= {"model", "revision"}
    model = results["model"]
    assert set(model) == {"nat_acc", "pgd20_acc", "nrr"}
    nat, rob = model["nat_acc"], model["pgd20_acc"]
    assert model["nrr"] == pytest.approx(0 if nat + rob == 0 else 2 * nat * rob / (nat + rob))

    code, err = _exit_code(["eval", "--checkpoint", str(out / "last.pt"), "--attacks", "nat,fgsm"], capsys)
    assert code == 2 and "unknown attack 'fgsm'" in err
    # A second evaluation with another attack merges into the entry: nothing earlier is dropped.
    argv = ["eval", "--checkpoint", str(out / "last.pt"), "--eval-samples", "16", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--attacks", "cw", "--which", "both"]) == 0
    merged = json.loads((out / "eval.json").read_text())["last.pt"]
    assert merged["attacks"] == ["nat", "pgd20", "cw"]
    assert merged["model"]["pgd20_acc"] == model["pgd20_acc"] and "cw_acc" in merged["model"]
    assert merged["model"]["nrr_cw"] == pytest.approx(nrr(nat, merged["model"]["cw_acc"]))
    # Other settings (here fewer test images) keep the earlier entry whole under "earlier".
    assert main([*argv[:4], "8", *argv[5:], "--attacks", "nat"]) == 0
    latest = json.loads((out / "eval.json").read_text())["last.pt"]
    assert latest["test_images"] == 8 and latest["attacks"] == ["nat"]
    assert latest["earlier"][0]["model"] == merged["model"] and latest["earlier"][0]["test_images"] == 16
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    code, err = _exit_code(["eval", "--checkpoint", str(bad)], capsys)
    assert code == 2 and "bad.pt" in err


def test_presets_state_their_sources(capsys):
    assert main(["presets"]) == 0
    printed = capsys.readouterr().out
    for name in PRESETS:
        assert name in printed
    assert "paper Table 9" in printed and "official README" in printed
    # beta per method, with its source
    assert "--trades_beta default 5" in printed and "Zhang et al. 2019" in printed
    assert "scaled to the same fractions of --epochs" in printed


def test_presets_and_overrides():
    cfg = resolve_config({"dataset": "cifar10", "arch": "resnet18", "method": "cure"})
    assert cfg.preset == "paper-cifar10-resnet18"
    assert (cfg.p, cfg.alpha, cfg.gamma, cfg.lr, cfg.epochs, cfg.weight_decay) == (
        0.3,
        0.1,
        1.0,
        0.1,
        200,
        5e-3,
    )
    assert cfg.revision_rate == 0.2 and cfg.revision_decay == 0.999 and cfg.lr_milestones == (100, 150)
    assert cfg.beta == 5.0  # the official trainer's --trades_beta, not the loss functions' default 1
    wrn = resolve_config({"dataset": "cifar10", "arch": "wrn-34-10"})
    assert (wrn.p, wrn.alpha, wrn.gamma) == (0.5, 0.3, 0.5)
    svhn = resolve_config({"dataset": "svhn", "arch": "resnet18"})
    assert svhn.alpha == 0.2
    readme = resolve_config(
        {"dataset": "cifar10", "arch": "resnet18"}, preset="official-readme-cifar10-resnet18"
    )
    assert (readme.epochs, readme.weight_decay) == (120, 7e-4)
    over = resolve_config({"dataset": "cifar10", "arch": "resnet18", "p": 0.5, "epochs": 3})
    assert (over.p, over.epochs, over.alpha) == (0.5, 3, 0.1)
    fm = resolve_config({})
    assert (fm.dataset, fm.arch, fm.eps, fm.step_size, fm.attack_steps) == (
        "fashion-mnist",
        "cnn",
        0.1,
        0.025,
        10,
    )
    assert fm.preset == "fashion-mnist-cnn"
    assert fm.method == "cure" and fm.beta == 5.0
    plain = resolve_config({"dataset": "cifar10", "arch": "cnn"})
    assert plain.preset is None
    with pytest.raises(ConfigError, match="unknown configuration field"):
        resolve_config({"learning_rate": 0.1})
    assert resolve_config({"beta": 2.5}).beta == 2.5  # explicit values win
    round_trip = TrainConfig.from_dict(cfg.to_dict())
    assert round_trip == cfg


def test_python_dash_m_cure_is_the_same_command(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "cure", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--method",
        "--resume",
        "--no-mask",
        "--no-revision",
        "--mask-mode",
        "--warmup-epochs",
        "--init",
        "--amp",
        "--compile",
        "--checkpoint-every",
        "--train-samples",
        "--eval-samples",
        "--preset",
        "--overwrite",
        "--data-root",
        "--download",
        "--seed",
        "--device",
        "--print-config",
        "--from-scratch",
        "--eval-protocol",
    ):
        assert option in help_text, option
    bad = subprocess.run(
        [sys.executable, "-m", "cure", "train", "--out", str(tmp_path / "x"), "--dataset", "mnist-ish"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "dataset must be one of" in bad.stderr


@pytest.mark.parametrize(
    "dataset, arch, method, beta",
    [
        ("cifar10", "resnet18", "cure", 5.0),
        ("cifar10", "resnet18", "trades", 6.0),
        ("cifar100", "wrn-34-10", "trades", 6.0),
        ("fashion-mnist", "cnn", "cure", 5.0),
        ("fashion-mnist", "cnn", "trades", 6.0),
        ("cifar10", "cnn", "cure", 5.0),  # no preset: the method's beta still applies
    ],
)
def test_beta_is_the_methods_value_on_every_dataset(dataset, arch, method, beta):
    cfg, sources = resolve_config_with_sources({"dataset": dataset, "arch": arch, "method": method})
    assert cfg.beta == beta and sources["beta"] == f"default for method {method}"
    assert METHOD_BETA[method][0] == beta
    for preset in PRESETS.values():
        assert "beta" not in preset.values  # beta belongs to the method, not to a dataset preset


def test_method_beta_table_is_extendable(monkeypatch):
    import cure.config as config

    monkeypatch.setitem(config.METHOD_BETA, "at", (3.0, "a test value"))
    assert resolve_config({"method": "at"}).beta == 3.0
    assert METHOD_BETA["mart"][0] == 6.0  # ready for a MART method


def test_preset_milestones_scale_with_the_epochs():
    paper = {"dataset": "cifar10", "arch": "resnet18"}
    cfg, sources = resolve_config_with_sources({**paper, "epochs": 50})
    assert cfg.lr_milestones == (25, 37) and cfg.resolved_milestones() == (25, 37)
    assert sources["lr_milestones"] == "paper-cifar10-resnet18 (100, 150 of 200 epochs, scaled to 50)"
    assert resolve_config(paper).lr_milestones == (100, 150)
    assert resolve_config({**paper, "epochs": 200}).lr_milestones == (100, 150)
    assert resolve_config({**paper, "epochs": 50, "lr_milestones": (40,)}).lr_milestones == (40,)
    assert resolve_config({**paper, "epochs": 2}).lr_milestones == (1,)  # both drops land on epoch 1
    assert resolve_config({**paper, "epochs": 1}).lr_milestones == ()  # nothing left to drop
    readme = resolve_config({**paper, "epochs": 60}, preset="official-readme-cifar10-resnet18")
    assert readme.lr_milestones == (50,)  # 100 of 120 epochs
    assert scale_milestones((100, 150), 200, 400) == (200, 300)


def test_cure_without_a_starting_point_is_refused_with_the_way_to_get_one(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _exit_code(["train", "--method", "cure", "--out", str(out), *FAST], capsys)
    assert code == 2 and "naturally trained network" in err
    assert "cure train --method st --dataset fashion-mnist --arch cnn --out runs/st" in err
    assert "--init runs/st/last.pt" in err and "--from-scratch" in err
    assert not out.exists()
    code, err = _exit_code(
        ["train", "--out", str(out), "--from-scratch", "--init", str(tmp_path / "st.pt"), *FAST], capsys
    )
    assert code == 2 and "contradicts init" in err


def test_print_config_shows_every_value_and_its_source_without_training(tmp_path, capsys, monkeypatch):
    import cure.data
    import cure.train

    def forbidden(*args, **kwargs):
        raise AssertionError("--print-config must not train or read data")

    monkeypatch.setattr(cure.train, "train", forbidden)
    monkeypatch.setattr(cure.data, "load_split", forbidden)
    out = tmp_path / "run"
    argv = ["train", "--method", "cure", "--dataset", "cifar10", "--arch", "resnet18", "--epochs", "50"]
    assert main([*argv, "--out", str(out), "--data-root", str(tmp_path / "none"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {f.name for f in fields(TrainConfig)}
    assert printed["epochs"] == {"value": 50, "source": "command line"}
    assert printed["method"] == {"value": "cure", "source": "command line"}
    assert printed["p"] == {"value": 0.3, "source": "paper-cifar10-resnet18"}
    assert printed["beta"] == {"value": 5.0, "source": "default for method cure"}
    assert printed["lr_milestones"]["value"] == [25, 37] and "scaled to 50" in printed["lr_milestones"]["source"]
    assert printed["seed"] == {"value": 0, "source": "default"}
    assert printed["preset"]["value"] == "paper-cifar10-resnet18"
    assert printed["eval_protocol"] == {"value": "ours", "source": "default"}
    assert not out.exists()
    # No --out is needed; values left to the dataset are shown resolved.
    assert main(["train", "--dataset", "fashion-mnist", "--arch", "cnn", "--preset", "fashion-mnist-cnn",
                 "--eps", "0.2", "--print-config"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["eps"] == {"value": 0.2, "source": "command line"}
    assert printed["step_size"] == {"value": 0.025, "source": "fashion-mnist-cnn"}
    assert printed["preset"]["source"] == "command line"
    assert printed["lr_milestones"] == {"value": [5, 7], "source": "default (50 % and 75 % of 10 epochs)"}
    assert main(["train", "--dataset", "cifar10", "--arch", "cnn", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eps"] == {"value": pytest.approx(8 / 255), "source": "default for dataset cifar10"}
    # Bad values are still reported; training without --out is not possible.
    code, err = _exit_code(["train", "--epochs", "0", "--print-config"], capsys)
    assert code == 2 and "epochs must be at least 1" in err
    code, err = _exit_code(["train", "--method", "st"], capsys)
    assert code == 2 and "--out" in err


def test_official_evaluation_protocol_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "st", "--out", str(out), "--eval-protocol", "official", *FAST]) == 0
    capsys.readouterr()
    assert json.loads((out / "summary.json").read_text())["eval_protocol"] == "official"
    argv = ["eval", "--checkpoint", str(out / "last.pt"), "--eval-samples", "16", "--device", "cpu"]
    assert main([*argv, "--attacks", "nat,pgd20,cw", "--no-progress"]) == 0  # the run's protocol
    assert "official evaluation protocol" in capsys.readouterr().out
    record = json.loads((out / "eval.json").read_text())["last.pt"]
    assert record["eval_protocol"] == "official"
    assert record["attack_settings"]["pgd20"]["step_size"] == 0.003
    assert record["attack_settings"]["cw"] == {
        "eps": 0.1,
        "step_size": 0.003,
        "steps": 20,
        "loss": "cw",
        "kappa": 50.0,
        "random_start": True,
        "clip_start": False,
    }
    assert main([*argv, "--attacks", "nat,cw", "--eval-protocol", "ours", "--no-progress"]) == 0
    record = json.loads((out / "eval.json").read_text())["last.pt"]
    assert record["eval_protocol"] == "ours" and record["attack_settings"]["cw"]["steps"] == 30
    code, err = _exit_code([*argv, "--eval-protocol", "theirs"], capsys)
    assert code == 2 and "invalid choice: 'theirs'" in err


def test_a_closed_pipe_ends_the_command_quietly():
    """`cure presets | head -1`: the reader is gone before the output is written; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "cure", "presets"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has written anything
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141


@pytest.mark.parametrize("flag", ["-p", "--p", "--conserve-fraction"])
def test_the_conserved_fraction_has_three_spellings(flag):
    from cure.cli import build_parser

    args = build_parser().parse_args(["train", "--method", "cure", "--out", "x", flag, "0.4"])
    assert args.p == 0.4


def test_a_failed_start_is_no_dead_end_on_the_command_line(tmp_path, capsys):
    """An unstarted run's leftovers (config.json alone) do not block the rerun; a finished run does."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}\n")
    assert main(["train", "--method", "st", "--out", str(out), *FAST]) == 0
    code, err = _exit_code(["train", "--method", "st", "--out", str(out), *FAST], capsys)
    assert code == 2 and "already exists and is not empty" in err


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_a_data_root_that_does_not_exist_is_an_error(tmp_path, capsys, dataset):
    missing = str(tmp_path / "nowhere")
    argv = ["train", "--method", "st", "--dataset", dataset, "--out", str(tmp_path / "run"), "--data-root", missing]
    code, err = _exit_code(argv, capsys)
    assert code == 2 and f"--data-root {missing} does not exist" in err
    assert not (tmp_path / "run").exists()
