"""Per-layer statistics (cure.layer_stats): layer_stats.csv, TensorBoard scalars, resume, the layers figure."""

from __future__ import annotations

import csv
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from cure.cli import main  # noqa: E402
from cure.layer_stats import CSV_COLUMNS, LAYER_COLUMNS, LayerStats, write_layer_stats  # noqa: E402
from cure.methods import StepResult  # noqa: E402
from cure.plots import LAYER_STATS_COLUMNS  # noqa: E402
from cure.train import OUTPUT_NAMES, _Trainer, train  # noqa: E402
from cure_kernels import ProminenceMasker  # noqa: E402


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _trainable_names(cfg):
    from cure.data import DATASETS
    from cure.models import build_model

    return [n for n, q in build_model(cfg.arch, DATASETS[cfg.dataset]).named_parameters() if q.requires_grad]


def _result(skipped: bool, stats=None) -> StepResult:
    zero = torch.zeros(())
    return StepResult(zero, zero, zero, torch.tensor(skipped), zero + 1, zero, False, stats)


def test_columns_are_the_ones_the_plots_read():
    assert CSV_COLUMNS == LAYER_STATS_COLUMNS
    assert "layer_stats.csv" in OUTPUT_NAMES


def test_record_matches_a_direct_computation_and_skips_bad_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    masker = ProminenceMasker(model.parameters(), alpha=0.3, p=0.4, backend="reference")
    stats_acc = LayerStats(model)
    sums = stats_acc.zeros()
    expected = []
    for step in range(3):
        masker.zero_grad()
        for view in masker.grads_nat + masker.grads_adv:
            view.copy_(torch.randn_like(view))
        for q in masker.params:
            q.grad.copy_(torch.randn_like(q))
        stats = masker.mask_()
        skipped = step == 1
        if skipped:  # a bad step: non-finite values must not reach the sums
            masker.grads_nat[0].fill_(float("nan"))
        else:
            expected.append(
                [
                    [
                        float(k) / q.numel(),
                        gn.abs().mean().item(),
                        ga.abs().mean().item(),
                        q.grad.norm().item(),
                    ]
                    for k, q, gn, ga in zip(stats.kept, masker.params, masker.grads_nat, masker.grads_adv)
                ]
            )
        stats_acc.record(sums, _result(skipped, stats), masker)
    got = stats_acc.means(sums)
    want = np.mean(np.array(expected), axis=0)
    assert np.allclose(np.array(got), want, rtol=1e-6, atol=0)
    assert sums[:, 4].tolist() == [2.0] * 4 and sums[:, 5].tolist() == [2.0] * 4  # the skipped step not counted
    # Without a mask (ST, AT, ...): the update norm only.
    plain = LayerStats(model)
    sums = plain.zeros()
    plain.record(sums, _result(False), None)
    values = plain.means(sums)
    assert all(row[:3] == [None, None, None] for row in values)
    assert [row[3] for row in values] == pytest.approx([q.grad.norm().item() for q in model.parameters()])
    assert plain.means(plain.zeros()) == [[None] * len(LAYER_COLUMNS)] * 4  # nothing recorded: empty cells


def test_write_layer_stats_one_row_per_epoch_and_layer(tmp_path):
    path = tmp_path / "layer_stats.csv"
    write_layer_stats(
        path, ["a.weight", "b.bias"], [{"epoch": 1, "values": [[0.7, 1e-3, 2e-3, 0.5], [None, None, None, 0.25]]}]
    )
    rows = _rows(path)
    assert [(r["epoch"], r["layer"]) for r in rows] == [("1", "a.weight"), ("1", "b.bias")]
    assert rows[1]["kept_fraction"] == "" and float(rows[1]["update_norm"]) == 0.25
    assert float(rows[0]["grad_rob_mean_abs"]) == 2e-3


