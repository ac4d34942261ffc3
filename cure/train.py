"""The training loop: data, model, optimizer, schedule, per-epoch validation, checkpoints and the summary.

    summary = train(cfg, "runs/cure")              # a fresh run
    summary = train(cfg, "runs/cure", resume=True)  # continue exactly where last.pt stopped

Data: the training split minus a held-out validation split (``val_size`` images, used to pick the best
epoch by validation PGD-20 accuracy -- never the test set); the test split (or a deterministic subset of
``eval_samples`` images) is used once, for the final evaluation.

Per epoch: training metrics (loss, natural and adversarial accuracy on the training batches, the mean
fraction of gradient entries the mask kept, skipped steps, non-finite prominence scores, revision
updates), validation accuracy (natural and PGD-20) of the model and of the revision model, one row of
``metrics.csv``, TensorBoard scalars, ``last.pt`` and, when validation PGD-20 improves, ``best.pt``.
Per-layer statistics (kept fraction, mean |dL_nat/dw| and |dL_rob/dw|, update norm per parameter tensor)
accumulate on the device and go to ``layer_stats.csv`` and TensorBoard ``layers/*`` (:mod:`cure.layer_stats`).

The step itself never waits for the host: losses, accuracies and fault counters accumulate on the
device and are read every ``log_every`` steps (progress bar, TensorBoard, the skipped-step check).

Learning rate: "piecewise" multiplies lr by ``lr_decay`` at each milestone epoch (default 50 % and 75 %
of the epochs, the official code's 100 and 150 of 200); "cosine" anneals it to 0 over all steps; the
factor is a pure function of the optimizer step (``LambdaLR`` stepped once per batch).

Data-parallel runs (``torchrun --nproc_per_node N -m cure train ...``, see :mod:`cure.distributed`):
``batch_size`` stays the global batch, each rank trains on its shard of it, the step averages gradients,
BatchNorm buffers and the loss over the ranks, and every rank ends each step with identical weights.
Rank 0 alone writes ``config.json``, ``metrics.csv``, TensorBoard and checkpoints; a checkpoint is read
by rank 0 and broadcast, so all ranks resume from the same state. Each rank draws its attack noise from
a generator reseeded every step from (seed, rank, step), so a resumed run repeats the noise without
per-rank generator states in the checkpoint (world size 1 keeps the single attack generator of the
checkpoint). Validation and test evaluation are sharded (rank r evaluates images r, r + W, ...) and the
correct counts summed.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cure.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    atomic_save,
    atomic_write_text,
    capture_rng,
    load_checkpoint,
    restore_rng,
)
from cure.config import RESUMABLE_OVERRIDES, ConfigError, TrainConfig, default_radius
from cure.device import pin_inductor_cpu_isa, select_device
from cure.distributed import DistributedContext, all_reduce_sum_, broadcast_object
from cure.evaluation import attack_settings, nrr
from cure.layer_stats import LayerStats, write_layer_stats
from cure.methods import STEP_FUNCTIONS, StepResult, build_step_context

__all__ = [
    "TrainingError",
    "train",
    "resume_config",
    "lock_run_dir",
    "prepare_output_dir",
    "select_device",
    "results_table",
    "OUTPUT_NAMES",
    "METRIC_COLUMNS",
    "RunState",
    "apply_block_options",
]

#: What a run writes into its directory (``--overwrite`` removes exactly these).
OUTPUT_NAMES = (
    "config.json",
    "metrics.csv",
    "layer_stats.csv",
    "summary.json",
    "last.pt",
    "best.pt",
    "eval.json",
    "tensorboard",
)

METRIC_COLUMNS = (
    "epoch",
    "stage",
    "lr",
    "train_loss",
    "train_nat_acc",
    "train_adv_acc",
    "loss_ce",
    "loss_kl",
    "loss_cr",
    "rev_train_nat_acc",
    "kept_fraction",
    "skipped_steps",
    "nonfinite_scores",
    "revision_updates",
    "val_nat_acc",
    "val_pgd20_acc",
    "val_nrr",
    "rev_val_nat_acc",
    "rev_val_pgd20_acc",
    "rev_val_nrr",
    "epoch_seconds",
)
_SUM_FIELDS = ("loss", "correct_nat", "correct_adv", "skipped", "kept_fraction", "nonfinite",
               "loss_ce", "loss_kl", "loss_cr", "rev_correct_nat")
# Summed over the ranks of a data-parallel run (per-shard counts); every other field is averaged.
_COUNT_FIELDS = ("correct_nat", "correct_adv", "rev_correct_nat")


def _device_counter(section: str, *, per_epoch: bool):
    """A 0-d int64 device counter (read on the host only at log points; saved as an int)."""
    return field(default=None, metadata={"section": section, "per_epoch": per_epoch, "kind": "counter"})


def _value(default, section: str, *, per_epoch: bool = False):
    if isinstance(default, list):
        return field(default_factory=list, metadata={"section": section, "per_epoch": per_epoch})
    return field(default=default, metadata={"section": section, "per_epoch": per_epoch})


@dataclass
class RunState:
    """Where a run stands, apart from modules, optimizer, scheduler and random generators: exactly what
    a checkpoint needs to continue it bit for bit.

    Each field's metadata says which checkpoint section holds it ("progress" or "trainer", the layout
    of checkpoint format version 1) and whether it restarts with every epoch. Device tensors (the epoch
    sums and the skipped-step counters) accumulate without host synchronisation; ``sums`` is saved
    summed over the ranks of a data-parallel run, the counters as ints.
    """

    epoch: int = _value(0, "progress")  # epoch being trained (0-based)
    batch: int = _value(0, "progress")  # next batch index within that epoch
    step: int = _value(0, "progress")  # optimizer steps taken (skipped ones included)
    history: list[dict[str, Any]] = _value([], "trainer")  # one metrics row per finished epoch
    best: dict[str, Any] | None = _value(None, "trainer")  # {"epoch": 1-based, "key": [...], "row": {...}}
    total_skipped: int = _value(0, "trainer")
    train_seconds: float = _value(0.0, "trainer")
    # per epoch
    sums: Tensor | None = field(default=None, metadata={"section": "trainer", "per_epoch": True, "kind": "sums"})
    consecutive_skipped: Tensor | None = _device_counter("trainer", per_epoch=True)
    max_consecutive_skipped: Tensor | None = _device_counter("trainer", per_epoch=True)
    epoch_images: int = _value(0, "trainer", per_epoch=True)
    epoch_steps: int = _value(0, "trainer", per_epoch=True)
    epoch_revisions: int = _value(0, "trainer", per_epoch=True)
    epoch_seconds: float = _value(0.0, "trainer", per_epoch=True)
    reported_skipped: int = _value(0, "trainer", per_epoch=True)  # skipped steps already warned about
    # Per-layer statistics (cure.layer_stats): the finished epochs' rows and the current epoch's device sums
    # (created at the epoch's first step). Optional: checkpoints written before they existed lack them.
    layer_history: list[dict[str, Any]] = field(
        default_factory=list, metadata={"section": "trainer", "per_epoch": False, "optional": True}
    )
    layer_sums: Tensor | None = field(
        default=None, metadata={"section": "trainer", "per_epoch": True, "kind": "layer_sums", "optional": True}
    )

    @classmethod
    def fresh(cls, device: torch.device) -> RunState:
        state = cls()
        state.reset_epoch(device)
        return state

    def reset_epoch(self, device: torch.device) -> None:
        """Zero every per-epoch field (the device tensors on ``device``)."""
        for f in fields(self):
            if not f.metadata["per_epoch"]:
                continue
            kind = f.metadata.get("kind")
            if kind == "sums":
                value = torch.zeros(len(_SUM_FIELDS), dtype=torch.float64, device=device)
            elif kind == "counter":
                value = torch.zeros((), dtype=torch.int64, device=device)
            else:
                value = f.default
            setattr(self, f.name, value)

    def to_checkpoint(self, global_sums: Tensor) -> dict[str, dict[str, Any]]:
        """{"progress": {...}, "trainer": {...}}; ``global_sums`` replaces ``sums`` (the sums over ranks)."""
        out: dict[str, dict[str, Any]] = {"progress": {}, "trainer": {}}
        for f in fields(self):
            kind = f.metadata.get("kind")
            value = getattr(self, f.name)
            if kind == "sums":
                value = global_sums.detach().cpu()
            elif kind == "counter":
                value = int(value)
            elif kind == "layer_sums":
                value = None if value is None else value.detach().cpu()
            elif isinstance(value, (list, dict)):
                value = copy.deepcopy(value)
            out[f.metadata["section"]][f.name] = value
        return out

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], device: torch.device) -> RunState:
        """The inverse of :meth:`to_checkpoint` (the sums are the global ones; see ``_Trainer._restore``)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            section = state[f.metadata["section"]]
            if f.name not in section and f.metadata.get("optional"):
                continue  # the dataclass default
            if f.name not in section:
                raise CheckpointError(f"the checkpoint's {f.metadata['section']!r} section lacks {f.name!r}")
            value = section[f.name]
            kind = f.metadata.get("kind")
            if kind == "sums":
                value = value.to(device=device, dtype=torch.float64)
                if value.numel() < len(_SUM_FIELDS):  # written before the loss terms were summed
                    value = torch.cat([value, value.new_zeros(len(_SUM_FIELDS) - value.numel())])
            elif kind == "counter":
                value = torch.tensor(int(value), dtype=torch.int64, device=device)
            elif kind == "layer_sums":
                value = None if value is None else value.to(device=device, dtype=torch.float64)
            elif f.type in ("int", int):
                value = int(value)
            elif f.type in ("float", float):
                value = float(value)
            elif isinstance(value, list):
                value = list(value)
            values[f.name] = value
        return cls(**values)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, out of memory, inconsistent resume); the message says what to do."""


# ------------------------------------------------------------------------------------------------
# Small helpers
def derived_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed derived from ``seed`` and tags, identical in every process (unlike ``hash``)."""
    digest = hashlib.sha256(repr((seed,) + tags).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def holds_a_run(out: str | Path) -> bool:
    """``out`` holds something a new run must not silently replace: anything but what a run that never saved
    a checkpoint leaves (it failed to start, or stopped inside its first epoch: at most its configuration and
    TensorBoard events, nothing to resume)."""
    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        return True
    return any(p.name not in ("config.json", "tensorboard") and p.suffix != ".tmp" for p in out.iterdir())


def lock_run_dir(out: str | Path, *, create: bool = True) -> int | None:
    """Hold an exclusive lock on the run directory ``out`` (created empty when missing and ``create``) for as
    long as the returned descriptor stays open: a second ``cure train`` into the same directory (a rerun, a
    resume, a study driver started twice) is refused instead of interleaving its checkpoints with the first
    one's.
    The kernel drops the lock when the process ends, killed or not, so nothing stale is left behind.
    Returns None where there is nothing to lock (``out`` is a file, or missing and not ``create``:
    prepare_output_dir says what is wrong) or ``flock`` does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    out = Path(out)
    if (out.exists() and not out.is_dir()) or (not out.exists() and not create):
        return None
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"--out {out} is in use: another process is training into it (a `cure train` still running there). "
            f"Wait for it to end or stop it, then add --resume to continue its run"
        ) from None
    return fd


def prepare_output_dir(out: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Check (and for ``overwrite`` clear) the run directory before any work starts."""
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    if resume:
        if not (out / "last.pt").is_file():
            raise ConfigError(f"--resume: {out / 'last.pt'} does not exist; start the run without --resume")
        return out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite and holds_a_run(out):
            raise ConfigError(
                f"--out {out} already exists and is not empty; add --resume to continue that run "
                f"or --overwrite to replace it"
            )
        for name in OUTPUT_NAMES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for tmp in out.glob("*.tmp"):
            tmp.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _lr_factor(cfg: TrainConfig, steps_per_epoch: int):
    milestones = cfg.resolved_milestones()
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if cfg.lr_schedule == "piecewise":
            epoch = step // steps_per_epoch
            return cfg.lr_decay ** sum(epoch >= m for m in milestones)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        return 1.0

    return factor


@dataclass
class _Data:
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor


def _load_data(cfg: TrainConfig) -> _Data:
    from cure.data import deterministic_subset, load_split, train_val_split

    images, labels = load_split(cfg.dataset, cfg.data_root, train=True, download=cfg.download)
    if cfg.val_size >= len(labels):
        raise ConfigError(
            f"val_size {cfg.val_size} leaves no training images (the training split has {len(labels)})"
        )
    tr_x, tr_y, va_x, va_y = train_val_split(images, labels, cfg.val_size, seed=cfg.data_seed)
    if cfg.train_samples is not None:
        if cfg.train_samples > len(tr_y):
            raise ConfigError(
                f"train_samples {cfg.train_samples} exceeds the {len(tr_y)} training images left "
                f"after holding out {cfg.val_size} for validation"
            )
        tr_x, tr_y = deterministic_subset(tr_x, tr_y, cfg.train_samples, seed=cfg.data_seed)
    if len(tr_y) < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(tr_y)} training images")
    te_x, te_y = load_split(cfg.dataset, cfg.data_root, train=False, download=cfg.download)
    if cfg.eval_samples is not None and cfg.eval_samples < len(te_y):
        te_x, te_y = deterministic_subset(te_x, te_y, cfg.eval_samples, seed=cfg.data_seed)
    return _Data(tr_x, tr_y, va_x, va_y, te_x, te_y)


