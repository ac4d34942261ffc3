"""Command line: ``cure train``, ``cure eval``, ``cure presets``, ``cure analyze`` and ``cure plot``
(``python -m cure ...`` is the same).

    cure train --method st --dataset fashion-mnist --arch cnn --epochs 2 --out runs/st
    cure train --method cure --dataset fashion-mnist --arch cnn --epochs 5 --init runs/st/last.pt \
        --out runs/cure
    cure train --out runs/cure --resume
    cure train --method cure --dataset cifar10 --arch resnet18 --epochs 50 --print-config
    cure eval --checkpoint runs/cure/last.pt --attacks nat,pgd20,cw,aa --which both
    cure eval --checkpoint runs/cure/last.pt --attacks nat,pgd20,cw --eval-protocol official
    cure eval --checkpoint runs/cure/last.pt --attacks nat,corruptions --severities 1,3,5
    cure eval --model model.ts --dataset fashion-mnist --attacks nat,pgd20,aa   # TorchScript, any model
    cure eval --model mymodels:robust_cnn --attacks nat,pgd20 --out results    # a function returning it
    cure analyze cka --a runs/st/last.pt --b runs/cure/last.pt --out analysis/cka --adversarial
    cure plot runs/at runs/cure --out figures
    cure train --method mart --norm l2 --out runs/mart-l2           # MART, L2 threat model (eps 1.5)
    cure train --arch resnet18 --list-blocks                        # block names for --freeze / --reinit
    cure train --method at --init runs/st/last.pt --reinit layer2 --freeze stem,layer1,layer3,layer4,fc \
        --out runs/layer2

Every bad argument is reported argparse-style (exit status 2) before any work starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _csv_list(kind):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return tuple(kind(t) for t in items)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {exc}") from exc

    return parse


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from cure.attacks import NORMS
    from cure.config import DEVICES, EVAL_PROTOCOLS, LR_SCHEDULES, MASK_MODES, METHODS, REVISION_BN_MODES

    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("run")
    g.add_argument(
        "--out", type=Path, help="run directory (config, metrics, checkpoints, summary); required to train"
    )
    g.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as JSON (every value and its source: default, method "
        "default, preset or command line) and exit without training or reading data",
    )
    g.add_argument(
        "--resume", action="store_true", help="continue the run in --out exactly where last.pt stopped"
    )
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="data-parallel runs (torchrun) on CUDA: BatchNorm statistics over the global batch "
        "(SyncBatchNorm); not saved in the run's configuration, pass it again with --resume",
    )
    g.add_argument(
        "--preset",
        default=None,
        help="named defaults (see `cure presets`); default: the paper's Table 9 preset for the dataset "
        "and arch when there is one. Explicit options override it",
    )
    g.add_argument(
        "--method",
        choices=METHODS,
        help="st (natural), at (Madry), trades, cure (default), mart (Wang et al. 2020; beta 6 unless --beta)",
    )
    g.add_argument("--dataset", help="fashion-mnist (default), cifar10, cifar100, svhn")
    g.add_argument("--arch", help="cnn, resnet18, preact-resnet18, wrn-34-10, resnet20")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", choices=DEVICES)
    g.add_argument("--amp", action=B, default=None, help="bfloat16 autocast for forward passes")
    g.add_argument("--compile", action=B, default=None, help="torch.compile the model")
    g.add_argument(
        "--channels-last", action=B, default=None, help="channels-last memory format (default: on CUDA)"
    )
    g.add_argument("--kernel-backend", help="cure_kernels backend: auto, reference, cpu, triton, cuda, torch")
    g.add_argument(
        "--checkpoint-every", type=int, help="also save last.pt every N steps (0: epoch ends only)"
    )
    g.add_argument(
        "--log-every", type=int, help="steps between progress/TensorBoard updates and fault checks"
    )
    g.add_argument(
        "--max-skipped-steps",
        type=int,
        help="stop when more consecutive steps than this had a non-finite loss or scores (default 20)",
    )
    g.add_argument("--progress", action=B, default=None, help="tqdm progress bars")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data-root",
        help="torchvision-layout dataset root (Fashion-MNIST is also found in "
        "/usr/share/datasets/fashion-mnist)",
    )
    g.add_argument(
        "--download", action=B, default=None, help="download CIFAR/SVHN into --data-root if missing"
    )
    g.add_argument("--train-samples", type=int, help="deterministic subset of the training split")
    g.add_argument("--val-size", type=int, help="training images held out for model selection")
    g.add_argument(
        "--eval-samples", type=int, help="deterministic subset of the test split for the final evaluation"
    )
    g.add_argument("--data-seed", type=int, help="seed of the validation split and the subsets")
    g.add_argument("--eval-attacks", type=_csv_list(str), help="final evaluation, e.g. nat,pgd20,cw,aa")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument(
        "--eval-protocol",
        choices=EVAL_PROTOCOLS,
        help="attack settings of validation and test evaluation: ours (default: PGD steps of eps/4, C&W "
        "30 steps on the margin) or official (the official code's test.py: PGD-20 in steps of 0.003, C&W "
        "margin clamped at kappa 50, 20 steps of 0.003, unclipped uniform start; the step stays 0.003 at "
        "any eps, Fashion-MNIST's 0.1 included, as in their code)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES)
    g.add_argument(
        "--lr-milestones", type=_csv_list(int), help="epochs where the piecewise lr drops, e.g. 100,150"
    )
    g.add_argument("--lr-decay", type=float, help="piecewise factor (default 0.1)")

    g = p.add_argument_group("attack (training)")
    g.add_argument("--eps", type=float, help="L-inf radius for inputs in [0, 1] (default: the dataset's)")
    g.add_argument("--step-size", type=float, help="PGD step (default: the dataset's)")
    g.add_argument("--attack-steps", type=int, help="K")
    g.add_argument(
        "--norm",
        choices=NORMS,
        help="threat model of training and evaluation: linf (default) or l2 (default eps: 0.5 for CIFAR and "
        "SVHN, 1.5 for Fashion-MNIST; step eps/4)",
    )

    g = p.add_argument_group("CURE")
    g.add_argument("--beta", type=float, help="KL weight of TRADES/CURE")
    g.add_argument("--gamma", type=float, help="consistency weight of L_CR")
    g.add_argument("--alpha", type=float, help="weight of |dL_nat/dw| in the prominence score")
    g.add_argument("-p", "--p", "--conserve-fraction", dest="p", type=float, help="conserved fraction per tensor")
    g.add_argument(
        "--mask-mode",
        choices=MASK_MODES,
        help="grad: mask the gradient (default, like the official code); update: freeze conserved "
        "weights entirely (momentum and weight decay too)",
    )
    g.add_argument("--no-mask", action="store_true", default=None, help="ablation: no RGP masking")
    g.add_argument(
        "--no-revision", action="store_true", default=None, help="ablation: no revision model / L_CR"
    )
    g.add_argument(
        "--revision-bn",
        choices=REVISION_BN_MODES,
        help="BatchNorm of the revision model: batch (default, like the official code: L_CR targets in train "
        "mode, EMA over the parameters, its own running statistics) or ema (targets in eval mode, running "
        "statistics averaged with the weights; collapses BatchNorm networks, see docs/method.md)",
    )
    g.add_argument("--revision-rate", type=float, help="r")
    g.add_argument("--revision-decay", type=float, help="d")
    g.add_argument("--revision-rate-decay-epoch", type=int, help="from this epoch on r is multiplied by ...")
    g.add_argument("--revision-rate-decay-factor", type=float, help="... this factor (default 0.5)")
    g.add_argument(
        "--init", help="checkpoint to start from (natural pre-training: DIR/last.pt of a --method st run)"
    )
    g.add_argument("--warmup-epochs", type=int, help="CURE-Eff: natural training for the first N of --epochs")
    g.add_argument(
        "--from-scratch",
        action="store_true",
        default=None,
        help="start CURE from random weights on purpose (without it, --method cure needs --init or "
        "--warmup-epochs: the method continues from a naturally trained network)",
    )

    g = p.add_argument_group("layer study (blocks: --list-blocks)")
    g.add_argument(
        "--reinit",
        type=_csv_list(str),
        help="comma-separated blocks to re-initialise after loading --init, e.g. layer2",
    )
    g.add_argument(
        "--freeze",
        type=_csv_list(str),
        help="comma-separated blocks to keep fixed (not trained, not in the optimizer or the CURE mask)",
    )
    g.add_argument(
        "--list-blocks",
        action="store_true",
        help="print the block names of --arch (for --dataset) with their parameter counts and exit",
    )

_NOT_CONFIG = {"command", "subparser", "out", "resume", "overwrite", "preset", "sync_bn", "print_config", "list_blocks"}


def build_parser() -> argparse.ArgumentParser:
    from cure.config import EVAL_PROTOCOLS
    from cure.data import DATASETS

    parser = argparse.ArgumentParser(
        prog="cure", description="CURE (Conserve-Update-Revise) adversarial training"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,presets,analyze,plot}")
    p_train = sub.add_parser("train", help="train a model", description="Train ST, AT, TRADES or CURE.")
    _add_train_arguments(p_train)
    p_train.set_defaults(subparser=p_train)
    p_eval = sub.add_parser(
        "eval",
        help="evaluate a checkpoint or any model",
        description="Evaluate a checkpoint of `cure train`, or any model taking inputs in [0, 1] and returning "
        "logits (RobustBench's convention), on the test split.",
    )
    p_eval.add_argument(
        "--model",
        "--checkpoint",
        dest="source",
        required=True,
        metavar="SOURCE",
        help="DIR/last.pt or DIR/best.pt of `cure train`; a TorchScript file (torch.jit.save); a torch.save(model) "
        "file of a whole nn.Module (with --allow-pickle); or module.path:function returning the nn.Module "
        "(imported with the current directory on sys.path). Models other than checkpoints take their dataset "
        "and threat model from --dataset, --norm, --eps (defaults: fashion-mnist, linf, the dataset's radius)",
    )
    p_eval.add_argument(
        "--allow-pickle",
        action="store_true",
        help="--model may be a torch.save(model) pickle of a whole nn.Module: read with "
        "torch.load(weights_only=False), which runs code named in the file; only for files you trust",
    )
    p_eval.add_argument(
        "--dataset",
        choices=tuple(DATASETS),
        help="dataset of a model that is not a checkpoint (default fashion-mnist); a checkpoint's is its run's",
    )
    p_eval.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="directory of eval.json (default: the model file's directory; the current directory for "
        "module:function)",
    )
    p_eval.add_argument(
        "--attacks",
        type=_csv_list(str),
        default=("nat", "pgd20"),
        help="comma-separated: nat, pgd20, pgd100, cw, aa, corruptions (the 15 CIFAR-10-C corruption types "
        "at --severities; default nat,pgd20)",
    )
    _add_corruption_arguments(p_eval)
    p_eval.add_argument(
        "--which",
        choices=("model", "revision", "both"),
        default="model",
        help="network of a checkpoint: the trained model (default), CURE's revision model, or both",
    )
    p_eval.add_argument("--eval-samples", type=int, help="deterministic subset of the test split")
    p_eval.add_argument(
        "--eps", type=float, help="radius (default: the one the run trained with, else the dataset's usual one)"
    )
    p_eval.add_argument(
        "--norm",
        choices=("linf", "l2"),
        help="threat model (default: the run's, a changed norm needs --eps; linf for other models)",
    )
    p_eval.add_argument("--batch-size", type=int, default=256)
    p_eval.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p_eval.add_argument(
        "--data-root", help="dataset root (default: the run's; Fashion-MNIST's system copy for other models)"
    )
    p_eval.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    p_eval.add_argument(
        "--eval-protocol",
        choices=EVAL_PROTOCOLS,
        help="ours or official (see `cure train --help`); default: the protocol the run was trained with "
        "(ours for other models)",
    )
    p_eval.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p_eval.set_defaults(subparser=p_eval)
    sub.add_parser("presets", help="list the named presets and the sources of their values")
    _add_analysis_parsers(sub)
    return parser


def _print_config(args: argparse.Namespace, explicit: dict[str, Any]) -> None:
    """The resolved configuration as JSON: {field: {"value": ..., "source": ...}} (a resumed run: its saved
    values, "saved run" or "command line"). Values left to the dataset or the epoch count (eps and
    step_size None, lr_milestones None) are shown resolved, with the rule as their source."""
    from cure.config import resolve_config_with_sources
    from cure.data import DATASETS
    from cure.train import resume_config

    if args.resume:
        cfg = resume_config(args.out, explicit)
        sources = {k: ("command line" if k in explicit else f"saved run {args.out}") for k in cfg.to_dict()}
    else:
        cfg, sources = resolve_config_with_sources(
            explicit, preset=args.preset if args.preset is not None else "auto"
        )
    values = cfg.to_dict()
    spec = DATASETS[cfg.dataset]
    for key in ("eps", "step_size"):
        if values[key] is None:
            values[key] = getattr(spec, key)
            sources[key] = f"default for dataset {cfg.dataset}"
    if values["lr_milestones"] is None and cfg.lr_schedule == "piecewise":
        values["lr_milestones"] = list(cfg.resolved_milestones())
        sources["lr_milestones"] = f"default (50 % and 75 % of {cfg.epochs} epochs)"
    print(json.dumps({k: {"value": v, "source": sources[k]} for k, v in values.items()}, indent=2))


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cure.checkpoint import CheckpointError
    from cure.config import ConfigError, resolve_config
    from cure.data import DatasetCorruptError, DatasetNotFoundError
    from cure.train import TrainingError, holds_a_run, prepare_output_dir, resume_config, train

    explicit = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}
    if args.out is None and (args.resume or not args.print_config):
        parser.error("the following arguments are required: --out")
    try:
        if args.print_config:
            _print_config(args, explicit)
            return 0
        if args.resume:
            if args.overwrite:
                raise ConfigError("--resume and --overwrite contradict each other; pick one")
            prepare_output_dir(args.out, resume=True, overwrite=False)  # checks only
            cfg = resume_config(args.out, explicit)
        else:
            cfg = resolve_config(explicit, preset=args.preset if args.preset is not None else "auto")
            cfg.check_starting_point()
            if cfg.init is not None and not Path(cfg.init).is_file():
                raise ConfigError(
                    f"--init {cfg.init} does not exist (expected DIR/last.pt of `cure train --method st`)"
                )
            # Under torchrun only rank 0 checks: it may already have written config.json when others look.
            later_rank = int(os.environ.get("RANK", "0") or 0) > 0
            occupied = holds_a_run(args.out) and not later_rank
            if occupied and not args.overwrite:
                raise ConfigError(
                    f"--out {args.out} already exists and is not empty; add --resume to continue that run "
                    f"or --overwrite to replace it"
                )
    except ConfigError as exc:
        parser.error(str(exc))
    except CheckpointError as exc:
        print(f"cure train: error: {exc}", file=sys.stderr)
        return 1
    try:
        train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, sync_bn=args.sync_bn)
    except ConfigError as exc:
        parser.error(str(exc))
    except (TrainingError, CheckpointError, DatasetNotFoundError, DatasetCorruptError) as exc:
        print(f"cure train: error: {exc}", file=sys.stderr)
        return 1
    return 0


@dataclass
class _EvalTarget:
    """What `cure eval` evaluates, resolved from --model/--checkpoint and the options.

    Attributes:
        source: the --model value as given.
        checkpoint: the path of a `cure train` checkpoint, None for any other model.
        name: the model's entry in eval.json (the file name, or the ``module:function`` string).
        out_dir: the directory of eval.json.
        title: how the table's header names the model ("cure on fashion-mnist (cnn)").
        dataset, data_root, data_seed: the test split (data_seed picks the --eval-samples subset).
        norm, eps, protocol: the threat model and attack settings.
        whiches: the networks of a checkpoint to evaluate ("model", "revision"); ("model",) otherwise.
        model: the loaded model of a source that is not a checkpoint.
    """

    source: str
    checkpoint: Path | None
    name: str
    out_dir: Path
    title: str
    dataset: str
    data_root: str | None
    data_seed: int
    norm: str
    eps: float
    protocol: str
    whiches: tuple[str, ...]
    model: Any = None

    def load(self, which: str, device):
        """The network ``which`` on ``device`` in eval mode."""
        if self.checkpoint is None:
            return self.model
        from cure.checkpoint import load_model

        return load_model(self.checkpoint, which=which, map_location=device)


def _checkpoint_state(source: str) -> dict[str, Any] | None:
    """The state of the `cure train` checkpoint ``source``, None when it is no such file (another model);
    :class:`~cure.checkpoint.CheckpointError` for a checkpoint that is unusable (another version, incomplete)."""
    from cure.checkpoint import NotACheckpointError, load_checkpoint

    if not Path(source).is_file():
        return None
    try:
        with warnings.catch_warnings():  # torch.load refuses a TorchScript file: that is the answer, no warning
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            return load_checkpoint(source)
    except NotACheckpointError:
        return None


def _open_target(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """`cure eval`: (device, :class:`_EvalTarget`) of ``args.source``; argparse-style errors for a bad device,
    model source, option that does not apply (--which revision without a revision model or for other models,
    --dataset differing from a checkpoint's) or threat model (a changed norm without --eps)."""
    from cure.attacks import default_radius
    from cure.checkpoint import CheckpointError
    from cure.config import TrainConfig
    from cure.device import select_device
    from cure.external import ModelSourceError, load_external_model

    try:
        device = select_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    source = args.source
    out_dir = args.out
    try:
        state = _checkpoint_state(source)
    except CheckpointError as exc:
        parser.error(str(exc))
    if state is not None:
        cfg = TrainConfig.from_dict(state["config"])
        whiches = ("model", "revision") if args.which == "both" else (args.which,)
        if "revision" in whiches and state.get("revision") is None:
            if args.which == "revision":
                parser.error(f"{source} holds no revision model (method {cfg.method})")
            whiches = ("model",)
        del state
        if args.dataset is not None and args.dataset != cfg.dataset:
            parser.error(f"--dataset {args.dataset}: checkpoint {source} was trained on {cfg.dataset}; "
                         f"leave --dataset out for checkpoints")
        norm = args.norm or cfg.norm
        if norm != cfg.norm and args.eps is None:
            parser.error(f"--norm {norm}: the run trained in {cfg.norm}, so its eps does not apply; give --eps")
        eps = args.eps if args.eps is not None else cfg.eps
        path = Path(source)
        return device, _EvalTarget(
            source=source, checkpoint=path, name=path.name, out_dir=out_dir or path.parent,
            title=f"{cfg.method} on {cfg.dataset} ({cfg.arch})", dataset=cfg.dataset,
            data_root=args.data_root or cfg.data_root, data_seed=cfg.data_seed, norm=norm,
            eps=eps if eps is not None else default_radius(cfg.dataset, norm)[0],
            protocol=args.eval_protocol or cfg.eval_protocol, whiches=whiches,
        )
    if args.which != "model":
        parser.error(f"--which {args.which}: only a checkpoint of `cure train` has a revision model; "
                     f"--model {source} is another model (leave --which out)")
    try:
        model = load_external_model(source, allow_pickle=args.allow_pickle, map_location=device)
    except ModelSourceError as exc:
        parser.error(str(exc))
    dataset = args.dataset or "fashion-mnist"
    norm = args.norm or "linf"
    is_file = Path(source).is_file()
    return device, _EvalTarget(
        source=source, checkpoint=None, name=Path(source).name if is_file else source,
        out_dir=out_dir or (Path(source).parent if is_file else Path.cwd()),
        title=f"{'file' if is_file else 'function'} model on {dataset}", dataset=dataset,
        data_root=args.data_root, data_seed=TrainConfig.data_seed, norm=norm,
        eps=args.eps if args.eps is not None else default_radius(dataset, norm)[0],
        protocol=args.eval_protocol or "ours", whiches=("model",), model=model,
    )


def _test_split(args: argparse.Namespace, target: _EvalTarget):
    """The target's test split, or its deterministic --eval-samples subset."""
    from cure.data import deterministic_subset, load_split

    images, labels = load_split(target.dataset, target.data_root, train=False, download=False)
    if args.eval_samples is not None and args.eval_samples < len(labels):
        images, labels = deterministic_subset(images, labels, args.eval_samples, seed=target.data_seed)
    return images, labels


def _check_model_output(target: _EvalTarget, images, device, parser) -> None:
    """A model that is not a checkpoint must take a few test images and return one logit per class, checked
    before the attacks (a checkpoint's network is built for its dataset)."""
    import torch

    from cure.data import DATASETS
    from cure.external import ModelSourceError, check_logits

    if target.checkpoint is not None:
        return
    x = images[:4].to(device)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    try:
        check_logits(target.model, x, DATASETS[target.dataset].num_classes, target.dataset, target.source)
    except ModelSourceError as exc:
        parser.error(str(exc))


def _read_eval_json(path: Path) -> dict[str, Any]:
    """eval.json's entries, or none when the file is missing or unreadable."""
    if not path.is_file():
        return {}
    try:
        existing = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return existing if isinstance(existing, dict) else {}


def _check_attack_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """argparse-style errors for --attacks names and --eps values, before anything is loaded."""
    from cure.evaluation import ATTACKS

    for name in args.attacks:
        if name not in ATTACKS:
            parser.error(f"--attacks: unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    if args.eps is not None and args.norm != "l2" and not 0 <= args.eps <= 1:
        parser.error(f"--eps must lie in [0, 1], got {args.eps} (an L2 radius needs --norm l2)")
    if args.eps is not None and args.eps < 0:
        parser.error(f"--eps must be >= 0, got {args.eps}")


def _open_eval(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(device, target, test images, labels) of `cure eval`, opened once for the attacks and the corruptions
    (a module:function model is built, and the split read, a single time)."""
    if args.eval_samples is not None and args.eval_samples < 1:
        parser.error(f"--eval-samples must be at least 1, got {args.eval_samples}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    device, target = _open_target(args, parser)
    images, labels = _test_split(args, target)
    _check_model_output(target, images, device, parser)
    return device, target, images, labels


def _eval(args: argparse.Namespace, parser: argparse.ArgumentParser, opened) -> int:
    """Accuracy under --attacks of the target's networks; a table and the target's entry in eval.json.
    ``opened``: what :func:`_open_eval` returned."""
    import torch

    from cure.checkpoint import atomic_write_text
    from cure.data import DATASETS
    from cure.evaluation import attack_settings, evaluate
    from cure.train import NORM_TITLES, nrr

    device, target, images, labels = opened
    protocol, norm, eps = target.protocol, target.norm, target.eps
    if norm == "l2" and protocol == "official":
        parser.error("--eval-protocol official reproduces the official L-inf evaluation; use ours with --norm l2")
    spec = DATASETS[target.dataset]
    results: dict[str, dict[str, float]] = {}
    for which in target.whiches:
        model = target.load(which, device)
        res = evaluate(
            model,
            images,
            labels,
            spec=spec,
            attacks=tuple(args.attacks),
            batch_size=args.batch_size,
            device=device,
            eps=eps,
            progress=args.progress,
            seed=args.seed,
            protocol=protocol,
            norm=norm,
        )
        row: dict[str, float] = {f"{k}_acc": v for k, v in res.items()}
        if "nat" in res:
            for rob, key in (("pgd20", "nrr"), ("cw", "nrr_cw"), ("aa", "nrr_aa")):
                if rob in res:
                    row[key] = nrr(res["nat"], res[rob])
        results[which] = row
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    titles = {
        "nat_acc": "Nat",
        "pgd20_acc": "PGD-20",
        "pgd100_acc": "PGD-100",
        "cw_acc": "C&W",
        "aa_acc": "AA",
        "nrr": "NRR",
        "nrr_cw": "NRR(C&W)",
        "nrr_aa": "NRR(AA)",
    }
    keys = [k for k in titles if any(k in r for r in results.values())]
    print(
        f"{target.source}: {target.title}, {len(labels)} test images, "
        f"{NORM_TITLES[norm]} eps {eps:.4g}, {protocol} evaluation protocol; accuracies in %"
    )
    print(f"{'model':<9}" + "".join(f"{titles[k]:>10}" for k in keys))
    for which, row in results.items():
        print(f"{which:<9}" + "".join(f"{row[k]:>10.2f}" if k in row else f"{'-':>10}" for k in keys))
    path = target.out_dir / "eval.json"
    existing = _read_eval_json(path)
    settings = {"norm": norm, "eps": eps, "test_images": int(len(labels)), "eval_protocol": protocol,
                "seed": args.seed}
    if target.checkpoint is None:
        settings["dataset"] = target.dataset
    existing[target.name] = merge_eval_entry(
        existing.get(target.name), settings, list(args.attacks),
        attack_settings(tuple(args.attacks), eps, protocol), results,
    )
    target.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(existing, indent=2) + "\n", path)
    print(f"results written to {path}")
    return 0


def merge_eval_entry(old: dict[str, Any] | None, settings: dict[str, Any], attacks: list[str],
                     settings_per_attack: dict[str, dict], results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One checkpoint's entry of eval.json after a new evaluation: results merge per model and attack into
    the earlier ones measured under the same settings (norm, eps, test images, protocol, seed); an entry
    measured under other settings is kept whole under ``"earlier"`` (never mixed, never dropped)."""
    from cure.train import nrr

    entry: dict[str, Any] = dict(old or {})
    if entry and any(entry.get(k) != v for k, v in settings.items() if k in entry):
        earlier = entry.pop("earlier", [])
        entry = {"earlier": [*earlier, entry]}
    entry.update(settings)
    entry["attacks"] = list(dict.fromkeys([*entry.get("attacks", []), *attacks]))
    entry["attack_settings"] = {**entry.get("attack_settings", {}), **settings_per_attack}
    for which, row in results.items():
        merged = {**entry.get(which, {}), **row}
        if "nat_acc" in merged:  # every NRR from the merged accuracies
            for rob, key in (("pgd20", "nrr"), ("cw", "nrr_cw"), ("aa", "nrr_aa")):
                if f"{rob}_acc" in merged:
                    merged[key] = nrr(merged["nat_acc"], merged[f"{rob}_acc"])
        entry[which] = merged
    return entry


def _presets() -> int:
    from cure.config import METHOD_BETA, METHODS, PRESETS

    print("every preset and dataset: beta (weight of the KL term) per method")
    for method, (beta, source) in METHOD_BETA.items():
        if method in METHODS:
            print(f"    {method:<16} {beta!r:<24} {source}")
    for name, preset in PRESETS.items():
        print(f"{name}: {preset.description}")
        for key, value in preset.values.items():
            source = preset.sources.get(key, "")
            print(f"    {key:<16} {value!r:<24} {source}")
    return 0


# ------------------------------------------------------------------------------------------------
# Common corruptions in `cure eval`, `cure analyze` and `cure plot`
def _add_corruption_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--severities",
        type=_csv_list(int),
        default=None,
        help="with 'corruptions' in --attacks: the severities to average over, from 1..5 (default 1,2,3,4,5)",
    )


def _add_analysis_parsers(sub) -> None:
    p_an = sub.add_parser(
        "analyze", help="analyses of trained models (cka)", description="Analyses of trained models."
    )
    an_sub = p_an.add_subparsers(dest="analysis", required=True, metavar="{cka}")
    p = an_sub.add_parser(
        "cka",
        help="linear CKA between two checkpoints' blocks",
        description="Linear CKA (Kornblith et al. 2019) between the block outputs of two checkpoints on test "
        "images; writes cka.csv, cka_matrix.csv and cka.png into --out.",
    )
    p.add_argument("--a", required=True, type=Path, help="first checkpoint (DIR/last.pt or DIR/best.pt)")
    p.add_argument("--b", required=True, type=Path, help="second checkpoint (same dataset)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--a-which", choices=("model", "revision"), default="model", help="network of --a")
    p.add_argument("--b-which", choices=("model", "revision"), default="model", help="network of --b")
    p.add_argument("--samples", type=int, default=512, help="test images (deterministic subset; default 512)")
    p.add_argument("--adversarial", action="store_true", help="also on PGD-20 adversarial examples")
    p.add_argument(
        "--adv-source",
        choices=("each", "a", "b"),
        default="each",
        help="each: every model sees its own adversarial examples (default); a / b: both see those of a / b",
    )
    p.add_argument("--eps", type=float, help="L-inf radius of the PGD-20 examples (default: --a's run)")
    p.add_argument(
        "--estimator", choices=("standard", "unbiased"), default="standard", help="HSIC estimator in CKA"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--data-root", help="dataset root (default: --a's run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the PGD random starts")
    p.set_defaults(subparser=p)
    p_plot = sub.add_parser(
        "plot",
        help="figures of training runs",
        description="PNG figures of one or more run directories: accuracy curves (overlaid), the revision "
        "model, per-layer statistics (when the run has layer_stats.csv).",
    )
    p_plot.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories of `cure train`")
    p_plot.add_argument("--out", required=True, type=Path, help="output directory for the PNG files")
    p_plot.set_defaults(subparser=p_plot)


def _analysis(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cure.checkpoint import CheckpointError
    from cure.data import DatasetCorruptError, DatasetNotFoundError

    if args.command == "plot":
        from cure.plots import PlotError, run

        try:
            return run(args)
        except PlotError as exc:
            parser.error(str(exc))
    from cure.cka import CKAError, run

    if args.samples < 2:
        parser.error(f"--samples must be at least 2, got {args.samples}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.eps is not None and not 0 <= args.eps <= 1:
        parser.error(f"--eps must lie in [0, 1], got {args.eps}")
    try:
        return run(args)
    except (CKAError, CheckpointError, ValueError) as exc:
        parser.error(str(exc))
    except (DatasetNotFoundError, DatasetCorruptError) as exc:
        print(f"cure analyze cka: error: {exc}", file=sys.stderr)
        return 1


def _eval_all(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`cure eval`: the attacks (:func:`_eval`), then the common corruptions when --attacks names them; a
    missing or corrupt test split is an error (exit status 1) naming where it was looked for."""
    from cure.data import DatasetCorruptError, DatasetNotFoundError

    try:
        return _eval_attacks_and_corruptions(args, parser)
    except (DatasetNotFoundError, DatasetCorruptError) as exc:
        print(f"cure eval: error: {exc}", file=sys.stderr)
        return 1


def _eval_attacks_and_corruptions(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cure.corruptions import SEVERITIES

    if "corruptions" not in args.attacks:
        if args.severities is not None:
            parser.error("--severities applies only with 'corruptions' in --attacks")
        _check_attack_args(args, parser)
        return _eval(args, parser, _open_eval(args, parser))
    severities = tuple(args.severities) if args.severities is not None else SEVERITIES
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or len(set(severities)) != len(severities):
        parser.error(f"--severities must be distinct values from 1..5, got {','.join(map(str, severities))}")
    if args.attacks.count("corruptions") > 1:
        parser.error("--attacks lists 'corruptions' twice")
    args.attacks = tuple(a for a in args.attacks if a != "corruptions")
    if args.attacks:
        _check_attack_args(args, parser)
    opened = _open_eval(args, parser)
    if args.attacks:
        code = _eval(args, parser, opened)
        if code:
            return code
    return _eval_corruptions(args, parser, opened, severities, merge=bool(args.attacks))


def _eval_corruptions(args: argparse.Namespace, parser, opened, severities: tuple[int, ...], merge: bool) -> int:
    """Accuracy under the 15 common corruptions; a table, eval.json and the run's summary.json.
    ``opened``: what :func:`_open_eval` returned."""
    import torch

    from cure.checkpoint import atomic_write_text
    from cure.corruptions import CORRUPTIONS
    from cure.evaluation import evaluate_corruptions

    device, target, images, labels = opened
    results: dict[str, dict[str, Any]] = {}
    for which in target.whiches:
        model = target.load(which, device)
        results[which] = evaluate_corruptions(
            model,
            images,
            labels,
            severities=severities,
            batch_size=args.batch_size,
            device=device,
            seed=args.seed,
            progress=args.progress,
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sev_text = ",".join(map(str, severities))
    print(
        f"{target.source}: {target.title}, {len(labels)} test images, "
        f"common corruptions at severities {sev_text}; accuracies in %"
    )
    header = f"{'corruption':<19}" + "".join(f"{'sev ' + str(s):>8}" for s in severities) + f"{'mean':>8}"
    for which, res in results.items():
        if len(results) > 1:
            print(f"{which} model")
        print(header)
        for name in CORRUPTIONS:
            cells = "".join(f"{res['corruptions_by_severity'][name][str(s)]:>8.2f}" for s in severities)
            print(f"{name:<19}{cells}{res['corruptions'][name]:>8.2f}")
        print(f"{'mean (corruption_acc)':<{19 + 8 * len(severities)}}{res['corruption_acc']:>8.2f}")
    path = target.out_dir / "eval.json"
    existing = _read_eval_json(path)
    entry = existing.get(target.name, {}) if merge else {}
    entry.update({"test_images": int(len(labels)), "seed": args.seed})
    if target.checkpoint is None:
        entry["dataset"] = target.dataset
    entry["attacks"] = list(entry.get("attacks", [])) + ["corruptions"]
    entry["corruption_severities"] = list(severities)
    for which, res in results.items():
        entry.setdefault(which, {}).update(
            {k: res[k] for k in ("corruption_acc", "corruptions", "corruptions_by_severity")}
        )
    existing[target.name] = entry
    target.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(existing, indent=2) + "\n", path)
    print(f"results written to {path}")
    if target.checkpoint is None:
        return 0
    summary_path = target.checkpoint.parent / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            summary = None
        if isinstance(summary, dict):
            summary["corruption_checkpoint"] = target.name
            summary["corruption_severities"] = list(severities)
            summary["corruption_test_images"] = int(len(labels))
            for which, res in results.items():
                prefix = "" if which == "model" else "rev_"
                summary[f"{prefix}corruption_acc"] = res["corruption_acc"]
                summary[f"{prefix}corruptions"] = res["corruptions"]
            atomic_write_text(json.dumps(summary, indent=2) + "\n", summary_path)
            print(f"corruption accuracies added to {summary_path}")
    return 0


def _list_blocks(argv: list[str]) -> int:
    """``cure train --arch A [--dataset D] --list-blocks``: the block names for --freeze / --reinit."""
    import torch

    from cure.data import DATASETS
    from cure.models import ARCHS, build_model, model_blocks

    parser = argparse.ArgumentParser(prog="cure train --list-blocks", add_help=False)
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--dataset", default="fashion-mnist")
    args, _ = parser.parse_known_args(argv)
    if args.arch not in ARCHS:
        parser.error(f"--arch must be one of {', '.join(ARCHS)}; got {args.arch!r}")
    if args.dataset not in DATASETS:
        parser.error(f"--dataset must be one of {', '.join(DATASETS)}; got {args.dataset!r}")
    with torch.device("meta"):  # parameter counts only, no memory
        blocks = model_blocks(build_model(args.arch, DATASETS[args.dataset]))
    print(f"blocks of {args.arch} for {args.dataset} (in forward order; use with --freeze / --reinit):")
    for name, block in blocks.items():
        print(f"  {name:<8} {sum(q.numel() for q in block.parameters()):>12,} parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``cure ...``; a reader that closes the pipe early (``cure presets | head``) ends it quietly."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at devnull so that flush cannot raise too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"] and "--list-blocks" in argv:  # needs no --out: answered before parsing
        return _list_blocks(argv[1:])
    args = parser.parse_args(argv)
    root = getattr(args, "data_root", None)
    checks_data = not getattr(args, "print_config", False)  # --print-config reads no data
    if root is not None and checks_data and not os.path.isdir(root) and not getattr(args, "download", None):
        # Every dataset: a root given on purpose must exist (Fashion-MNIST would otherwise silently come
        # from the system package while config.json records the path given).
        args.subparser.error(f"--data-root {root} does not exist; give an existing directory, leave it out "
                             f"(Fashion-MNIST is also found in /usr/share/datasets/fashion-mnist), or add "
                             f"--download to fetch the dataset into it")
    if args.command == "train":
        return _train(args, args.subparser)
    if args.command == "eval":
        return _eval_all(args, args.subparser)
    if args.command in ("analyze", "plot"):
        return _analysis(args, args.subparser)
    return _presets()


if __name__ == "__main__":
    sys.exit(main())
