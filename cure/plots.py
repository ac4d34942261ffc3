"""Figures of training runs: ``cure plot RUN_DIR [RUN_DIR ...] --out DIR`` (PNG files, no display needed).

    from cure.plots import plot_runs
    written, notes = plot_runs(["runs/at", "runs/cure"], "figures")

A run directory is what ``cure train`` writes: ``metrics.csv`` (required; one row per epoch), and when
present ``config.json`` (method, dataset, arch for the titles), ``summary.json`` (the selected best epoch)
and ``layer_stats.csv`` (per-layer statistics per epoch: epoch, layer, kept_fraction, grad_nat_mean_abs,
grad_rob_mean_abs, update_norm).

Figures:

* ``curves.png``: every run overlaid, one colour per run. Validation natural and PGD-20 accuracy per
  epoch (the revision model dashed, when the run has one), the selected best epoch marked with a star;
  training natural (solid) and adversarial (dotted) accuracy; the learning rate.
* ``revision_<run>.png`` (runs with revision columns): the revision model next to the trained one,
  validation natural accuracy, PGD-20 accuracy and NRR per epoch.
* ``losses_<run>.png`` (TRADES-style runs with loss-term columns): the epoch means of CE(f(x), y),
  beta * KL and gamma * L_CR, and the training-batch natural accuracy of the trained model next to the
  revision model's (from the forward pass that gives the L_CR targets).
* ``layers_<run>.png`` (runs with ``layer_stats.csv``): the fraction of gradient entries the RGP mask kept,
  per layer and epoch (heat map); the mean |gradient| of the natural and of the robust loss per layer
  (the gradient prominence of each, averaged over the epochs); log10 of their ratio per layer and epoch;
  and the norm of each layer's update per epoch when the column is there.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["PlotError", "Run", "load_run", "plot_runs", "LAYER_STATS_COLUMNS"]

LAYER_STATS_COLUMNS = ("epoch", "layer", "kept_fraction", "grad_nat_mean_abs", "grad_rob_mean_abs", "update_norm")


class PlotError(ValueError):
    """A run directory cannot be plotted (missing or malformed files); the message says which and why."""


@dataclass
class Run:
    """What the figures need from one run directory."""

    path: Path
    name: str
    method: str
    dataset: str
    arch: str
    metrics: dict[str, np.ndarray]
    best_epoch: int | None
    selection: str
    layer_stats: list[dict[str, str]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.method.upper()}, {self.dataset}/{self.arch})"

    def has(self, column: str) -> bool:
        values = self.metrics.get(column)
        return values is not None and bool(np.isfinite(values).any())


def _number(text: str | None) -> float:
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory; :class:`PlotError` when it has no usable ``metrics.csv``."""
    path = Path(path)
    if not path.is_dir():
        raise PlotError(f"{path} is not a directory; pass run directories written by `cure train --out DIR`")
    metrics_path = path / "metrics.csv"
    if not metrics_path.is_file():
        raise PlotError(
            f"{path} has no metrics.csv: not a run directory of `cure train`, or the run has not finished "
            f"its first epoch yet"
        )
    with open(metrics_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "epoch" not in rows[0]:
        raise PlotError(f"{metrics_path} has no epoch rows (header and at least one row with an 'epoch' column)")
    columns = list(rows[0].keys())
    metrics = {c: np.array([_number(r.get(c)) for r in rows], dtype=np.float64) for c in columns if c != "stage"}
    if not np.isfinite(metrics["epoch"]).all():
        raise PlotError(f"{metrics_path}: the epoch column must be numeric in every row")
    notes: list[str] = []
    config: dict = {}
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
    else:
        notes.append(f"{path}: no config.json; method, dataset and arch are unknown in the titles")
    summary: dict = {}
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
    method = str(config.get("method", summary.get("method", "?")))
    selection = "validation nat acc" if method == "st" else "validation pgd20 acc"
    best_epoch = summary.get("best_epoch")
    if best_epoch is None:  # the trainer's rule: highest validation PGD-20 (natural accuracy breaks ties); ST: nat
        nat = np.nan_to_num(metrics.get("val_nat_acc", np.full(len(rows), np.nan)), nan=-1.0)
        rob = np.nan_to_num(metrics.get("val_pgd20_acc", np.full(len(rows), np.nan)), nan=-1.0)
        keys = [(n,) if method == "st" else (r, n) for n, r in zip(nat, rob)]
        best_epoch = int(metrics["epoch"][max(range(len(keys)), key=lambda i: keys[i])]) if keys else None
    layer_stats = None
    ls_path = path / "layer_stats.csv"
    if ls_path.is_file():
        with open(ls_path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("epoch", "layer") if c not in (reader.fieldnames or [])]
            if missing:
                raise PlotError(f"{ls_path} lacks the column(s) {', '.join(missing)}")
            layer_stats = list(reader)
    else:
        notes.append(f"{path}: no layer_stats.csv; the per-layer figures are skipped")
    return Run(
        path=path,
        name=path.resolve().name,
        method=method,
        dataset=str(config.get("dataset", summary.get("dataset", "?"))),
        arch=str(config.get("arch", summary.get("arch", "?"))),
        metrics=metrics,
        best_epoch=None if best_epoch is None else int(best_epoch),
        selection=str(summary.get("selection", selection)),
        layer_stats=layer_stats,
        notes=notes,
    )


# ------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(runs: list[Run]) -> str:
    if len(runs) == 1:
        r = runs[0]
        return f"{r.method.upper()} on {r.dataset} ({r.arch}): {r.name}"
    kinds = sorted({f"{r.dataset} ({r.arch})" for r in runs})
    return f"{len(runs)} runs on {', '.join(kinds)}: " + ", ".join(r.method.upper() for r in runs)


def _title_and_layout(fig, title: str, w_pad: float | None = None) -> None:
    """The figure's title, and a tight layout of its panels below it (tight_layout alone ignores the title,
    which then overlaps the top panels' titles): the top half inch stays free, whatever the figure's height.
    ``w_pad`` (in font sizes) widens the gap between columns, for colour bars beside panels with long tick
    labels."""
    fig.suptitle(title)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.5 / fig.get_figheight()), w_pad=w_pad)


