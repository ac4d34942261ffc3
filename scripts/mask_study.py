"""A study where the RGP mask bites: Fashion-MNIST, ResNet-20, AT/TRADES/MART/CURE and CURE's ablations.

    .venv/bin/python scripts/mask_study.py                  # the committed study (about 3 h on 2 cores)
    .venv/bin/python scripts/mask_study.py --table-only     # re-render table and figures from --runs

Protocol: one natural pre-training (``--method st``) on the full training split is shared; from it, every
method trains the same number of epochs on the same training subset with the same optimiser, schedule and
threat model, once per seed. The seed changes the data order, the attacks' random starts and the revision
draws; the subset, the validation split and the test subset are fixed (``--data-seed``). The ResNet-20's
BatchNorm layers make almost every prominence score non-zero, so the mask keeps about 1 - p of each
tensor's entries (unlike the small CNN, whose ReLU-dead units give a zero threshold).

Runs are separate ``cure train`` processes, ``--jobs`` at a time with ``--threads`` threads each; each one
saves ``last.pt`` every ``--checkpoint-every`` steps, and running the script again resumes unfinished runs
(``--resume``) and skips finished ones. Outputs: ``results/mask_study_<dataset>_<arch>.md`` (table,
commands, notes), ``.csv`` (one row per run) and ``.png`` (validation curves, mean over seeds); the
per-run figures of ``cure plot`` for the first seed go to ``results/mask_study_<dataset>_<arch>/``, and
every finished run's ``metrics.csv`` and ``summary.json`` to ``results/mask_study_<dataset>_<arch>/runs/``
(small files, so curves can be checked later). A run counts as collapsed when its validation natural
accuracy falls by more than 20 points between two consecutive epochs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (label, directory name, extra `cure train` options)
VARIANTS = [
    ("CURE", "cure", ["--method", "cure"]),
    ("AT (Madry)", "at", ["--method", "at"]),
    ("CURE without RGP mask", "cure_no_mask", ["--method", "cure", "--no-mask"]),
    ("TRADES", "trades", ["--method", "trades"]),
    ("CURE without revision", "cure_no_revision", ["--method", "cure", "--no-revision"]),
    ("MART", "mart", ["--method", "mart"]),
]


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _display(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


COLLAPSE_POINTS = 20.0  # a fall of validation Nat larger than this between two epochs is a collapse


def pretrain_dir(args: argparse.Namespace) -> Path:
    return args.pretrain_dir if getattr(args, "pretrain_dir", None) else args.runs / "pretrain_st"


def variants(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """The VARIANTS named by ``--variants``, in the order given (all, in VARIANTS' order, when not given)."""
    names = getattr(args, "variants", None)
    if names is None:
        return list(VARIANTS)
    by_name = {v[1]: v for v in VARIANTS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    return [by_name[n] for n in names]


def pretrain_command(args: argparse.Namespace) -> list[str]:
    return [
        "cure", "train", "--method", "st", "--dataset", args.dataset, "--arch", args.arch,
        "--epochs", str(args.pretrain_epochs), "--val-size", str(args.pretrain_val_size),
        *(["--train-samples", str(args.pretrain_samples)] if args.pretrain_samples else []),
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
        "--eval-samples", str(args.eval_samples), "--eval-attacks", "nat,pgd20", "--seed", "0",
        "--data-seed", str(args.data_seed), "--out", _display(pretrain_dir(args)),
    ]  # fmt: skip


def run_command(args: argparse.Namespace, extra: list[str], seed: int, out: Path) -> list[str]:
    return [
        "cure", "train", *extra, "--dataset", args.dataset, "--arch", args.arch,
        "--init", _display(pretrain_dir(args) / "last.pt"),
        "--epochs", str(args.epochs), "--train-samples", str(args.train_samples),
        *(["--lr-milestones", args.lr_milestones] if getattr(args, "lr_milestones", None) else []),
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
        "--val-size", str(args.val_size), "--eval-samples", str(args.eval_samples),
        "--eval-attacks", "nat,pgd20", "--attack-steps", str(args.attack_steps),
        "--step-size", str(args.step_size), "--seed", str(seed), "--data-seed", str(args.data_seed),
        "--out", _display(out),
    ]  # fmt: skip


def _launch(command: list[str], out: Path, threads: int) -> float:
    """Run one ``cure train`` command to completion (resuming it when a checkpoint exists); return seconds."""
    if (out / "summary.json").is_file():
        print(f"[study] done already: {_display(out)}", flush=True)
        return 0.0
    argv = [sys.executable, "-m", "cure", *command[1:], "--checkpoint-every", "50", "--no-progress"]
    argv.append("--resume" if (out / "last.pt").is_file() else "--overwrite")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"[study] start {_display(out)}", flush=True)
    with open(out.parent / f"{out.name}.log", "a") as log:
        rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - started
    if rc != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed with exit code {rc}; see {out.parent / (out.name + '.log')}")
    print(f"[study] finished {_display(out)} in {seconds / 60:.1f} min", flush=True)
    return seconds


def run(args: argparse.Namespace) -> None:
    started = time.time()
    try:
        pre = pretrain_dir(args)
        _launch(pretrain_command(args), pre, args.threads)
        jobs = [(seed, label, name, extra) for seed in args.seeds for label, name, extra in variants(args)]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(_launch, run_command(args, extra, seed, args.runs / f"{name}_s{seed}"),
                            args.runs / f"{name}_s{seed}", args.threads)
                for seed, label, name, extra in jobs
            ]  # fmt: skip
            for future in futures:
                future.result()
    finally:  # an interrupted invocation's time counts too: the study's wall-clock total spans all of them
        record_path = args.runs / "study.json"
        previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
        spent = previous.get("wall_minutes", 0.0)
        record = {
            "date": datetime.date.today().isoformat(),
            "git": _git_sha(),
            "python": platform.python_version(),
            "wall_minutes": None if spent is None else spent + (time.time() - started) / 60,
            "jobs": args.jobs,
            "threads_per_job": args.threads,
        }
        args.runs.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Table and figures, from the run directories alone
