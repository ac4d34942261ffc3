"""Robust overfitting at a size a CPU can run: AT, TRADES, CURE and CURE without revision on a small
training set, trained long past the first learning-rate drop; best versus last PGD-20 per method.

    .venv/bin/python scripts/overfitting_study.py                  # the committed study (hours on 2 cores)
    .venv/bin/python scripts/overfitting_study.py --table-only     # re-render table and figure from --runs

Robust overfitting (Rice et al., 2020) shows when a training set is small enough to be memorised
adversarially: after the first learning-rate drop the training robust accuracy climbs towards 100 % while
the validation PGD-20 accuracy peaks and then falls, so the last epoch is less robust than the best one.
The paper's claim for CURE is that its best and last epochs coincide. Protocol: every method starts from
one natural ResNet-20 (by default the mask study's, one epoch of ST on the full split; trained here when
missing), trains ``--epochs`` epochs on the same ``--train-samples`` images with milestones
``--lr-milestones``, ``--attack-steps`` training attack steps, once per seed. Model selection on
``--val-size`` held-out training images; the test numbers on ``--eval-samples`` test images.

The runs, their resumption after an interruption, the per-run files (``results/<stem>/runs/``) and the
launcher are those of ``scripts/mask_study.py``; this script adds its own table (best and last epoch,
best - last, the epoch of the validation peak, final training robust accuracy) and figure (validation
PGD-20 and training adversarial accuracy per epoch, mean over the seeds).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mask_study", ROOT / "scripts" / "mask_study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

# AT first: it shows whether the setting overfits at all (the pilot's finding), then CURE against it.
DEFAULT_VARIANTS = ["at", "cure", "trades", "cure_no_revision"]


def run(args: argparse.Namespace) -> None:
    study._launch(study.pretrain_command(args), study.pretrain_dir(args), args.threads)
    jobs = [(seed, name, extra) for seed in args.seeds for _, name, extra in study.variants(args)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(study._launch, study.run_command(args, extra, seed, args.runs / f"{name}_s{seed}"),
                        args.runs / f"{name}_s{seed}", args.threads)
            for seed, name, extra in jobs
        ]  # fmt: skip
        for future in futures:
            future.result()


def collect(args: argparse.Namespace) -> list[dict]:
    rows = []
    for seed in args.seeds:
        for label, name, _ in study.variants(args):
            run = args.runs / f"{name}_s{seed}"
            if not (run / "summary.json").is_file():
                continue
            s = json.loads((run / "summary.json").read_text())
            metrics = study._read_metrics(run)
            val = [float(r["val_pgd20_acc"]) for r in metrics]
            peak = max(range(len(val)), key=lambda i: val[i])
            rows.append({
                "method": label, "run": name, "seed": seed,
                "best_epoch": s["best_epoch"], "best_nat": s["best_nat_acc"], "best_pgd20": s["best_pgd20_acc"],
                "last_nat": s["last_nat_acc"], "last_pgd20": s["last_pgd20_acc"],
                "best_minus_last_pgd20": s["delta_pgd20_acc"],
                "val_pgd20_peak": val[peak], "val_pgd20_last": val[-1],
                "last_train_adv_acc": float(metrics[-1]["train_adv_acc"]),
                "rev_last_nat": s.get("rev_last_nat_acc"), "rev_last_pgd20": s.get("rev_last_pgd20_acc"),
                "train_seconds": s["train_seconds"],
            })  # fmt: skip
    return rows


def plot(args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, name, _) in enumerate(study.variants(args)):
        seeds = study._finished(args, name)
        if not seeds:
            continue
        curves = [study._read_metrics(args.runs / f"{name}_s{seed}") for seed in seeds]
        epochs = np.array([int(r["epoch"]) for r in curves[0]])
        for ax, col in zip(axes, ("val_pgd20_acc", "train_adv_acc")):
            values = np.array([[float(r[col]) for r in c] for c in curves])
            ax.plot(epochs, values.mean(0), "-", color=colours[k % len(colours)], label=label)
            ax.fill_between(epochs, values.min(0), values.max(0), color=colours[k % len(colours)], alpha=0.15)
    for ax, title in zip(axes, ("validation PGD-20 accuracy", "training adversarial accuracy (training batches)")):
        ax.set_title(f"{title}\n(mean over the seeds, band: min to max)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if args.lr_milestones:
            for m in args.lr_milestones.split(","):
                ax.axvline(int(m) + 0.5, color="grey", lw=0.8, ls=":")
    fig.suptitle(f"Robust overfitting: {args.dataset}, {args.arch}, {args.train_samples} training images "
                 f"(dotted: lr drops)")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(args: argparse.Namespace, rows: list[dict]) -> str:
    ms = study._mean_spread
    first = next((args.runs / f"{name}_s{seed}" for seed in args.seeds for _, name, _ in study.variants(args)
                  if (args.runs / f"{name}_s{seed}" / "config.json").is_file()), None)
    cfg = json.loads((first / "config.json").read_text()) if first else {}
    lines = [
        f"# Robust overfitting: {args.dataset}, {args.arch}, {args.train_samples} training images",
        "",
        f"Made by `scripts/overfitting_study.py` on {datetime.date.today().isoformat()} (git {study._git_sha()}), "
        f"2-core CPU, {args.jobs} run(s) at a time with {args.threads} thread(s) each.",
        "",
        "## Protocol",
        "",
        f"- From one natural {args.arch} (`{study._display(study.pretrain_dir(args))}`), every method trains "
        f"{args.epochs} epochs on the same {args.train_samples} training images, lr {cfg.get('lr', '?')} "
        f"dropping by 10x after epochs {args.lr_milestones or '50 % and 75 %'} (0-based milestones), "
        f"batch {cfg.get('batch_size', '?')}, L-inf eps {cfg.get('eps') or 'the dataset default'}, "
        f"{args.attack_steps} training attack steps of {args.step_size}; seeds {', '.join(map(str, args.seeds))}.",
        f"- Best epoch: the highest validation PGD-20 on {args.val_size} held-out training images. Test: "
        f"{args.eval_samples} test images, PGD-20 (20 steps of eps/4, random start).",
        "- Cells: mean ± half the range over the seeds that finished.",
        "",
        "## Results (test accuracy, %)",
        "",
        "| method | seeds | best epoch | Nat (best) | PGD-20 (best) | Nat (last) | PGD-20 (last) "
        "| PGD-20 best - last | val PGD-20 peak / last | train adv acc (last epoch) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, name, _ in study.variants(args):
        rs = [r for r in rows if r["run"] == name]

        def col(key, rs=rs):
            return [r[key] for r in rs if r[key] is not None]

        lines.append(
            f"| {label} | {', '.join(str(r['seed']) for r in rs) or '-'} | {', '.join(map(str, col('best_epoch')))} "
            f"| {ms(col('best_nat'))} | {ms(col('best_pgd20'))} | {ms(col('last_nat'))} | {ms(col('last_pgd20'))} "
            f"| {ms(col('best_minus_last_pgd20'))} | {ms(col('val_pgd20_peak'))} / {ms(col('val_pgd20_last'))} "
            f"| {ms(col('last_train_adv_acc'))} |"
        )
    missing = [f"{name}_s{seed}" for seed in args.seeds for _, name, _ in study.variants(args)
               if seed not in study._finished(args, name)]
    if missing:
        lines += ["", f"Not finished when this table was made (left out): {', '.join(missing)}."]
    stem = args.output.stem
    lines += [
        "",
        f"Per run: `{stem}.csv`, and every run's `metrics.csv` and `summary.json` in `{stem}/runs/`. "
        f"Figure: `{stem}.png`.",
        "",
        "## Commands",
        "",
        "```",
        f"python scripts/overfitting_study.py {shlex.join(args.argv)}".rstrip(),
        "# which ran, from the repository root:",
        shlex.join(study.pretrain_command(args)),
        *(shlex.join(study.run_command(args, extra, seed, args.runs / f"{name}_s{seed}"))
          for seed in args.seeds for _, name, extra in study.variants(args)),
        "```",
        "",
    ]
    return "\n".join(lines + study.notes_section(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "overfitting_study")
    parser.add_argument("--pretrain-dir", type=Path, default=ROOT / "runs" / "mask_study" / "pretrain_st",
                        help="the natural run every method starts from (trained there when missing)")
    parser.add_argument("--output", type=Path, default=None,
                        help="default results/overfitting_study_<dataset>_<arch>.md")
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended as 'What it shows'")
    parser.add_argument("--table-only", action="store_true", help="re-render from --runs; no training")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=DEFAULT_VARIANTS)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--pretrain-samples", type=int, default=None, help="default: the full split")
    parser.add_argument("--pretrain-val-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--lr-milestones", default="75,112")
    parser.add_argument("--train-samples", type=int, default=256)
    parser.add_argument("--val-size", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--attack-steps", type=int, default=5)
    parser.add_argument("--step-size", type=float, default=0.025)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the trainer's (128)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    args = parser.parse_args()
    args.argv = study.training_argv(sys.argv[1:])
    args.output = args.output or ROOT / "results" / f"overfitting_study_{args.dataset}_{args.arch}.md"
    if not args.table_only:
        run(args)
    rows = collect(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        study.write_csv(rows, args.output.with_suffix(".csv"))
    plot(args, args.output.with_suffix(".png"))
    study.copy_run_files(args, args.output.with_suffix("") / "runs")
    args.output.write_text(render(args, rows))
    print(args.output.read_text())
    if rows:
        means = {r["run"]: [] for r in rows}
        for r in rows:
            means[r["run"]].append(r["best_minus_last_pgd20"])
        print("best - last PGD-20:", {k: round(statistics.fmean(v), 2) for k, v in means.items()})


if __name__ == "__main__":
    main()