def _plot_curves(runs: list[Run], out: Path) -> Path:
    """Validation Nat and PGD-20 (revision model dashed, selected epoch starred), training accuracies and
    the learning rate; a panel is drawn only when some run has data for it."""
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [
        (kind, title)
        for kind, title, columns in (
            ("val_nat_acc", "validation natural accuracy (star: selected best epoch)", ("val_nat_acc",)),
            ("val_pgd20_acc", "validation PGD-20 accuracy (star: selected best epoch)", ("val_pgd20_acc",)),
            ("train", "accuracy on the training batches", ("train_nat_acc", "train_adv_acc")),
            ("lr", "learning rate (at each epoch's last step)", ("lr",)),
        )
        if any(run.has(c) for run in runs for c in columns)
    ]
    if not panels:
        raise PlotError("no run has validation, training or learning-rate columns with values in metrics.csv")
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows + 0.5), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for (kind, title), ax in zip(panels, axes.flat):
        for k, run in enumerate(runs):
            colour = colours[k % len(colours)]
            epoch = run.metrics["epoch"]
            if kind in ("val_nat_acc", "val_pgd20_acc"):
                if run.has(kind):
                    ax.plot(epoch, run.metrics[kind], "-o", ms=4, color=colour, label=run.label)
                    if run.best_epoch is not None and run.best_epoch in epoch:
                        i = int(np.flatnonzero(epoch == run.best_epoch)[0])
                        ax.plot([run.best_epoch], [run.metrics[kind][i]], "*", ms=14, color=colour,
                                markeredgecolor="black")
                if run.has("rev_" + kind):
                    ax.plot(epoch, run.metrics["rev_" + kind], "--s", ms=4, color=colour,
                            label=f"{run.name}: revision model")
            elif kind == "train":
                if run.has("train_nat_acc"):
                    ax.plot(epoch, run.metrics["train_nat_acc"], "-o", ms=4, color=colour, label=f"{run.name}: natural")
                if run.has("train_adv_acc"):
                    ax.plot(epoch, run.metrics["train_adv_acc"], ":^", ms=4, lw=2, color=colour,
                            label=f"{run.name}: adversarial")
            elif run.has("lr"):
                ax.plot(epoch, run.metrics["lr"], "-o", ms=4, color=colour, label=run.label)
        ax.set_title(title)
        ax.set_ylabel("learning rate" if kind == "lr" else "accuracy (%)")
        ax.set_xlabel("epoch")
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if kind == "lr":
            lrs = np.concatenate([r.metrics["lr"] for r in runs if r.has("lr")])
            lrs = lrs[np.isfinite(lrs)]
            if lrs.size and lrs.min() > 0 and lrs.max() / lrs.min() > 20:
                ax.set_yscale("log")
    _title_and_layout(fig, _title(runs))
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_revision(run: Run, out: Path, stem: str) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    epoch = run.metrics["epoch"]
    for ax, col, title in zip(
        axes, ("val_nat_acc", "val_pgd20_acc", "val_nrr"), ("natural accuracy", "PGD-20 accuracy", "NRR")
    ):
        if run.has(col):
            ax.plot(epoch, run.metrics[col], "-o", ms=3, label="trained model")
        if run.has("rev_" + col):
            ax.plot(epoch, run.metrics["rev_" + col], "--s", ms=3, label="revision model")
        ax.set_title(f"validation {title}")
        ax.set_xlabel("epoch")
        _integer_epochs(ax)
        ax.set_ylabel("NRR (%)" if col == "val_nrr" else "accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _title_and_layout(fig, f"{run.method.upper()} on {run.dataset} ({run.arch}): {run.name}, revision vs trained model")
    path = out / f"revision_{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LOSS_TERMS = (("loss_ce", "CE(f(x), y)"), ("loss_kl", "beta * KL(p(x) || p(x_adv))"), ("loss_cr", "gamma * L_CR"))


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plot_losses(run: Run, out: Path, stem: str) -> Path:
    plt = _pyplot()
    has_rev = run.has("rev_train_nat_acc")
    fig, axes = plt.subplots(1, 2 if has_rev else 1, figsize=(12 if has_rev else 6.5, 4.2), squeeze=False)
    epoch = run.metrics["epoch"]
    ax = axes[0, 0]
    for col, label in LOSS_TERMS:
        if run.has(col):
            ax.plot(epoch, run.metrics[col], "-o", ms=4, label=label)
    if run.has("train_loss"):
        ax.plot(epoch, run.metrics["train_loss"], "k:", marker=".", label="total loss")
    ax.set_title("loss terms (epoch means over the training batches)")
    ax.set_ylabel("loss")
    if has_rev:
        ax = axes[0, 1]
        if run.has("train_nat_acc"):
            ax.plot(epoch, run.metrics["train_nat_acc"], "-o", ms=4, label="trained model")
        ax.plot(epoch, run.metrics["rev_train_nat_acc"], "--s", ms=4, label="revision model (L_CR targets)")
        ax.set_title("natural accuracy on the training batches")
        ax.set_ylabel("accuracy (%)")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _title_and_layout(fig, f"{run.method.upper()} on {run.dataset} ({run.arch}): {run.name}, loss terms")
    path = out / f"losses_{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layer_grid(run: Run, column: str) -> tuple[list[int], list[str], np.ndarray] | None:
    rows = run.layer_stats or []
    if not rows or column not in rows[0]:
        return None
    epochs = sorted({int(_number(r["epoch"])) for r in rows if math.isfinite(_number(r["epoch"]))})
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    grid = np.full((len(layers), len(epochs)), np.nan)
    e_index = {e: j for j, e in enumerate(epochs)}
    l_index = {name: i for i, name in enumerate(layers)}
    for r in rows:
        e = _number(r["epoch"])
        if math.isfinite(e):
            grid[l_index[r["layer"]], e_index[int(e)]] = _number(r.get(column))
    if not np.isfinite(grid).any():
        return None
    return epochs, layers, grid


def _heat(ax, fig, epochs, layers, grid, title, label, cmap, vmin=None, vmax=None):
    im = ax.imshow(
        np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    ax.set_yticks(range(len(layers)), layers, fontsize=max(4, min(8, int(400 / max(len(layers), 1)))))
    step = max(1, len(epochs) // 12)
    ax.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]])
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer (parameter tensor)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)