def _evaluate(
    module: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    cfg: TrainConfig,
    spec,
    eps: float,
    attacks,
    device: torch.device,
    progress: bool = False,
    dist: DistributedContext | None = None,
) -> dict[str, float]:
    """Accuracies in percent. Data-parallel: rank r evaluates images r, r + W, r + 2W, ... (its PGD random
    starts seeded by (seed, r)), and the correct counts are summed over the ranks."""
    from cure.evaluation import evaluate

    dist = DistributedContext() if dist is None else dist
    seed = cfg.seed
    if dist.enabled:
        images, labels = images[dist.rank :: dist.world_size], labels[dist.rank :: dist.world_size]
        seed = derived_seed(cfg.seed, "eval", dist.rank)
        progress = progress and dist.is_main
    was_training = module.training
    module.eval()
    try:
        if len(labels) == 0:  # more ranks than images: this rank contributes nothing
            res = dict.fromkeys(attacks, 0.0)
        else:
            res = evaluate(
                module,
                images,
                labels,
                spec=spec,
                attacks=tuple(attacks),
                batch_size=cfg.eval_batch_size,
                device=device,
                eps=eps,
                progress=progress,
                seed=seed,
                protocol=cfg.eval_protocol,
                norm=cfg.norm,
            )
    finally:
        module.train(was_training)
    if not dist.enabled:
        return res
    # percent -> counts (exact integers: count = round(percent * n / 100)), summed over the ranks.
    n = len(labels)
    counts = torch.tensor(
        [round(res[name] * n / 100.0) for name in res] + [n], dtype=torch.float64, device=device
    )
    all_reduce_sum_([counts], dist)
    total = counts[-1].item()
    return {name: 100.0 * c / total for name, c in zip(res, counts[:-1].tolist())}