def test_single_step_run_equals_a_direct_recomputation(tmp_path, tiny_config):
    """One CURE step; the trainer's per-layer means against the gradients the masker still holds."""
    cfg = tiny_config(method="cure", train_samples=32, p=0.3, alpha=0.2)
    out = tmp_path / "one"
    out.mkdir()
    trainer = _Trainer(cfg, out, resume_state=None)
    assert trainer.steps_per_epoch == 1
    assert trainer.train_epoch(None, None)
    masker = trainer.ctx.masker
    means = trainer.layer_stats.means(trainer.state.layer_sums)
    for name, row, q, gn, ga in zip(
        trainer.layer_stats.names, means, masker.params, masker.grads_nat, masker.grads_adv
    ):
        scores = (cfg.alpha * gn.abs() + (1 - cfg.alpha) * ga.abs()).double().flatten().numpy()
        threshold = np.quantile(scores, cfg.p)
        kept = float((scores >= threshold).sum()) / q.numel()
        assert row[0] == pytest.approx(kept, abs=1e-12), name
        assert 0.0 <= row[0] <= 1.0
        # The norms accumulate in float64 (torch._foreach_norm with dtype=float64): only the order differs.
        assert row[1] == pytest.approx(gn.abs().double().mean().item(), rel=1e-12), name
        assert row[2] == pytest.approx(ga.abs().double().mean().item(), rel=1e-12), name
        assert row[3] == pytest.approx(q.grad.double().norm().item(), rel=1e-12), name
    # A weight matrix without ties keeps 1 - p of its entries (up to the rounding of p * n).
    conv = trainer.layer_stats.names.index("features.0.weight")
    assert means[conv][0] == pytest.approx(1 - cfg.p, abs=2 / masker.params[conv].numel())
    trainer.end_epoch(None)
    rows = _rows(out / "layer_stats.csv")
    assert [r["layer"] for r in rows] == trainer.layer_stats.names and {r["epoch"] for r in rows} == {"1"}
    for r, row in zip(rows, means):
        assert [float(r[c]) for c in LAYER_COLUMNS] == pytest.approx(row, rel=1e-5)


def test_run_resume_tensorboard_and_plot(tmp_path, tiny_config, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(method="cure", epochs=2)  # 2 steps per epoch
    run = tmp_path / "cure_run"
    assert train(cfg, run, stop_after_step=3, echo=False) is None  # stopped mid-epoch 2
    first = _rows(run / "layer_stats.csv")
    names = _trainable_names(cfg)
    assert [(r["epoch"], r["layer"]) for r in first] == [("1", n) for n in names]
    train(None, run, resume=True, echo=False)
    rows = _rows(run / "layer_stats.csv")
    assert [(r["epoch"], r["layer"]) for r in rows] == [(str(e), n) for e in (1, 2) for n in names]
    assert rows[: len(names)] == first  # epoch 1 rewritten from the checkpoint, unchanged
    for r in rows:
        values = [float(r[c]) for c in LAYER_COLUMNS]
        assert all(math.isfinite(v) for v in values), r
        assert 0.0 <= values[0] <= 1.0 and values[1] > 0 and values[2] > 0 and values[3] >= 0
    # The epoch's mean kept fraction of all entries (metrics.csv) is the numel-weighted mean of the layers'.
    from cure.data import DATASETS
    from cure.models import build_model

    numel = np.array([q.numel() for q in build_model(cfg.arch, DATASETS[cfg.dataset]).parameters()], float)
    for epoch, metrics_row in enumerate(_rows(run / "metrics.csv"), start=1):
        kept = np.array([float(r["kept_fraction"]) for r in rows if r["epoch"] == str(epoch)])
        assert float(metrics_row["kept_fraction"]) == pytest.approx((kept * numel).sum() / numel.sum(), rel=2e-5)

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for column in LAYER_COLUMNS:
        assert f"layers/{column}/{names[0]}" in tags
    logged = events.Scalars(f"layers/kept_fraction/{names[0]}")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx(
        [float(r["kept_fraction"]) for r in rows if r["layer"] == names[0]], rel=1e-5
    )

    figures = tmp_path / "figures"
    assert main(["plot", str(run), "--out", str(figures)]) == 0
    layers_png = figures / "layers_cure_run.png"
    assert layers_png.is_file() and layers_png.read_bytes().startswith(b"\x89PNG")


def test_run_state_checkpoints_the_layer_sums_and_rows():
    from cure.train import RunState

    state = RunState.fresh(torch.device("cpu"))
    assert state.layer_sums is None and state.layer_history == []
    state.layer_sums = torch.arange(12, dtype=torch.float64).reshape(2, 6)
    state.layer_history.append({"epoch": 1, "values": [[0.7, 1e-3, 2e-3, 0.5], [None, None, None, 0.25]]})
    sections = state.to_checkpoint(state.sums)
    back = RunState.from_checkpoint(sections, torch.device("cpu"))
    assert torch.equal(back.layer_sums, state.layer_sums) and back.layer_history == state.layer_history
    back.reset_epoch(torch.device("cpu"))
    assert back.layer_sums is None and back.layer_history == state.layer_history  # the rows outlive the epoch
    # Checkpoints written before the per-layer statistics existed still load (no rows, no sums yet).
    del sections["trainer"]["layer_sums"], sections["trainer"]["layer_history"]
    old = RunState.from_checkpoint(sections, torch.device("cpu"))
    assert old.layer_sums is None and old.layer_history == []
