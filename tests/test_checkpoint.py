"""Checkpoints: atomic saves, round trip, corrupt files, and the load_model format."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import cure
import cure.checkpoint as checkpoint
from cure.checkpoint import (
    CheckpointError,
    atomic_save,
    capture_rng,
    load_checkpoint,
    load_model,
    restore_rng,
)
from cure.data import DATASETS
from cure.train import train


@pytest.fixture(scope="module")
def cure_run(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("cure_run")
    train(tiny_config(method="cure"), out, echo=False)
    return out


@pytest.fixture(scope="module")
def st_run(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("st_run")
    train(tiny_config(method="st"), out, echo=False)
    return out


def test_checkpoint_holds_everything_needed_to_resume(cure_run):
    state = load_checkpoint(cure_run / "last.pt")
    assert state["format"] == "cure-checkpoint" and state["version"] == 1
    for key in ("config", "model", "revision", "optimizer", "scheduler", "progress", "rng", "trainer"):
        assert key in state, key
    assert state["progress"] == {"epoch": 1, "batch": 0, "step": 2, "cure_step": 2}
    assert set(state["rng"]) >= {"torch", "numpy", "python", "generators"}
    assert set(state["rng"]["generators"]) == {"attack", "revision"}
    assert state["config"]["method"] == "cure"
    assert len(state["trainer"]["history"]) == 1 and state["trainer"]["best"]["epoch"] == 1
    momentum = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert momentum and any(m.abs().sum() > 0 for m in momentum)


def test_rng_round_trip():
    gens = {"a": torch.Generator().manual_seed(1)}
    saved = capture_rng(gens)
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gens["a"]))
    restore_rng(saved, gens)
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gens["a"]))
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and torch.equal(expected[3], got[3])


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert list(tmp_path.iterdir()) == [path]


def test_a_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"a": torch.arange(4)}, path)
    good = path.read_bytes()

    def broken_save(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": torch.arange(8)}, path)
    assert path.read_bytes() == good
    assert not (tmp_path / "last.pt.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_error_naming_the_file(cure_run, tmp_path, damage):
    data = (cure_run / "last.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 100, "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match="bad.pt") as info:
        load_checkpoint(bad)
    assert "truncated, corrupt" in str(info.value)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_model(bad)


def test_wrong_kind_of_file_and_missing_file(tmp_path):
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(1)}, other)
    with pytest.raises(CheckpointError, match="not a CURE training checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("which", ["model", "revision"])
def test_load_model_format(cure_run, which):
    model = cure.load_model(cure_run / "last.pt", which=which)
    assert isinstance(model, torch.nn.Module) and not model.training
    spec = DATASETS["fashion-mnist"]
    x = torch.rand(5, *spec.shape)  # inputs in [0, 1]; normalisation is inside the model
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (5, spec.num_classes) and torch.isfinite(logits).all()
    state = load_checkpoint(cure_run / "last.pt")
    weights = state["model"] if which == "model" else state["revision"]["module"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_load_model_revision_of_a_run_without_one(st_run):
    with pytest.raises(CheckpointError, match="no revision model"):
        load_model(st_run / "last.pt", which="revision")
    with pytest.raises(ValueError, match="which"):
        load_model(st_run / "last.pt", which="ema")