def _plot_layers(run: Run, out: Path, stem: str) -> Path | None:
    kept = _layer_grid(run, "kept_fraction")
    g_nat = _layer_grid(run, "grad_nat_mean_abs")
    g_rob = _layer_grid(run, "grad_rob_mean_abs")
    upd = _layer_grid(run, "update_norm")
    if kept is None and g_nat is None and g_rob is None and upd is None:
        run.notes.append(f"{run.path}: layer_stats.csv has no usable values; the per-layer figures are skipped")
        return None
    plt = _pyplot()
    n_layers = len((kept or g_nat or g_rob or upd)[1])
    fig, axes = plt.subplots(2, 2, figsize=(14, 4 + 0.22 * n_layers * 2))
    ax = axes[0, 0]
    if kept is not None:
        _heat(ax, fig, *kept, "kept fraction of gradient entries (RGP mask)", "kept fraction", "viridis")
    else:
        ax.set_axis_off()
        ax.set_title("kept fraction: not recorded")
    ax = axes[0, 1]
    if g_nat is not None and g_rob is not None:
        layers = g_nat[1]
        nat = np.nanmean(g_nat[2], axis=1)
        rob_grid = np.full_like(g_nat[2], np.nan)
        rob_rows = {name: i for i, name in enumerate(g_rob[1])}
        for i, name in enumerate(layers):
            if name in rob_rows and len(g_rob[0]) == len(g_nat[0]):
                rob_grid[i] = g_rob[2][rob_rows[name]]
        rob = np.nanmean(rob_grid, axis=1)
        y = np.arange(len(layers))
        ax.barh(y - 0.2, nat, height=0.4, label="natural loss |dL_nat/dw|")
        ax.barh(y + 0.2, rob, height=0.4, label="robust loss |dL_rob/dw|")
        ax.set_yticks(y, layers, fontsize=max(4, min(8, int(400 / max(len(layers), 1)))))
        ax.invert_yaxis()
        positive = np.concatenate([nat, rob])
        if np.isfinite(positive).any() and np.nanmin(positive) > 0:
            ax.set_xscale("log")
        ax.set_xlabel("mean |gradient| per entry (averaged over epochs)")
        ax.set_title("gradient prominence per layer: natural vs adversarial")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="x")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.log10(rob_grid / g_nat[2])
        ratio[~np.isfinite(ratio)] = np.nan
        if np.isfinite(ratio).any():
            lim = float(np.nanmax(np.abs(ratio))) or 1.0
            _heat(
                axes[1, 0], fig, g_nat[0], layers, ratio,
                "log10(|dL_rob/dw| / |dL_nat/dw|): > 0 where the robust loss dominates",
                "log10 ratio", "coolwarm", -lim, lim,
            )  # fmt: skip
        else:
            axes[1, 0].set_axis_off()
    else:
        for a in (ax, axes[1, 0]):
            a.set_axis_off()
        ax.set_title("gradient prominence: not recorded")
    ax = axes[1, 1]
    if upd is not None:
        _heat(ax, fig, *upd, "norm of each layer's update", "L2 norm of the update", "magma")
    else:
        ax.set_axis_off()
        ax.set_title("update norm: not recorded")
    # The heat maps' colour-bar labels sit right of them, next to the neighbouring panel's layer names.
    _title_and_layout(fig, f"{run.method.upper()} on {run.dataset} ({run.arch}): {run.name}, per-layer statistics",
                      w_pad=6.0)
    path = out / f"layers_{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Write the figures of ``run_dirs`` into ``out``; return (written files, notes on what was skipped)."""
    if not run_dirs:
        raise PlotError("pass at least one run directory")
    runs = [load_run(p) for p in run_dirs]  # every directory is checked before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems: dict[str, int] = {}
    written = [_plot_curves(runs, out)]
    notes: list[str] = []
    for run in runs:
        stem = run.name
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:
            stem = f"{stem}_{stems[stem]}"
        if run.has("rev_val_nat_acc") or run.has("rev_val_pgd20_acc"):
            written.append(_plot_revision(run, out, stem))
        if any(run.has(col) for col, _ in LOSS_TERMS):
            written.append(_plot_losses(run, out, stem))
        if run.layer_stats is not None:
            path = _plot_layers(run, out, stem)
            if path is not None:
                written.append(path)
        notes.extend(run.notes)
    return written, notes


def run(args) -> int:
    """``cure plot``: write the figures and list them (and what was skipped)."""
    written, notes = plot_runs(args.runs, args.out)
    for note in notes:
        print(f"note: {note}")
    for path in written:
        print(f"written: {path}")
    return 0