def _read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"


def max_drop(metrics: list[dict[str, str]], column: str = "val_nat_acc") -> float:
    """The largest fall of ``column`` between two consecutive epochs (0 when it never falls)."""
    values = [float(r[column]) for r in metrics if r.get(column) not in (None, "")]
    return max([0.0] + [a - b for a, b in zip(values, values[1:])])


def copy_run_files(args: argparse.Namespace, dest: Path) -> None:
    """Every finished run's metrics.csv and summary.json into ``dest/<run>/``."""
    import shutil

    for seed in args.seeds:
        for _, name, _ in variants(args):
            run = args.runs / f"{name}_s{seed}"
            if (run / "summary.json").is_file():
                (dest / run.name).mkdir(parents=True, exist_ok=True)
                for file in ("metrics.csv", "summary.json"):
                    shutil.copyfile(run / file, dest / run.name / file)


def _finished(args: argparse.Namespace, name: str) -> list[int]:
    return [seed for seed in args.seeds if (args.runs / f"{name}_s{seed}" / "summary.json").is_file()]


def collect(args: argparse.Namespace) -> list[dict]:
    rows = []
    for seed in args.seeds:
        for label, name, _ in variants(args):
            run = args.runs / f"{name}_s{seed}"
            if not (run / "summary.json").is_file():
                continue  # not finished: listed under the table (--table-only renders partial studies)
            s = json.loads((run / "summary.json").read_text())
            drop = max_drop(_read_metrics(run))
            rows.append(
                {
                    "method": label,
                    "run": name,
                    "seed": seed,
                    "last_nat": s["last_nat_acc"],
                    "last_pgd20": s["last_pgd20_acc"],
                    "last_nrr": s["last_nrr"],
                    "best_epoch": s["best_epoch"],
                    "best_nat": s["best_nat_acc"],
                    "best_pgd20": s["best_pgd20_acc"],
                    "best_minus_last_pgd20": s["delta_pgd20_acc"],
                    "rev_last_nat": s.get("rev_last_nat_acc"),
                    "rev_last_pgd20": s.get("rev_last_pgd20_acc"),
                    "kept_fraction": s.get("mean_kept_fraction"),
                    "max_val_nat_drop": drop,
                    "collapsed": drop > COLLAPSE_POINTS,
                    "train_seconds": s["train_seconds"],
                }
            )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})