def _accuracy_fields(res: dict[str, float], prefix: str = "") -> dict[str, float]:
    """{'nat': .., 'pgd20': ..} -> {prefix+'nat_acc': .., prefix+'pgd20_acc': .., prefix+'nrr': .., ...}."""
    out = {f"{prefix}{name}_acc": value for name, value in res.items()}
    if "nat" in res:
        for rob, key in (("pgd20", "nrr"), ("cw", "nrr_cw"), ("aa", "nrr_aa")):
            if rob in res:
                out[prefix + key] = nrr(res["nat"], res[rob])
    return out


def apply_block_options(module: nn.Module, cfg: TrainConfig, *, reinit: bool = True) -> None:
    """The layer study (paper section 3) on a freshly built model, after ``cfg.init`` was loaded:
    re-initialise the blocks ``cfg.reinit`` (when ``reinit``; a resumed run gets them from its checkpoint),
    then freeze the blocks ``cfg.freeze``. Block names: :func:`cure.models.model_blocks`."""
    from cure.data import DATASETS
    from cure.models import freeze_blocks, reinit_blocks

    if cfg.reinit and reinit:
        seed = derived_seed(cfg.seed, "reinit")
        reinit_blocks(module, cfg.reinit, arch=cfg.arch, spec=DATASETS[cfg.dataset], seed=seed)
    if cfg.freeze:
        freeze_blocks(module, cfg.freeze, arch=cfg.arch)


