"""Exact resume: an interrupted run continued from last.pt ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cure.checkpoint import CheckpointError, load_checkpoint
from cure.config import ConfigError
from cure.train import lock_run_dir, train

ROOT = Path(__file__).resolve().parents[1]
#: This file's runs: the shared tiny configuration with two epochs of five steps and two attack steps.
RESUME = dict(epochs=2, train_samples=160, attack_steps=2, revision_rate=0.5)
_TIMING = {"epoch_seconds", "train_seconds", "train_images_per_second"}


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), f"model {key}"
    if sa["revision"] is not None:
        assert sa["revision"]["updates"] == sb["revision"]["updates"]
        for key, value in sa["revision"]["module"].items():
            assert torch.equal(value, sb["revision"]["module"][key]), f"revision {key}"
    for pid, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], sb["optimizer"]["state"][pid]["momentum_buffer"])
    assert sa["progress"] == sb["progress"]
    with open(a / "metrics.csv") as fa, open(b / "metrics.csv") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert len(ra) == len(rb) == RESUME["epochs"]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in _TIMING} == {
            k: v for k, v in y.items() if k not in _TIMING
        }
    # Per-layer statistics: the epoch sums are checkpointed, the finished epochs' rows rewritten from it.
    assert (a / "layer_stats.csv").read_text() == (b / "layer_stats.csv").read_text()
    ja = json.loads((a / "summary.json").read_text())
    jb = json.loads((b / "summary.json").read_text())
    assert {k: v for k, v in ja.items() if k not in _TIMING} == {
        k: v for k, v in jb.items() if k not in _TIMING
    }


@pytest.mark.parametrize(
    "kw",
    [dict(method="cure"), dict(method="cure", warmup_epochs=1, mask_mode="update"), dict(method="at")],
    ids=["cure", "cure-eff-update", "at"],
)
def test_resume_mid_epoch_is_exact(tmp_path, kw, tiny_config):
    cfg = tiny_config(**{**RESUME, **kw, "checkpoint_every": 3})
    train(cfg, tmp_path / "whole", echo=False)
    assert train(cfg, tmp_path / "split", stop_after_step=7, echo=False) is None
    progress = load_checkpoint(tmp_path / "split" / "last.pt")["progress"]
    assert progress["epoch"] == 1 and progress["batch"] == 2  # 5 steps per epoch: stopped inside epoch 2
    assert not (tmp_path / "split" / "summary.json").exists()
    train(cfg, tmp_path / "split", resume=True, echo=False)
    _assert_same_run(tmp_path / "whole", tmp_path / "split")


def test_resume_after_a_completed_epoch_and_of_a_finished_run(tmp_path, tiny_config, capsys):
    cfg = tiny_config(**RESUME, method="trades")
    train(cfg, tmp_path / "whole", echo=False)
    assert train(cfg, tmp_path / "split", stop_after_step=5, echo=False) is None
    assert load_checkpoint(tmp_path / "split" / "last.pt")["progress"]["batch"] == 0
    train(cfg, tmp_path / "split", resume=True, echo=False)
    _assert_same_run(tmp_path / "whole", tmp_path / "split")
    # Nothing left to train: says so and returns the finished run's summary without evaluating again.
    before = (tmp_path / "split" / "summary.json").stat().st_mtime_ns
    summary = train(None, tmp_path / "split", resume=True)
    assert "nothing to do" in capsys.readouterr().out
    assert summary == json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["pgd20_acc"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["pgd20_acc"]
    assert (tmp_path / "split" / "summary.json").stat().st_mtime_ns == before


def test_resume_with_more_epochs_extends_a_finished_run(tmp_path, tiny_config, capsys):
    """--resume --epochs N continues a finished run for the extra epochs (milestones recomputed and
    stated); a shorter --epochs is refused."""
    import dataclasses

    cfg = tiny_config(**RESUME, method="st")
    train(cfg, tmp_path / "run", echo=False)
    longer = dataclasses.replace(cfg, epochs=cfg.epochs + 2)
    summary = train(longer, tmp_path / "run", resume=True)
    assert "extending" in capsys.readouterr().out
    assert summary["epochs"] == cfg.epochs + 2 and summary["last_epoch"] == cfg.epochs + 2
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + cfg.epochs + 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == cfg.epochs + 2
    with pytest.raises(ConfigError, match="extended, not shortened"):
        train(dataclasses.replace(cfg, epochs=1), tmp_path / "run", resume=True, echo=False)


def test_resume_from_a_corrupt_checkpoint_names_the_file(tmp_path, tiny_config):
    cfg = tiny_config(**{**RESUME, "method": "st", "epochs": 1})
    train(cfg, tmp_path / "r", echo=False)
    last = tmp_path / "r" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="last.pt"):
        train(cfg, tmp_path / "r", resume=True, echo=False)


def _cli(out: Path, *extra: str) -> list[str]:
    options = (
        "--method cure --dataset fashion-mnist --arch cnn --epochs 2 --batch-size 32 --train-samples 320 "
        "--val-size 16 --eval-samples 16 --attack-steps 2 --revision-rate 0.5 --device cpu --no-progress "
        "--checkpoint-every 3 --from-scratch"
    ).split()
    return [sys.executable, "-m", "cure", "train", *options, "--out", str(out), *extra]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli(tmp_path / "whole"), cwd=ROOT, env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            last = out / "last.pt"
            if last.is_file():
                try:
                    progress = load_checkpoint(last)["progress"]
                except CheckpointError:
                    progress = None
                if progress is not None and progress["batch"] > 0 and progress["step"] >= 3:
                    # While it trains, the directory is locked: a second run into it is refused.
                    with pytest.raises(ConfigError, match="is in use"):
                        train(None, out, resume=True, echo=False)
                    proc.send_signal(signal.SIGKILL)
                    break
            if proc.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (out / "summary.json").exists()
    resumed = subprocess.run(_cli(out, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch" in resumed.stdout
    _assert_same_run(tmp_path / "whole", out)


def test_a_run_directory_in_use_is_refused_and_left_alone(tmp_path, tiny_config):
    """While a process holds the run directory (``lock_run_dir``, as ``train`` does for its whole run), a new
    run, a resume and an --overwrite into it are all refused before anything in it changes; once the lock is
    released (the process ended), the same calls go through."""
    cfg = tiny_config(**{**RESUME, "method": "st", "epochs": 1})
    out = tmp_path / "run"
    train(cfg, out, echo=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    fd = lock_run_dir(out)
    try:
        for kw in (dict(resume=True), dict(overwrite=True), dict()):
            with pytest.raises(ConfigError, match="is in use"):
                train(None if kw.get("resume") else cfg, out, echo=False, **kw)
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    finally:
        os.close(fd)
    assert train(None, out, resume=True, echo=False)["epochs"] == 1  # finished: nothing to do, no error
    fd = lock_run_dir(out)  # train released its lock on the way out
    os.close(fd)
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="does not exist"):
        train(None, missing, resume=True, echo=False)
    assert not missing.exists()  # a resume of nothing creates no directory
