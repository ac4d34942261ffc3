"""The layer study of the paper's section 3 on Fashion-MNIST: which blocks need adversarial training?

    .venv/bin/python scripts/layer_study.py                       # tiny default budget (CPU, minutes)
    .venv/bin/python scripts/layer_study.py --arch resnet20 --epochs 2 --train-samples 8192
    .venv/bin/python scripts/layer_study.py --table-only          # re-render from the run directories

Protocol: one natural (ST) training run gives the starting checkpoint. Then, for every block of the
architecture (``cure train --arch A --list-blocks``) and every variant, adversarial training (``--method``,
default AT) from that checkpoint with the same budget, seed and threat model:

* ``reinit+freeze-others`` -- the block is re-initialised and trained alone, every other block frozen at
  its natural weights (the official code's layer study: ``--freeze_mode k`` with its default re-initialisation);
* ``freeze-others`` -- the block alone is adversarially fine-tuned from its natural weights, every other
  block frozen (the same with the re-initialisation switched off);
* ``reinit`` -- the block is re-initialised and the whole network trains (``--variants`` to add it).

Two reference rows: the natural checkpoint itself, and adversarial training of all blocks. Frozen blocks
keep their weights; their BatchNorm statistics still follow the batches (as in the official code).
Writes a markdown table (``layer_study.md``), a CSV and, with matplotlib, a figure (``layer_study.png``)
into ``--output-dir``, and the run directories to ``--runs``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from cure.checkpoint import load_model
from cure.config import resolve_config
from cure.data import DATASETS, deterministic_subset, load_split
from cure.evaluation import evaluate, nrr
from cure.models import block_names, build_model, model_blocks
from cure.train import train

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("reinit+freeze-others", "freeze-others", "reinit")
DEFAULT_VARIANTS = ("reinit+freeze-others", "freeze-others")
CSV_COLUMNS = ("variant", "block", "reinit", "freeze", "trained_parameters", "nat_acc", "pgd20_acc", "nrr",
               "train_seconds")


def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def variant_options(variant: str, block: str, blocks: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """The reinit / freeze lists of one grid cell."""
    others = tuple(b for b in blocks if b != block)
    if variant == "reinit+freeze-others":
        return {"reinit": (block,), "freeze": others}
    if variant == "freeze-others":
        return {"reinit": (), "freeze": others}
    if variant == "reinit":
        return {"reinit": (block,), "freeze": ()}
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def grid(blocks: tuple[str, ...], variants) -> list[tuple[str, str, dict]]:
    """(variant, block, options) for every cell, then adversarial training of all blocks."""
    cells = [(v, b, variant_options(v, b, blocks)) for v in variants for b in blocks]
    return cells + [("all", "all", {"reinit": (), "freeze": ()})]


def _trained_parameters(arch: str, dataset: str, freeze) -> int:
    with torch.device("meta"):
        blocks = model_blocks(build_model(arch, DATASETS[dataset]))
    return sum(q.numel() for name, b in blocks.items() if name not in freeze for q in b.parameters())


def run(args: argparse.Namespace) -> None:
    common = {
        "dataset": args.dataset,
        "arch": args.arch,
        "val_size": args.val_size,
        "eval_samples": args.eval_samples,
        "seed": args.seed,
        "device": args.device,
        "progress": False,
        "batch_size": args.batch_size,
        "attack_steps": args.attack_steps,
        "norm": args.norm,
    }
    started = time.time()
    natural = args.runs / "natural"
    if not (natural / "summary.json").is_file():
        print(f"== natural training: {args.natural_epochs} epochs on {args.natural_samples} images ==", flush=True)
        cfg = {**common, "method": "st", "epochs": args.natural_epochs, "train_samples": args.natural_samples}
        train(resolve_config(cfg), natural, overwrite=True)
    init = str(natural / "last.pt")
    blocks = block_names(args.arch)
    for variant, block, options in grid(blocks, args.variants):
        out = args.runs / f"{variant}_{block}"
        if (out / "summary.json").is_file() and not args.rerun:
            continue
        print(f"\n== {variant} {block}: reinit {list(options['reinit'])}, freeze {list(options['freeze'])} ==",
              flush=True)
        cfg = {**common, **options, "method": args.method, "epochs": args.epochs,
               "train_samples": args.train_samples, "init": init}
        train(resolve_config(cfg), out, overwrite=True)
    record = {
        "date": datetime.date.today().isoformat(),
        "git": _git_sha(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "minutes": (time.time() - started) / 60,
        "blocks": list(blocks),
        "args": {k: str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v)
                 for k, v in vars(args).items()},
    }
    (args.runs / "layer_study.json").write_text(json.dumps(record, indent=2) + "\n")


def _natural_row(runs: Path, cfg: dict) -> dict:
    """The natural checkpoint on the same test images and threat model as the adversarial runs."""
    images, labels = load_split(cfg["dataset"], cfg["data_root"], train=False)
    if cfg["eval_samples"] is not None and cfg["eval_samples"] < len(labels):
        images, labels = deterministic_subset(images, labels, cfg["eval_samples"], seed=cfg["data_seed"])
    model = load_model(runs / "natural" / "last.pt")
    res = evaluate(model, images, labels, spec=DATASETS[cfg["dataset"]], attacks=("nat", "pgd20"), device="cpu",
                   eps=cfg["eps"], progress=False, seed=cfg["seed"], norm=cfg.get("norm", "linf"))
    return {"variant": "natural", "block": "-", "reinit": "", "freeze": "", "trained_parameters": 0,
            "nat_acc": res["nat"], "pgd20_acc": res["pgd20"], "nrr": nrr(res["nat"], res["pgd20"]),
            "train_seconds": 0.0}


def collect(runs: Path) -> tuple[dict, list[dict], dict]:
    """The study's record, one row per cell (the natural checkpoint first), and the configuration of the
    first cell with the radius and step it trained with."""
    record = json.loads((runs / "layer_study.json").read_text())
    blocks = tuple(record["blocks"])
    rows = []
    first_cfg = None
    for variant, block, _ in grid(blocks, record["args"]["variants"]):
        out = runs / f"{variant}_{block}"
        s = json.loads((out / "summary.json").read_text())
        cfg = json.loads((out / "config.json").read_text())
        if first_cfg is None:
            first_cfg = {**cfg, "eps": s["eps"], "step_size": s["step_size"]}
        rows.append({
            "variant": variant,
            "block": block,
            "reinit": ",".join(cfg["reinit"]),
            "freeze": ",".join(cfg["freeze"]),
            "trained_parameters": _trained_parameters(cfg["arch"], cfg["dataset"], cfg["freeze"]),
            "nat_acc": s["nat_acc"],
            "pgd20_acc": s["pgd20_acc"],
            "nrr": s["nrr"],
            "train_seconds": s["train_seconds"],
        })
    return record, [_natural_row(runs, first_cfg)] + rows, first_cfg


def render(record: dict, rows: list[dict], cfg: dict, runs: Path) -> str:
    a = record["args"]
    norm = "L2" if cfg.get("norm") == "l2" else "L-inf"
    lines = [
        f"# Layer study: adversarial training of one block at a time ({cfg['arch']} on {cfg['dataset']})",
        "",
        f"Generated by `scripts/layer_study.py` on {record['date']} (git {record['git']}, torch {record['torch']}, "
        f"Python {record['python']}, {record['cpu_threads']} CPU thread(s)); {record['minutes']:.1f} minutes.",
        "",
        f"Protocol: natural training ({a['natural_epochs']} epochs on {a['natural_samples']} images), then "
        f"{cfg['method'].upper()} for {a['epochs']} epoch(s) on {a['train_samples']} images from that checkpoint "
        f"for every cell (seed {cfg['seed']}, SGD lr {cfg['lr']}, batch {cfg['batch_size']}, {norm} eps "
        f"{cfg['eps']:.4g}, {cfg['attack_steps']} attack steps of {cfg['step_size']:.4g}). Variants: "
        "'reinit+freeze-others' re-initialises the block and trains it alone (the official code's layer study); "
        "'freeze-others' fine-tunes the block alone from its natural weights; 'reinit' re-initialises the "
        "block and trains everything; 'all' trains every block. Frozen blocks keep their weights (their "
        "BatchNorm statistics still adapt).",
        "",
        f"Test accuracies in % on {cfg['eval_samples']} test images at the last epoch; PGD-20: {norm} eps "
        f"{cfg['eps']:.4g}, 20 steps of eps/4, random start; NRR = 2 Nat Rob / (Nat + Rob). A tiny budget: "
        "differences of a few points are within the noise of one seed.",
        "",
        "| variant | block | trained parameters | Nat | PGD-20 | NRR | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['block']} | {r['trained_parameters']:,} | {r['nat_acc']:.2f} "
                     f"| {r['pgd20_acc']:.2f} | {r['nrr']:.2f} | {r['train_seconds']:.0f} |")
    shown = runs.relative_to(ROOT) if runs.is_relative_to(ROOT) else runs
    lines += ["", f"Run directories: `{shown}`.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Nat and PGD-20 per block, one panel per variant; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v not in ("natural", "all")]
    reference = {r["variant"]: r for r in rows if r["variant"] in ("natural", "all")}
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.4), sharey=True, squeeze=False)
    for ax, variant in zip(axes[0], variants):
        cells = [r for r in rows if r["variant"] == variant]
        xs = range(len(cells))
        ax.bar([x - 0.2 for x in xs], [r["nat_acc"] for r in cells], width=0.4, label="Nat")
        ax.bar([x + 0.2 for x in xs], [r["pgd20_acc"] for r in cells], width=0.4, label="PGD-20")
        for name, style in (("natural", ":"), ("all", "--")):
            if name in reference:
                ax.axhline(reference[name]["pgd20_acc"], color="k", linestyle=style, linewidth=1,
                           label=f"PGD-20, {name}")
        ax.set_xticks(list(xs), [r["block"] for r in cells])
        ax.set_title(variant)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "layer_study")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--table-only", action="store_true", help="re-render from --runs; no training")
    parser.add_argument("--rerun", action="store_true", help="train cells again even if they finished before")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--method", default="at", help="adversarial training method of every cell (default at)")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
    parser.add_argument("--variants", type=lambda t: tuple(v for v in t.split(",") if v), default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--natural-epochs", type=int, default=2)
    parser.add_argument("--natural-samples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--attack-steps", type=int, default=3)
    parser.add_argument("--val-size", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    for v in args.variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    args.runs.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        run(args)
    record, rows, cfg = collect(args.runs)
    stem = f"layer_study_{cfg['dataset']}_{cfg['arch']}"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with open(args.output_dir / f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    table = render(record, rows, cfg, args.runs)
    (args.output_dir / f"{stem}.md").write_text(table)
    figure = args.output_dir / f"{stem}.png"
    drew = plot(rows, figure, f"{cfg['method'].upper()} per block, {cfg['arch']} on {cfg['dataset']}")
    print("\n" + table)
    print(f"written to {args.output_dir / (stem + '.md')}, {stem}.csv" + (f", {figure.name}" if drew else
          " (no figure: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