# ------------------------------------------------------------------------------------------------
class _Trainer:
    """Owns every piece of state of one run; :func:`train` drives it."""

    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        *,
        resume_state: dict | None,
        dist: DistributedContext | None = None,
        sync_bn: bool = False,
    ):
        from cure.data import DATASETS, BatchLoader
        from cure.models import build_model

        self.cfg, self.out = cfg, out
        self.dist = DistributedContext() if dist is None else dist
        self.device = select_device(cfg.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.spec = DATASETS[cfg.dataset]
        default_eps, default_step = default_radius(cfg.dataset, cfg.norm)  # L-inf or L2 (cure.config)
        self.eps = float(cfg.eps if cfg.eps is not None else default_eps)
        self.step_size = float(cfg.step_size if cfg.step_size is not None else default_step)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.seed)

        self.data = _load_data(cfg)
        self.loader = BatchLoader(
            self.data.train_x,
            self.data.train_y,
            batch_size=cfg.batch_size,
            shuffle=True,
            augment=self.spec.augment,
            device=self.device,
            drop_last=True,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.steps_per_epoch = len(self.loader)

        module = build_model(cfg.arch, self.spec)
        if cfg.init is not None and resume_state is None:
            self._load_init(module, cfg.init)
        apply_block_options(module, cfg, reinit=resume_state is None)  # layer study: --reinit, --freeze
        if sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise ConfigError(
                    "--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU implementation); drop it on CPU"
                )
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module.to(self.device)
        self.channels_last = (
            cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        )
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        self.module = module
        if cfg.compile:
            pin_inductor_cpu_isa(self.device)  # an Inductor cache bug; see its docstring
        self.model = torch.compile(module) if cfg.compile else module

        self.ctx = build_step_context(
            cfg,
            module,
            model=self.model,
            eps=self.eps,
            step_size=self.step_size,
            attack_seed=derived_seed(cfg.seed, "attack"),
            revision_seed=derived_seed(cfg.seed, "revision"),
            dist=self.dist,
        )
        self.optimizer = self.ctx.optimizer
        self.revision = self.ctx.revision
        self.attack_generator = self.ctx.attack_generator
        self.revision_generator = self.ctx.revision_generator
        self.layer_stats = LayerStats(module)  # per-layer statistics -> layer_stats.csv
        self.lr_factor = _lr_factor(cfg, self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)

        self.state = RunState.fresh(self.device)  # the loop state (all of it goes into checkpoints)
        if resume_state is not None:
            self._restore(resume_state)
        self._broadcast_weights()

    def _broadcast_weights(self) -> None:
        """Data-parallel: every rank starts from rank 0's weights and buffers (they agree already when
        built from the same seed or checkpoint; this makes it a guarantee)."""
        if not self.dist.enabled:
            return
        from torch import distributed

        modules = [self.module] + ([self.revision.module] if self.revision is not None else [])
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                distributed.broadcast(t.data, src=0)

    # --- initial weights -------------------------------------------------------------------------
    def _load_init(self, module: nn.Module, path: str) -> None:
        state = load_checkpoint(path)
        icfg = state["config"]
        if (icfg["dataset"], icfg["arch"]) != (self.cfg.dataset, self.cfg.arch):
            raise ConfigError(
                f"--init {path} holds a {icfg['arch']} trained on {icfg['dataset']}, but this run "
                f"trains a {self.cfg.arch} on {self.cfg.dataset}"
            )
        module.load_state_dict(state["model"])

    # --- state -----------------------------------------------------------------------------------
    def _global_sums(self) -> Tensor:
        """The epoch sums over all ranks (a collective in data-parallel runs: call it on every rank).

        Loss, skips, kept fraction and non-finite counts are identical on every rank (computed from
        reduced values) and are averaged, and so are the loss terms (per-shard means of equal shards); the
        correct-prediction counts are per shard and are summed.
        """
        sums = self.state.sums
        if not self.dist.enabled:
            return sums
        weights = torch.tensor(
            [1.0 if f in _COUNT_FIELDS else 1.0 / self.dist.world_size for f in _SUM_FIELDS],
            dtype=sums.dtype,
            device=sums.device,
        )
        total = sums * weights
        all_reduce_sum_([total], self.dist)
        return total

    def state_dict(self) -> dict[str, Any]:
        generators = {"attack": self.attack_generator, "revision": self.revision_generator}
        sections = self.state.to_checkpoint(self._global_sums())
        sections["progress"]["cure_step"] = self.ctx.cure_step
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": self.cfg.to_dict(),
            "model": self.module.state_dict(),
            "revision": self.revision.state_dict() if self.revision is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **sections,
            "rng": capture_rng(generators),
            "distributed": {"world_size": self.dist.world_size},
            "environment": {
                "torch": str(torch.__version__),
                "python": platform.python_version(),
                "device": str(self.device),
            },
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        if self.revision is not None:
            if state.get("revision") is None:
                raise CheckpointError("the checkpoint has no revision model, but the configuration keeps one")
            self.revision.load_state_dict(state["revision"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = RunState.from_checkpoint(state, self.device)
        self.ctx.cure_step = int(state["progress"]["cure_step"])
        restore_rng(state["rng"], {"attack": self.attack_generator, "revision": self.revision_generator})
        if self.dist.enabled and not self.dist.is_main:  # the saved counts are global: rank 0 carries them
            for i, f in enumerate(_SUM_FIELDS):
                if f in _COUNT_FIELDS:
                    self.state.sums[i] = 0
        saved_world = int(state.get("distributed", {}).get("world_size", 1))
        if saved_world != self.dist.world_size and self.dist.is_main:
            warnings.warn(
                f"resuming a run saved with world size {saved_world} on world size {self.dist.world_size}: "
                f"the global batch and the data order are the same, but the attack noise differs from an "
                f"uninterrupted run",
                RuntimeWarning,
                stacklevel=2,
            )

    def save(self, name: str) -> None:
        """Write a checkpoint (rank 0 only; every rank must call it, the epoch sums are reduced)."""
        state = self.state_dict()
        if self.dist.is_main:
            atomic_save(state, self.out / name)

    # --- stages ----------------------------------------------------------------------------------
    def stage(self, epoch: int) -> str:
        """The step of ``epoch``: "st" during the CURE-Eff warm-up epochs, else the configured method."""
        return "st" if epoch < self.cfg.warmup_epochs else self.cfg.method

    def _revision_rate(self, epoch: int) -> float:
        cfg = self.cfg
        if cfg.revision_rate_decay_epoch is not None and epoch >= cfg.revision_rate_decay_epoch:
            return cfg.revision_rate * cfg.revision_rate_decay_factor
        return cfg.revision_rate

    # --- one epoch -------------------------------------------------------------------------------
    def _record(self, result: StepResult) -> None:
        zero = result.loss.new_zeros((), dtype=torch.float64)
        values = torch.stack(
            [
                result.loss.double(),
                result.correct_nat.double(),
                result.correct_adv.double(),
                result.skipped.double(),
                result.kept_fraction.double(),
                result.nonfinite.double(),
            ]
            + [zero if t is None else t.double()
               for t in (result.loss_ce, result.loss_kl, result.loss_cr, result.rev_correct_nat)]
        )
        self.state.sums += values
        st = self.state
        st.consecutive_skipped = (st.consecutive_skipped + 1) * result.skipped.long()
        st.max_consecutive_skipped = torch.maximum(st.max_consecutive_skipped, st.consecutive_skipped)
        if st.layer_sums is None:
            st.layer_sums = self.layer_stats.zeros()
        self.layer_stats.record(st.layer_sums, result, self.ctx.masker)

    def _sync(self, bar, writer) -> dict[str, float]:
        """Read the device counters (the only host synchronisation of the loop) and act on them."""
        sums = dict(zip(_SUM_FIELDS, self._global_sums().tolist()))
        worst = int(self.state.max_consecutive_skipped)
        skipped = int(sums["skipped"])
        if skipped > self.state.reported_skipped:
            warnings.warn(
                f"epoch {self.state.epoch + 1}: skipped {skipped - self.state.reported_skipped} step(s) whose loss or "
                f"prominence scores were not finite (NaN/inf); the weights were left unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
            self.state.reported_skipped = skipped
        if worst > self.cfg.max_skipped_steps:
            raise TrainingError(
                f"training diverged: {worst} consecutive steps had a non-finite loss or non-finite "
                f"prominence scores (limit --max-skipped-steps {self.cfg.max_skipped_steps}). "
                f"The last good checkpoint is "
                f"{self.out / 'last.pt'}; lower --lr, turn off --amp, or check the data"
            )
        steps = max(self.state.epoch_steps, 1)
        live = {
            "loss": sums["loss"] / steps,
            "nat": 100.0 * sums["correct_nat"] / max(self.state.epoch_images, 1),
            "adv": 100.0 * sums["correct_adv"] / max(self.state.epoch_images, 1),
        }
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" if k == "loss" else f"{v:.1f}%" for k, v in live.items()})
        if writer is not None:
            writer.add_scalar("train_running/loss", live["loss"], self.state.step)
            writer.add_scalar("train_running/lr", self.optimizer.param_groups[0]["lr"], self.state.step)
        return sums

    def train_epoch(self, writer, stop_after_step: int | None) -> bool:
        """Train the rest of the current epoch. Returns False when stopped early by ``stop_after_step``."""
        cfg = self.cfg
        stage = self.stage(self.state.epoch)
        step_fn = STEP_FUNCTIONS[stage]
        self.ctx.revision_rate = self._revision_rate(self.state.epoch)
        if stage == "cure" and self.revision is not None and self.ctx.cure_step == 0 and self.state.batch == 0:
            self.revision.copy_from_model()  # the CURE stage starts: theta_rev = theta (after a warm-up)
        generator = torch.Generator().manual_seed(derived_seed(cfg.seed, "data", self.state.epoch))
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.state.batch,
            desc=f"epoch {self.state.epoch + 1}/{cfg.epochs} [{stage}]",
            disable=not (cfg.progress and self.dist.is_main),
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        start = time.perf_counter()
        try:
            for x, y in self.loader.epoch(generator, start_batch=self.state.batch):
                if self.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                if self.dist.enabled:  # per-rank attack noise, a function of (seed, rank, step)
                    seed = derived_seed(cfg.seed, "attack", self.dist.rank, self.state.step)
                    self.attack_generator.manual_seed(seed)
                result = step_fn(self.ctx, x, y)
                self.scheduler.step()
                self._record(result)
                self.state.batch += 1
                self.state.step += 1
                self.state.epoch_steps += 1
                self.state.epoch_images += len(y) * self.dist.world_size
                self.state.epoch_revisions += int(result.revised)
                bar.update(1)
                if self.state.step % cfg.log_every == 0:
                    self._sync(bar, writer)
                end_of_epoch = self.state.batch == self.steps_per_epoch
                if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0 and not end_of_epoch:
                    self.state.epoch_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save("last.pt")
                if stop_after_step is not None and self.state.step >= stop_after_step and not end_of_epoch:
                    return False
        finally:
            self.state.epoch_seconds += time.perf_counter() - start
            bar.close()
        return True

    def _loss_terms(self, stage: str, sums: dict[str, float]) -> dict[str, float | None]:
        """The epoch means of the loss terms (TRADES-style stages) and the revision model's accuracy on the
        training batches (CURE with a revision model); None where the stage has no such term."""
        steps = max(self.state.epoch_steps, 1)
        trades_style = stage in ("trades", "cure")
        revised = stage == "cure" and self.revision is not None
        return {
            "loss_ce": sums["loss_ce"] / steps if trades_style else None,
            "loss_kl": sums["loss_kl"] / steps if trades_style else None,
            "loss_cr": sums["loss_cr"] / steps if revised else None,
            "rev_train_nat_acc": 100.0 * sums["rev_correct_nat"] / max(self.state.epoch_images, 1) if revised else None,
        }

    def end_epoch(self, writer) -> dict[str, Any]:
        """Validation, the metrics row, TensorBoard, checkpoints. Moves on to the next epoch."""
        cfg = self.cfg
        sums = self._sync(None, None)
        stage = self.stage(self.state.epoch)
        images = max(self.state.epoch_images, 1)
        row: dict[str, Any] = {
            "epoch": self.state.epoch + 1,
            "stage": stage,
            "lr": cfg.lr * self.lr_factor(self.state.step - 1),  # the lr of the epoch's last step
            "train_loss": sums["loss"] / max(self.state.epoch_steps, 1),
            # ST steps see no adversarial examples and AT steps no natural forward pass: not measured.
            "train_nat_acc": None if stage == "at" else 100.0 * sums["correct_nat"] / images,
            "train_adv_acc": None if stage == "st" else 100.0 * sums["correct_adv"] / images,
            **self._loss_terms(stage, sums),
            "kept_fraction": sums["kept_fraction"] / max(self.state.epoch_steps, 1),
            "skipped_steps": int(sums["skipped"]),
            "nonfinite_scores": int(sums["nonfinite"]),
            "revision_updates": self.state.epoch_revisions,
        }
        val = _evaluate(
            self.module,
            self.data.val_x,
            self.data.val_y,
            cfg=cfg,
            spec=self.spec,
            eps=self.eps,
            attacks=("nat", "pgd20"),
            device=self.device,
            dist=self.dist,
        )
        row.update(
            {
                "val_nat_acc": val["nat"],
                "val_pgd20_acc": val["pgd20"],
                "val_nrr": nrr(val["nat"], val["pgd20"]),
            }
        )
        if self.revision is not None and stage == "cure":
            rval = _evaluate(
                self.revision.module,
                self.data.val_x,
                self.data.val_y,
                cfg=cfg,
                spec=self.spec,
                eps=self.eps,
                attacks=("nat", "pgd20"),
                device=self.device,
                dist=self.dist,
            )
            row.update(
                {
                    "rev_val_nat_acc": rval["nat"],
                    "rev_val_pgd20_acc": rval["pgd20"],
                    "rev_val_nrr": nrr(rval["nat"], rval["pgd20"]),
                }
            )
        row["epoch_seconds"] = self.state.epoch_seconds
        self.state.total_skipped += int(sums["skipped"])
        self.state.train_seconds += self.state.epoch_seconds
        self.state.history.append(row)
        layer_values = self.layer_stats.means(self.state.layer_sums)
        self.state.layer_history.append({"epoch": row["epoch"], "values": layer_values})
        if writer is not None and self.dist.is_main:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    writer.add_scalar(f"epoch/{key}", value, row["epoch"])
            self.layer_stats.add_scalars(writer, row["epoch"], layer_values)
            writer.flush()
        # Model selection on the validation split: PGD-20 (natural accuracy breaks ties);
        # for ST natural accuracy.
        key = [row["val_nat_acc"]] if cfg.method == "st" else [row["val_pgd20_acc"], row["val_nat_acc"]]
        improved = self.state.best is None or key > self.state.best["key"]
        if improved:
            self.state.best = {"epoch": row["epoch"], "key": key, "row": row}
        self.state.epoch += 1
        self.state.batch = 0
        self.state.reset_epoch(self.device)
        if self.dist.is_main:
            _write_metrics(self.out / "metrics.csv", self.state.history)
            write_layer_stats(self.out / "layer_stats.csv", self.layer_stats.names, self.state.layer_history)
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        return row


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(buf.getvalue(), path)


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    def pct(value) -> str:
        return "-" if value is None else f"{value:.1f}%"

    line = (
        f"epoch {row['epoch']}/{epochs} [{row['stage']}] loss {row['train_loss']:.4f} "
        + "".join(f"{name} {row[key]:.4f} " for name, key in (("ce", "loss_ce"), ("kl", "loss_kl"), ("cr", "loss_cr"))
                  if row.get(key) is not None)
        + f"train nat {pct(row['train_nat_acc'])} adv {pct(row['train_adv_acc'])} "
        + (f"rev nat {pct(row['rev_train_nat_acc'])} " if row.get("rev_train_nat_acc") is not None else "")
        + f"| val nat {row['val_nat_acc']:.2f} pgd20 {row['val_pgd20_acc']:.2f} nrr {row['val_nrr']:.2f}"
    )
    if "rev_val_nat_acc" in row:
        line += (
            f" | revision val nat {row['rev_val_nat_acc']:.2f} pgd20 {row['rev_val_pgd20_acc']:.2f} "
            f"nrr {row['rev_val_nrr']:.2f}"
        )
    line += f" | kept {100 * row['kept_fraction']:.1f}% skipped {row['skipped_steps']}"
    line += f" | {row['epoch_seconds']:.1f} s"
    return line


# ------------------------------------------------------------------------------------------------
def _final_evaluation(trainer: _Trainer) -> dict[str, Any]:
    """Test-split evaluation of the last and the best checkpoint, trained model and revision model."""
    from cure.data import DATASETS
    from cure.models import build_model

    cfg, data = trainer.cfg, trainer.data
    attacks = tuple(dict.fromkeys(("nat", "pgd20") + tuple(cfg.eval_attacks)))
    kw = dict(
        cfg=cfg,
        spec=trainer.spec,
        eps=trainer.eps,
        attacks=attacks,
        device=trainer.device,
        progress=cfg.progress,
        dist=trainer.dist,
    )
    results: dict[str, Any] = {}
    results["last"] = _evaluate(trainer.module, data.test_x, data.test_y, **kw)
    if trainer.revision is not None:
        results["rev_last"] = _evaluate(trainer.revision.module, data.test_x, data.test_y, **kw)
    best_epoch = trainer.state.best["epoch"]
    if best_epoch == len(trainer.state.history):  # the best epoch is the last one: same weights
        results["best"] = results["last"]
        if trainer.revision is not None:
            results["rev_best"] = results["rev_last"]
    else:
        state = _load_on_rank0(trainer.out / "best.pt", trainer.dist)
        model = build_model(cfg.arch, DATASETS[cfg.dataset]).to(trainer.device)
        model.load_state_dict(state["model"])
        results["best"] = _evaluate(model, data.test_x, data.test_y, **kw)
        if trainer.revision is not None:
            model.load_state_dict(state["revision"]["module"])
            results["rev_best"] = _evaluate(model, data.test_x, data.test_y, **kw)
    return results


def _load_on_rank0(path: Path, dist: DistributedContext) -> dict[str, Any]:
    """The checkpoint at ``path`` read by rank 0 and broadcast (no shared file system needed)."""
    if not dist.enabled:
        return load_checkpoint(path)
    return broadcast_object(load_checkpoint(path) if dist.is_main else None, dist)


def kernel_backends(cfg: TrainConfig, device: torch.device) -> dict[str, str]:
    """The backend each cure_kernels op runs with in this run: ``cfg.kernel_backend``, or for "auto" what it
    resolved to on ``device`` (on CUDA, the backend that passed its check against the torch backend)."""
    from cure_kernels import backends

    if cfg.kernel_backend != "auto":
        return dict.fromkeys(backends.CXX_OPS, cfg.kernel_backend)
    return backends.resolved_backends(device)


def _summary(trainer: _Trainer, results: dict[str, Any]) -> dict[str, Any]:
    cfg = trainer.cfg
    last_epoch, best_epoch = len(trainer.state.history), trainer.state.best["epoch"]
    images = cfg.epochs * trainer.steps_per_epoch * cfg.batch_size
    kept = [row["kept_fraction"] for row in trainer.state.history if row["stage"] == "cure" and cfg.uses_mask]
    summary: dict[str, Any] = {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "arch": cfg.arch,
        "epochs": cfg.epochs,
        "no_mask": cfg.no_mask,
        "no_revision": cfg.no_revision,
        "mask_mode": cfg.mask_mode,
        "revision_bn": cfg.revision_bn if cfg.uses_revision else None,
        "kernel_backends": kernel_backends(cfg, trainer.device),
        "warmup_epochs": cfg.warmup_epochs,
        "init": cfg.init,
        "reinit": list(cfg.reinit),
        "freeze": list(cfg.freeze),
        "preset": cfg.preset,
        "seed": cfg.seed,
        "norm": cfg.norm,
        "eps": trainer.eps,
        "step_size": trainer.step_size,
        "attack_steps": cfg.attack_steps,
        "beta": cfg.beta,
        "eval_protocol": cfg.eval_protocol,
        "eval_attack_settings": attack_settings(
            tuple(dict.fromkeys(("nat", "pgd20") + tuple(cfg.eval_attacks))), trainer.eps, cfg.eval_protocol
        ),
        "train_images": int(len(trainer.data.train_y)),
        "val_images": int(len(trainer.data.val_y)),
        "test_images": int(len(trainer.data.test_y)),
        "device": str(trainer.device),
        "skipped_steps": trainer.state.total_skipped,
        "train_seconds": trainer.state.train_seconds,
        "train_images_per_second": images / trainer.state.train_seconds if trainer.state.train_seconds > 0 else None,
        "selection": "validation nat acc" if cfg.method == "st" else "validation pgd20 acc",
        # Mean fraction of gradient entries the RGP mask let through in the CURE epochs (1: no masking).
        "mean_kept_fraction": statistics.fmean(kept) if kept else 1.0,
        "last_epoch": last_epoch,
        "best_epoch": best_epoch,
    }
    summary.update(_accuracy_fields(results["last"]))
    for which in ("best", "last"):
        summary.update(_accuracy_fields(results[which], prefix=f"{which}_"))
    for key in _accuracy_fields(results["last"]):
        summary[f"delta_{key}"] = summary[f"best_{key}"] - summary[f"last_{key}"]
    if "rev_last" in results:
        summary.update(_accuracy_fields(results["rev_last"], prefix="rev_"))
        for which in ("best", "last"):
            summary.update(_accuracy_fields(results[f"rev_{which}"], prefix=f"rev_{which}_"))
        for key in _accuracy_fields(results["rev_last"]):
            summary[f"rev_delta_{key}"] = summary[f"rev_best_{key}"] - summary[f"rev_last_{key}"]
    return summary


NORM_TITLES = {"linf": "L-inf", "l2": "L2"}

_TABLE_COLUMNS = (
    ("nat", "Nat"),
    ("pgd20", "PGD-20"),
    ("nrr", "NRR"),
    ("pgd100", "PGD-100"),
    ("cw", "C&W"),
    ("aa", "AA"),
)


def results_table(summary: dict[str, Any]) -> str:
    """The final table: Nat / PGD-20 / NRR [/ C&W / AA], trained and revision model, best and last epoch."""
    cols = [
        (key, title)
        for key, title in _TABLE_COLUMNS
        if f"last_{key}_acc" in summary or (key == "nrr" and "last_nrr" in summary)
    ]
    rows = [
        ("trained", "last", summary["last_epoch"], "last_"),
        ("trained", "best", summary["best_epoch"], "best_"),
    ]
    if "rev_last_nat_acc" in summary:
        rows += [
            ("revision", "last", summary["last_epoch"], "rev_last_"),
            ("revision", "best", summary["best_epoch"], "rev_best_"),
        ]
    title = (
        f"{summary['method'].upper()} on {summary['dataset']} ({summary['arch']}), "
        f"{summary['test_images']} test images, {NORM_TITLES[summary.get('norm', 'linf')]} eps "
        f"{summary['eps']:.4g}; accuracies in %"
    )
    header = f"{'model':<9} {'epoch':<10}" + "".join(f"{t:>9}" for _, t in cols)
    lines = [title, header, "-" * len(header)]
    for model, which, epoch, prefix in rows:
        cells = []
        for key, _ in cols:
            value = summary.get(f"{prefix}nrr" if key == "nrr" else f"{prefix}{key}_acc")
            cells.append(f"{value:>9.2f}" if value is not None else f"{'-':>9}")
        lines.append(f"{model:<9} {which + ' (' + str(epoch) + ')':<10}" + "".join(cells))
    lines.append(
        f"best = highest {summary['selection']} (epoch {summary['best_epoch']}); "
        f"best - last PGD-20: {summary.get('delta_pgd20_acc', float('nan')):+.2f}"
    )
    if summary.get("mean_kept_fraction", 1.0) < 1.0:
        lines.append(f"RGP mask: kept {100 * summary['mean_kept_fraction']:.1f} % of the gradient entries "
                     f"(mean over the CURE epochs)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
def resume_config(
    out: str | Path, explicit: dict[str, Any] | None = None, *, state: dict[str, Any] | None = None
) -> TrainConfig:
    """The saved configuration of the run in ``out``, with ``explicit`` values applied.

    Only the fields in :data:`cure.config.RESUMABLE_OVERRIDES` (device, data root, progress bars, checkpoint
    and log intervals) may differ from the saved values; anything else would not be the same run. The one
    exception is ``epochs``, which may grow: that extends the run (also a finished one); milestones
    that were not given explicitly are recomputed for the new length (the trainer says so).
    """
    out = Path(out)
    if state is None:
        state = load_checkpoint(out / "last.pt")
    saved_dict = dict(state["config"])
    # Runs saved before the option existed kept the revision model in eval mode with averaged statistics.
    saved_dict.setdefault("revision_bn", "ema")
    saved = TrainConfig.from_dict(saved_dict)
    explicit = {k: v for k, v in (explicit or {}).items() if v is not None and k != "preset"}
    saved_values = saved.to_dict()
    changed = {}
    for key, value in explicit.items():
        if key not in saved_values:
            raise ConfigError(f"unknown configuration field {key!r}")
        if key in RESUMABLE_OVERRIDES:
            setattr(saved, key, value)
        elif key == "epochs" and value != saved.epochs:
            if value < saved.epochs:
                raise ConfigError(f"--resume --epochs {value}: the run in {out} was configured for {saved.epochs} "
                                  f"epochs; a resumed run can be extended, not shortened")
            saved.epochs = value
        elif (list(value) if isinstance(value, tuple) else value) != saved_values[key]:
            changed[key] = (saved_values[key], value)
    if changed:
        detail = ", ".join(f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ConfigError(
            f"--resume continues the run in {out} with its saved configuration; these values differ "
            f"from it: {detail}. Drop them, or start a new run with --overwrite"
        )
    return saved.validate()


def train(
    cfg: TrainConfig | None,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_step: int | None = None,
    echo: bool = True,
    sync_bn: bool = False,
) -> dict[str, Any] | None:
    """Train (or resume) a run in ``out`` and return its summary.

    Args:
        cfg: the configuration (validated here). With ``resume`` it may be None (use the saved one); if
            given, it must agree with the saved one except for :data:`cure.config.RESUMABLE_OVERRIDES`.
        out: the run directory.
        resume: continue from ``out/last.pt`` exactly (mid-epoch too).
        overwrite: replace the outputs of an earlier run in ``out``.
        stop_after_step: stop after this many optimizer steps, right after saving ``last.pt`` (as if the
            process had been killed then); returns None. For tests of exact resume.
        echo: print per-epoch lines and the final table to stdout (rank 0 only).
        sync_bn: data-parallel runs on CUDA: convert BatchNorm layers to ``SyncBatchNorm`` (batch
            statistics over the global batch). Not part of the saved configuration: pass it again on resume.

    Data-parallel: when started by ``torchrun`` (WORLD_SIZE > 1) the process group is created here
    (NCCL on CUDA, gloo on CPU) and destroyed at the end; rank 0 prepares ``out`` and writes every file.
    """
    from cure import distributed

    out = Path(out)
    if cfg is None and not resume:
        raise ConfigError("a configuration is needed for a new run")
    if not resume:
        cfg.check_starting_point()
    created = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    device = cfg.device if cfg is not None else "auto"
    if cfg is None and (out / "config.json").is_file():  # resume: the saved device picks the backend
        device = json.loads((out / "config.json").read_text()).get("device", "auto")
    dist = distributed.setup(device)
    try:
        return _train(cfg, out, resume, overwrite, stop_after_step, echo and dist.is_main, sync_bn, dist)
    finally:
        distributed.teardown(dist, created=created)


def _train(cfg, out, resume, overwrite, stop_after_step, echo, sync_bn, dist: DistributedContext):
    error, lock = None, None
    if dist.is_main:  # rank 0 locks, checks and prepares the directory; the others learn whether that worked
        try:
            lock = lock_run_dir(out, create=not resume)
            prepare_output_dir(out, resume=resume, overwrite=overwrite)
        except ConfigError as exc:
            error = str(exc)
    try:
        error = broadcast_object(error, dist)
        if error is not None:
            raise ConfigError(error)
        return _train_locked(cfg, out, resume, stop_after_step, echo, sync_bn, dist)
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


def _train_locked(cfg, out, resume, stop_after_step, echo, sync_bn, dist: DistributedContext):
    state = None
    if resume:
        state = broadcast_object(load_checkpoint(out / "last.pt") if dist.is_main else None, dist)
        saved_epochs = int(state["config"]["epochs"])
        cfg = resume_config(out, None if cfg is None else cfg.to_dict(), state=state)
        finished = int(state["progress"]["epoch"]) >= cfg.epochs
        if finished and (out / "summary.json").is_file():
            if echo:
                print(f"[cure] {out} has finished its {cfg.epochs} epochs; nothing to do (pass --epochs N with "
                      f"N > {cfg.epochs} to extend it)", flush=True)
            return json.loads((out / "summary.json").read_text())
        if cfg.epochs != saved_epochs and echo:
            schedule = (f"lr milestones now at epochs {list(cfg.resolved_milestones())} (0-based)"
                        if cfg.lr_schedule == "piecewise" else f"the {cfg.lr_schedule} schedule now spans them")
            print(f"[cure] extending {out} from {saved_epochs} to {cfg.epochs} epochs; {schedule}", flush=True)
    else:
        cfg.validate()
    select_device(cfg.device)
    if cfg.init is not None and state is None and not Path(cfg.init).is_file():
        raise ConfigError(
            f"--init {cfg.init} does not exist (expected a checkpoint such as DIR/last.pt of "
            f"`cure train --method st`)"
        )
    try:
        # Data, model and --init load first: a run that cannot start leaves nothing in ``out`` (a rerun
        # with the problem fixed needs neither --resume nor --overwrite).
        trainer = _Trainer(cfg, out, resume_state=state, dist=dist, sync_bn=sync_bn)
        if dist.is_main:
            atomic_write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", out / "config.json")
        writer = None
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(
                log_dir=str(out / "tensorboard"), purge_step=trainer.state.step if resume else None
            )
        try:
            if echo:
                print(
                    f"[cure] {cfg.method} on {cfg.dataset} ({cfg.arch}), "
                    f"{len(trainer.data.train_y)} training "
                    f"images, {trainer.steps_per_epoch} steps/epoch, {cfg.epochs} epochs, device "
                    f"{trainer.device}"
                    + (f", {dist.world_size} processes" if dist.enabled else "")
                    + (f", revision model BatchNorm '{cfg.revision_bn}'" if cfg.uses_revision else "")
                    + (f", resuming at epoch {trainer.state.epoch + 1} batch {trainer.state.batch}" if resume else ""),
                    flush=True,
                )
                if cfg.method == "cure":
                    ops = kernel_backends(cfg, trainer.device)
                    print("[cure] kernels: " + ", ".join(f"{op} {name}" for op, name in ops.items()), flush=True)
            while trainer.state.epoch < cfg.epochs:
                if trainer.state.batch < trainer.steps_per_epoch:
                    if not trainer.train_epoch(writer, stop_after_step):
                        trainer.save("last.pt")
                        return None
                row = trainer.end_epoch(writer)
                if echo:
                    print(_epoch_line(row, cfg.epochs), flush=True)
                if stop_after_step is not None and trainer.state.step >= stop_after_step:
                    return None
            results = _final_evaluation(trainer)
        finally:
            if writer is not None:
                writer.close()
    except torch.cuda.OutOfMemoryError as exc:
        raise TrainingError(
            f"CUDA ran out of memory with --batch-size {cfg.batch_size} ({cfg.arch}, "
            f"{'bf16 autocast' if cfg.amp else 'float32'}); try --batch-size "
            f"{max(cfg.batch_size // 2, 1)}, or --amp"
        ) from exc
    summary = _summary(trainer, results)
    if dist.is_main:
        atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    if echo:
        print(results_table(summary), flush=True)
    return summary
