"""Tiny checkpoints and run directories for the analysis tests (no full training run needed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from cure.checkpoint import FORMAT, VERSION, atomic_save
from cure.config import TrainConfig
from cure.data import DATASETS, deterministic_subset, load_split
from cure.models import build_model


def fashion_images(n: int, seed: int = 0, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split("fashion-mnist", None, train=train)
    return deterministic_subset(images, labels, n, seed=seed)


def write_checkpoint(
    path: Path, *, seed: int, steps: int = 3, method: str = "st", arch: str = "cnn", revision: bool = False
) -> Path:
    """A checkpoint in the trainer's format: a ``arch`` model after ``steps`` SGD steps on Fashion-MNIST."""
    torch.manual_seed(seed)
    spec = DATASETS["fashion-mnist"]
    model = build_model(arch, spec)
    x, y = fashion_images(64, seed=seed)
    x = x.float() / 255.0
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    cfg = TrainConfig(method=method, dataset="fashion-mnist", arch=arch, seed=seed)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "revision": {"module": {k: v.clone() for k, v in model.state_dict().items()}} if revision else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, path)
    return path


def write_run_dir(
    path: Path,
    *,
    epochs: int = 4,
    method: str = "cure",
    revision: bool = True,
    config: bool = True,
    summary: bool = True,
    layer_stats: bool = False,
    layers: tuple[str, ...] = ("features.0.weight", "features.4.weight", "classifier.0.weight"),
) -> Path:
    """A synthetic run directory shaped like one of `cure train` (metrics.csv with the trainer's columns)."""
    from cure.train import METRIC_COLUMNS

    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for e in range(1, epochs + 1):
        row = {c: "" for c in METRIC_COLUMNS}
        row.update(
            epoch=e,
            stage=method,
            lr=0.1 * (0.1 if e > epochs // 2 else 1.0),
            train_loss=2.0 / e,
            train_nat_acc=50 + 5 * e,
            train_adv_acc=20 + 4 * e,
            kept_fraction=0.7,
            skipped_steps=0,
            nonfinite_scores=0,
            revision_updates=e,
            val_nat_acc=55 + 4 * e,
            val_pgd20_acc=30 + 3 * e - (4 if e == epochs else 0),  # best epoch: epochs - 1
            val_nrr=40 + 3 * e,
            epoch_seconds=1.5,
        )
        if revision:
            row.update(rev_val_nat_acc=57 + 4 * e, rev_val_pgd20_acc=28 + 3 * e, rev_val_nrr=39 + 3 * e)
        rows.append(row)
    with open(path / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    if config:
        (path / "config.json").write_text(json.dumps(TrainConfig(method=method, epochs=epochs).to_dict()))
    if summary:
        (path / "summary.json").write_text(
            json.dumps({"method": method, "dataset": "fashion-mnist", "arch": "cnn", "best_epoch": epochs - 1})
        )
    if layer_stats:
        with open(path / "layer_stats.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["epoch", "layer", "kept_fraction", "grad_nat_mean_abs", "grad_rob_mean_abs", "update_norm"])
            for e in range(1, epochs + 1):
                for i, name in enumerate(layers):
                    w.writerow([e, name, 0.7 + 0.02 * i, 1e-3 * (i + 1), 2e-3 * (i + 1) / e, 0.1 / e])
    return path