def plot(args: argparse.Namespace, path: Path) -> None:
    """Validation natural and PGD-20 accuracy per epoch, mean over seeds (band: min to max), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, name, _) in enumerate(variants(args)):
        colour = colours[k % len(colours)]
        seeds = _finished(args, name)
        if not seeds:
            continue
        curves = [_read_metrics(args.runs / f"{name}_s{seed}") for seed in seeds]
        epochs = np.array([int(r["epoch"]) for r in curves[0]])
        for ax, col in zip(axes[:2], ("val_nat_acc", "val_pgd20_acc")):
            values = np.array([[float(r[col]) for r in c] for c in curves])
            ax.plot(epochs, values.mean(0), "-o", ms=3, color=colour, label=label)
            ax.fill_between(epochs, values.min(0), values.max(0), color=colour, alpha=0.15)
    for ax, title in zip(axes[:2], ("validation natural accuracy", "validation PGD-20 accuracy")):
        ax.set_title(f"{title}\n(mean over the seeds, band: min to max)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for k, (label, name, _) in enumerate(variants(args)):
        summaries = [
            json.loads((args.runs / f"{name}_s{s}" / "summary.json").read_text()) for s in _finished(args, name)
        ]
        if not summaries:
            continue
        nat = [s["last_nat_acc"] for s in summaries]
        rob = [s["last_pgd20_acc"] for s in summaries]
        ax.scatter(nat, rob, color=colours[k % len(colours)], alpha=0.5, s=18)
        ax.scatter([np.mean(nat)], [np.mean(rob)], color=colours[k % len(colours)], marker="*", s=160,
                   edgecolor="black", label=label)  # fmt: skip
    ax.set_title("test accuracy at the last epoch (dots: seeds, star: mean)")
    ax.set_xlabel("natural accuracy (%)")
    ax.set_ylabel("PGD-20 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{args.dataset}, {args.arch}: adversarial fine-tuning of one natural model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _collapsed(rows: list[dict]) -> str:
    """'no', or the seeds whose validation Nat fell by more than COLLAPSE_POINTS (with the fall)."""
    bad = [f"s{r['seed']} (-{r['max_val_nat_drop']:.1f})" for r in rows if r["collapsed"]]
    return ", ".join(bad) if bad else ("no" if rows else "-")


def render(args: argparse.Namespace, rows: list[dict]) -> str:
    path = args.runs / "study.json"  # written when an invocation of the study ends
    record = json.loads(path.read_text()) if path.is_file() else {
        "date": datetime.date.today().isoformat(), "git": _git_sha(), "python": platform.python_version(),
        "wall_minutes": None, "jobs": args.jobs, "threads_per_job": args.threads,
    }  # fmt: skip
    wall = "an unrecorded amount" if record["wall_minutes"] is None else f"{record['wall_minutes']:.0f} minutes"
    pre = json.loads((pretrain_dir(args) / "summary.json").read_text())
    # The protocol from the finished runs (a partial study renders too): any run for the shared values,
    # the first finished run of each method for its beta.
    finished = [args.runs / f"{r['run']}_s{r['seed']}" for r in rows]
    first = next((run for run in finished if run.name.startswith("cure_s")), finished[0])
    cfg = json.loads((first / "config.json").read_text())
    eps = json.loads((first / "summary.json").read_text())["eps"]
    lrs = [float(r["lr"]) for r in _read_metrics(first)]
    drops = [str(e + 1) for e in range(1, len(lrs)) if lrs[e] < lrs[e - 1]] or ["none"]
    betas = {}
    for name in ("trades", "mart", "cure"):
        run = next((run for run in finished if run.name.startswith(f"{name}_s")), None)
        betas[name] = json.loads((run / "config.json").read_text())["beta"] if run else "-"
    total_train = sum(r["train_seconds"] for r in rows) / 60
    lines = [
        f"# Where the mask bites: {args.dataset}, {args.arch}, six methods from one natural model",
        "",
        f"Made by `scripts/mask_study.py` on {record['date']} (git {record['git']}, Python {record['python']}), "
        f"on a 2-core CPU: {record['jobs']} runs at a time with {record['threads_per_job']} thread(s) each, "
        f"{wall} of wall-clock time in all ({total_train:.0f} minutes of "
        f"training and validation summed over the {len(rows)} adversarial runs).",
        "",
        "## Protocol",
        "",
        f"- Natural pre-training: ST, {pre['arch']}, {pre['train_images']} training images (the split less "
        f"{args.pretrain_val_size} held out for validation, or a subset), {args.pretrain_epochs} epoch(s) "
        f"({pre['train_seconds'] / 60:.0f} minutes); test Nat {pre['last_nat_acc']:.2f} %, "
        f"PGD-20 {pre['last_pgd20_acc']:.2f} %.",
        f"- Every method then trains {args.epochs} epochs on the same {args.train_samples} training images "
        f"from that checkpoint, seeds {', '.join(map(str, args.seeds))}: SGD lr {cfg['lr']} (momentum "
        f"{cfg['momentum']}, weight decay {cfg['weight_decay']}, {cfg['lr_schedule']} schedule, drops at "
        f"epochs {', '.join(drops)}), batch {cfg['batch_size']}, L-inf eps {eps}, "
        f"{cfg['attack_steps']} training attack steps of {cfg['step_size']}; beta: TRADES {betas['trades']}, "
        f"MART {betas['mart']}, CURE {betas['cure']}; CURE p {cfg['p']}, alpha {cfg['alpha']}, gamma "
        f"{cfg['gamma']}, r {cfg['revision_rate']}, d {cfg['revision_decay']}, mask mode '{cfg['mask_mode']}'.",
        f"- Model selection: the epoch with the highest validation PGD-20 on {args.val_size} held-out "
        f"training images. Test: {args.eval_samples} test images, PGD-20 (L-inf eps {eps}, 20 steps of "
        f"eps/4, random start). NRR = 2 Nat Rob / (Nat + Rob).",
        "- Cells are mean ± half the range over the seeds that finished (column 'seeds'). 'kept' is the mean "
        "fraction of gradient entries the RGP mask let through (1 - p when no tensor has more than a fraction p of "
        "exactly-zero scores). 'collapsed' lists the seeds whose validation Nat fell by more than "
        f"{COLLAPSE_POINTS:.0f} points between two epochs (the largest fall in brackets).",
        "",
        "## Results (test accuracy, %)",
        "",
        "| method | seeds | Nat (last) | PGD-20 (last) | NRR (last) | Nat (best) | PGD-20 (best) | best epoch "
        "| PGD-20 best - last | revision Nat | revision PGD-20 | kept | collapsed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, name, _ in variants(args):
        rs = [r for r in rows if r["run"] == name]

        def col(key, rs=rs):
            return [r[key] for r in rs if r[key] is not None]

        kept = col("kept_fraction")
        lines.append(
            f"| {label} | {', '.join(str(r['seed']) for r in rs)} | {_mean_spread(col('last_nat'))} "
            f"| {_mean_spread(col('last_pgd20'))} "
            f"| {_mean_spread(col('last_nrr'))} | {_mean_spread(col('best_nat'))} "
            f"| {_mean_spread(col('best_pgd20'))} | {', '.join(str(e) for e in col('best_epoch'))} "
            f"| {_mean_spread(col('best_minus_last_pgd20'))} | {_mean_spread(col('rev_last_nat'))} "
            f"| {_mean_spread(col('rev_last_pgd20'))} "
            f"| {'-' if not kept else f'{100 * statistics.fmean(kept):.1f} %'} "
            f"| {_collapsed(rs)} |"
        )
    missing = [f"{name}_s{seed}" for seed in args.seeds for _, name, _ in variants(args)
               if seed not in _finished(args, name)]
    if missing:
        lines += ["", f"Not finished when this table was made (left out): {', '.join(missing)}."]
    stem = args.output.stem
    lines += [
        "",
        f"Per run: `{stem}.csv`. Figures: `{stem}.png` (validation curves, mean over seeds; test Nat vs "
        f"PGD-20), and `cure plot` of the seed-{args.seeds[0]} runs in `{stem}/` (curves, revision vs "
        "trained, loss terms, per-layer kept fraction and gradient prominence). Every run's `metrics.csv` "
        f"(per epoch, with the loss terms) and `summary.json`: `{stem}/runs/`.",
        "",
        "## Commands",
        "",
        "```",
        f"python scripts/mask_study.py {shlex.join(args.argv)}".rstrip(),
        "# which ran, from the repository root:",
        shlex.join(pretrain_command(args)),
    ]
    lines += [
        shlex.join(run_command(args, extra, seed, args.runs / f"{name}_s{seed}"))
        for seed in args.seeds
        for _, name, extra in variants(args)
    ]
    lines += ["```", ""]
    return "\n".join(lines + notes_section(args))


def training_argv(argv: list[str]) -> list[str]:
    """The command line as it trains: the rendering options (--table-only, --notes FILE) left out."""
    out, skip_next = [], False
    for a in argv:
        if skip_next or a == "--table-only" or a.startswith("--notes="):
            skip_next = False
            continue
        skip_next = a == "--notes"
        if not skip_next:
            out.append(a)
    return out


def notes_section(args: argparse.Namespace) -> list[str]:
    """The '## What it shows' lines from ``--notes`` (none without it)."""
    notes = args.notes.read_text().strip() if args.notes and args.notes.is_file() else ""
    return ["## What it shows", "", notes, ""] if notes else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "mask_study")
    parser.add_argument("--output", type=Path, default=None, help="default results/mask_study_<dataset>_<arch>.md")
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended as 'What it shows'")
    parser.add_argument("--table-only", action="store_true", help="re-render from --runs; no training")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--pretrain-samples", type=int, default=None, help="default: the full split")
    parser.add_argument("--pretrain-val-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-samples", type=int, default=2048)
    parser.add_argument("--val-size", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--attack-steps", type=int, default=5)
    parser.add_argument("--step-size", type=float, default=0.025)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the trainer's (128)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated subset of {','.join(v[1] for v in VARIANTS)} (default: all)")
    parser.add_argument("--lr-milestones", default=None, help="passed to every adversarial run")
    parser.add_argument("--pretrain-dir", type=Path, default=None, help="default: RUNS/pretrain_st")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    args = parser.parse_args()
    args.argv = training_argv(sys.argv[1:])
    args.output = args.output or ROOT / "results" / f"mask_study_{args.dataset}_{args.arch}.md"
    if not args.table_only:
        run(args)
    rows = collect(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.output.with_suffix(".csv"))
    plot(args, args.output.with_suffix(".png"))
    sys.path.insert(0, str(ROOT))
    from cure.plots import plot_runs

    first = [args.runs / f"{name}_s{args.seeds[0]}" for _, name, _ in variants(args)]
    plot_runs([run for run in first if (run / "metrics.csv").is_file()], args.output.with_suffix(""))
    copy_run_files(args, args.output.with_suffix("") / "runs")
    args.output.write_text(render(args, rows))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
