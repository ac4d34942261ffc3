"""The training loop end to end on tiny Fashion-MNIST subsets: outputs, summary, warm-up, faults."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from cure.checkpoint import CheckpointError
from cure.config import ConfigError, TrainConfig
from cure.train import METRIC_COLUMNS, TrainingError, nrr, results_table, train

#: This file's runs: the shared tiny configuration with two epochs of four steps and two attack steps.
TRAIN = dict(epochs=2, train_samples=128, attack_steps=2, lr=0.05)


@pytest.fixture
def tiny(tiny_config):
    def make(**kw) -> TrainConfig:
        return tiny_config(**{**TRAIN, **kw})

    return make


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("method", ["st", "at", "trades", "cure"])
def test_each_method_writes_a_complete_run_directory(tmp_path, method, capsys, tiny):
    out = tmp_path / method
    summary = train(tiny(method=method), out)
    for name in ("config.json", "metrics.csv", "summary.json", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["epochs"] == 2
    rows = _rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == list(METRIC_COLUMNS)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in (
        "method",
        "dataset",
        "arch",
        "epochs",
        "nat_acc",
        "pgd20_acc",
        "nrr",
        "best_epoch",
        "best_nat_acc",
        "best_pgd20_acc",
        "last_nat_acc",
        "last_pgd20_acc",
        "delta_pgd20_acc",
    ):
        assert key in on_disk, key
    assert on_disk["method"] == method and on_disk["test_images"] == 16
    assert 0 <= on_disk["nat_acc"] <= 100 and 0 <= on_disk["pgd20_acc"] <= 100
    # NRR is the harmonic mean of natural and PGD-20 accuracy, in percent.
    nat, rob = on_disk["nat_acc"], on_disk["pgd20_acc"]
    assert on_disk["nrr"] == pytest.approx(0 if nat + rob == 0 else 2 * nat * rob / (nat + rob))
    assert on_disk["delta_pgd20_acc"] == pytest.approx(on_disk["best_pgd20_acc"] - on_disk["last_pgd20_acc"])
    has_revision = method == "cure"
    assert ("rev_nat_acc" in on_disk) == has_revision
    if has_revision:
        for key in ("rev_pgd20_acc", "rev_nrr", "rev_best_nat_acc", "rev_last_pgd20_acc", "rev_delta_nrr"):
            assert key in on_disk, key
        assert rows[0]["rev_val_pgd20_acc"] != ""
        assert 0 < float(rows[0]["kept_fraction"]) < 1
    else:
        assert float(rows[0]["kept_fraction"]) == 1.0
    # The loss terms: CE and beta * KL for TRADES-style methods, gamma * L_CR and the revision model's
    # training-batch accuracy for CURE; empty where a method has no such term.
    for row in rows:
        trades_style = method in ("trades", "cure")
        for key in ("loss_ce", "loss_kl"):
            assert (row[key] != "") == trades_style, key
        assert (row["loss_cr"] != "") == has_revision and (row["rev_train_nat_acc"] != "") == has_revision
        if trades_style:
            terms = float(row["loss_ce"]) + float(row["loss_kl"]) + (float(row["loss_cr"]) if has_revision else 0.0)
            assert terms == pytest.approx(float(row["train_loss"]), rel=1e-4)
        if has_revision:
            assert 0 <= float(row["rev_train_nat_acc"]) <= 100 and float(row["loss_cr"]) >= 0
    from cure_kernels.backends import CXX_OPS

    assert set(on_disk["kernel_backends"]) == set(CXX_OPS) and on_disk["kernel_backends"]["rgp_sgd_step"] == "cpu"
    printed = capsys.readouterr().out
    assert ("[cure] kernels: rgp_mask cpu" in printed) == has_revision
    assert "Nat" in printed and "PGD-20" in printed and "NRR" in printed
    assert ("revision" in printed.split("Nat")[-1]) == has_revision


def test_nrr_and_table():
    assert nrr(80.0, 40.0) == pytest.approx(2 * 80 * 40 / 120)
    assert nrr(0.0, 0.0) == 0.0
    summary = {
        "method": "cure",
        "dataset": "fashion-mnist",
        "arch": "cnn",
        "test_images": 10,
        "eps": 0.1,
        "last_epoch": 3,
        "best_epoch": 2,
        "selection": "validation pgd20 acc",
        "delta_pgd20_acc": 1.0,
    }
    for prefix in ("last_", "best_", "rev_last_", "rev_best_"):
        summary.update(
            {
                f"{prefix}nat_acc": 80.0,
                f"{prefix}pgd20_acc": 40.0,
                f"{prefix}nrr": 53.33,
                f"{prefix}cw_acc": 35.0,
            }
        )
    table = results_table(summary)
    assert "C&W" in table and "AA" not in table
    assert "revision  best (2)" in table and "trained   last (3)" in table
    assert "53.33" in table


def test_cure_eff_warmup_then_cure_stage(tmp_path, tiny):
    summary = train(tiny(method="cure", epochs=3, warmup_epochs=1), tmp_path / "eff", echo=False)
    rows = _rows(tmp_path / "eff" / "metrics.csv")
    assert [r["stage"] for r in rows] == ["st", "cure", "cure"]
    assert float(rows[0]["kept_fraction"]) == 1.0 and float(rows[1]["kept_fraction"]) < 1.0
    assert rows[0]["rev_val_nat_acc"] == "" and rows[1]["rev_val_nat_acc"] != ""
    assert summary["warmup_epochs"] == 1


def test_init_from_a_natural_checkpoint(tmp_path, tiny):
    train(tiny(method="st", epochs=1), tmp_path / "st", echo=False)
    cfg = tiny(method="cure", epochs=1, init=str(tmp_path / "st" / "last.pt"))
    train(cfg, tmp_path / "cure", echo=False)
    with pytest.raises(ConfigError, match="does not exist"):
        train(tiny(method="cure", init=str(tmp_path / "missing.pt")), tmp_path / "x", echo=False)


def test_best_epoch_is_chosen_on_validation_not_test(tmp_path, tiny):
    summary = train(tiny(method="trades", epochs=3), tmp_path / "r", echo=False)
    rows = _rows(tmp_path / "r" / "metrics.csv")
    keys = [(float(r["val_pgd20_acc"]), float(r["val_nat_acc"])) for r in rows]
    assert summary["best_epoch"] == 1 + keys.index(max(keys))
    state = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert state["progress"]["epoch"] == summary["best_epoch"]


def test_divergence_stops_with_a_clear_message(tmp_path, tiny):
    cfg = tiny(
        method="st", lr=1e12, momentum=0.0, max_skipped_steps=2, log_every=1, epochs=2, train_samples=256
    )
    with pytest.raises(TrainingError, match="consecutive steps had a non-finite loss"):
        with pytest.warns(RuntimeWarning, match="skipped"):
            train(cfg, tmp_path / "div", echo=False)
    assert (tmp_path / "div" / "config.json").is_file()


def test_output_directory_rules(tmp_path, tiny):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists"):
        train(tiny(method="st", epochs=1), out, echo=False)
    with pytest.raises(ConfigError, match="last.pt"):
        train(tiny(method="st", epochs=1), tmp_path / "fresh", resume=True, echo=False)
    train(tiny(method="st", epochs=1), out, overwrite=True, echo=False)
    assert (out / "notes.txt").read_text() == "keep me"  # --overwrite removes only the run's own outputs
    with pytest.raises(ConfigError, match="differ"):
        train(tiny(method="st", epochs=1, lr=0.5), out, resume=True, echo=False)


def test_piecewise_and_cosine_schedules(tmp_path, tiny):
    train(tiny(method="st", epochs=4, lr_milestones=(2, 3), lr=0.1), tmp_path / "pw", echo=False)
    lrs = [float(r["lr"]) for r in _rows(tmp_path / "pw" / "metrics.csv")]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])
    train(tiny(method="st", epochs=2, lr_schedule="cosine", lr=0.1), tmp_path / "cos", echo=False)
    lrs = [float(r["lr"]) for r in _rows(tmp_path / "cos" / "metrics.csv")]
    steps = 128 // 32  # per epoch; the column holds the lr of each epoch's last step
    assert lrs[0] == pytest.approx(0.05 * (1 + math.cos(math.pi * (steps - 1) / (2 * steps))))
    assert lrs[1] == pytest.approx(0.05 * (1 + math.cos(math.pi * (2 * steps - 1) / (2 * steps))))


def test_cw_evaluation_and_its_nrr_in_the_summary(tmp_path, tiny):
    summary = train(
        tiny(method="st", epochs=1, eval_attacks=("nat", "pgd20", "cw")), tmp_path / "cw", echo=False
    )
    assert {"cw_acc", "nrr_cw", "best_cw_acc", "last_cw_acc", "delta_cw_acc"} <= set(summary)
    assert summary["nrr_cw"] == pytest.approx(nrr(summary["nat_acc"], summary["cw_acc"]))
    assert "C&W" in results_table(summary)


def test_late_decay_of_the_revision_rate(tmp_path, tiny):
    cfg = tiny(method="cure", revision_rate=1.0, revision_rate_decay_epoch=1, revision_rate_decay_factor=0.0)
    train(cfg, tmp_path / "r", echo=False)
    rows = _rows(tmp_path / "r" / "metrics.csv")
    assert [int(r["revision_updates"]) for r in rows] == [128 // 32, 0]


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, monkeypatch, tiny):
    import cure.train as train_module

    def oom(ctx, x, y):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(train_module.STEP_FUNCTIONS, "st", oom)
    with pytest.raises(TrainingError, match="--batch-size 16"):
        train(tiny(method="st", epochs=1), tmp_path / "oom", echo=False)


@pytest.mark.slow
@pytest.mark.learning  # CI runs it again with ATEN_CPU_CAPABILITY=avx2, on the same Inductor cache
def test_compiled_model_trains(tmp_path, tiny):
    """The compiled CURE run trains: no step skipped as non-finite. Under ATEN_CPU_CAPABILITY=avx2 after a
    run with the AVX-512 kernels, Inductor's graph cache once served AVX-512 code rebuilt for AVX2 and every
    step was skipped (``cure.device.pin_inductor_cpu_isa``)."""
    summary = train(tiny(method="cure", epochs=1, compile=True), tmp_path / "compiled", echo=False)
    assert summary["epochs"] == 1 and 0 <= summary["pgd20_acc"] <= 100
    assert summary["skipped_steps"] == 0


def test_cure_needs_a_natural_starting_point(tmp_path, tiny):
    out = tmp_path / "cure"
    with pytest.raises(ConfigError, match="naturally trained network") as info:
        train(tiny(method="cure", from_scratch=False), out, echo=False)
    message = str(info.value)
    assert "cure train --method st" in message and "--init runs/st/last.pt" in message
    assert "--warmup-epochs" in message and "--from-scratch" in message
    assert not out.exists()  # refused before the run directory was made
    with pytest.raises(ConfigError, match="contradicts init"):
        tiny(method="cure", from_scratch=True, init=str(tmp_path / "st.pt"))
    # The other methods start from random weights by definition; CURE-Eff's warm-up is a starting point.
    tiny(method="trades", from_scratch=False).check_starting_point()
    tiny(method="cure", from_scratch=False, warmup_epochs=1).check_starting_point()


def test_tensorboard_events_hold_the_epoch_and_running_scalars(tmp_path, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(tiny(method="trades", log_every=1), out, echo=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/val_pgd20_acc", "epoch/train_loss", "train_running/loss", "train_running/lr"} <= tags
    rows = _rows(out / "metrics.csv")
    logged = events.Scalars("epoch/val_pgd20_acc")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([float(r["val_pgd20_acc"]) for r in rows], abs=1e-4)
    running = events.Scalars("train_running/loss")
    assert [e.step for e in running] == list(range(1, 2 * 128 // 32 + 1))  # log_every=1: every step
    assert all(math.isfinite(e.value) for e in running)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bars_go_to_stderr_when_enabled(tmp_path, tiny, capsys, progress):
    train(tiny(method="st", epochs=1, progress=progress), tmp_path / "bar", echo=False)
    err = capsys.readouterr().err
    assert ("epoch 1/1 [st]" in err) == progress  # the training bar
    assert ("eval nat,pgd20" in err) == progress  # the final evaluation's bar


def test_summary_records_the_evaluation_protocol_and_beta(tmp_path, tiny):
    summary = train(
        tiny(method="trades", epochs=1, eval_protocol="official", eval_attacks=("nat", "pgd20", "cw")),
        tmp_path / "official",
        echo=False,
    )
    assert summary["eval_protocol"] == "official" and summary["beta"] == 6.0
    settings = summary["eval_attack_settings"]
    assert settings["pgd20"]["step_size"] == 0.003 and settings["pgd20"]["steps"] == 20
    assert settings["cw"]["kappa"] == 50.0 and settings["cw"]["steps"] == 20
    assert json.loads((tmp_path / "official" / "summary.json").read_text())["eval_protocol"] == "official"
    ours = train(tiny(method="st", epochs=1), tmp_path / "ours", echo=False)
    assert ours["eval_protocol"] == "ours"
    assert ours["eval_attack_settings"]["pgd20"]["step_size"] == pytest.approx(0.1 / 4)


def test_run_state_round_trips_through_a_checkpoint_section():
    from cure.train import RunState

    state = RunState.fresh(torch.device("cpu"))
    state.epoch, state.batch, state.step, state.epoch_images = 2, 3, 11, 96
    state.sums += torch.arange(len(state.sums), dtype=torch.float64)
    state.max_consecutive_skipped.fill_(4)
    state.history.append({"epoch": 1, "val_nat_acc": 50.0})
    state.best = {"epoch": 1, "key": [50.0], "row": state.history[0]}
    sections = state.to_checkpoint(state.sums)
    assert set(sections["progress"]) == {"epoch", "batch", "step"}
    assert sections["trainer"]["max_consecutive_skipped"] == 4
    back = RunState.from_checkpoint(sections, torch.device("cpu"))
    for name in ("epoch", "batch", "step", "history", "best", "epoch_images", "reported_skipped"):
        assert getattr(back, name) == getattr(state, name), name
    assert torch.equal(back.sums, state.sums) and int(back.max_consecutive_skipped) == 4
    back.reset_epoch(torch.device("cpu"))
    assert back.epoch_images == 0 and not back.sums.any() and back.step == 11 and back.history
    del sections["trainer"]["epoch_seconds"]
    with pytest.raises(CheckpointError, match="epoch_seconds"):
        RunState.from_checkpoint(sections, torch.device("cpu"))


def test_a_run_that_cannot_start_leaves_no_dead_end(tmp_path, tiny):
    """An --init of another architecture fails before anything is written into --out; the corrected rerun
    needs neither --resume nor --overwrite. A directory that holds only an unstarted run's config.json (what
    earlier versions left) is taken over the same way."""
    from tiny_runs import write_checkpoint

    wrong = write_checkpoint(tmp_path / "wrong" / "last.pt", seed=0, arch="resnet20")
    right = write_checkpoint(tmp_path / "right" / "last.pt", seed=0, arch="cnn")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="resnet20"):
        train(tiny(method="cure", init=str(wrong), epochs=1), out, echo=False)
    assert not out.exists() or not any(out.iterdir())
    assert train(tiny(method="cure", init=str(right), epochs=1), out, echo=False) is not None
    # The earlier layout: config.json alone.
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}\n")
    assert train(tiny(method="st", epochs=1), old, echo=False) is not None
    assert json.loads((old / "config.json").read_text())["method"] == "st"
    # A finished run is still protected.
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        train(tiny(method="st", epochs=1), old, echo=False)
