"""Every hyper-parameter of a training run, the published presets they come from, and their checks.

A run is described by one :class:`TrainConfig`. Values are layered: the dataclass defaults, then a
preset (the paper's Table 9 for its (dataset, architecture) pairs, our own for Fashion-MNIST), then
whatever the user sets explicitly. :func:`resolve_config` does the layering and :meth:`TrainConfig.validate`
checks the result before any work starts, with errors that name the field and the value.

Sources of the published values:

* **paper Table 9** -- learning rate 0.1, 200 epochs, revision rate r = 0.2, revision decay d = 0.999,
  and per (architecture, dataset) the conserved fraction p, the score weight alpha and the consistency
  weight gamma.
* **paper text** -- weight decay 5e-3.
* **beta** (the weight of the KL term) is a property of the method, not of a (dataset, architecture)
  preset: :data:`METHOD_BETA` holds one value per method with its source and :func:`resolve_config`
  applies it for every dataset. CURE: 5, the official trainer's ``--trades_beta`` default, which it passes
  to its CURE and its TRADES losses (``utilities/args.py``, ``utilities/train.py``); the ``beta=1.0`` of
  the loss functions in ``train_util/adversarial_loss.py`` is a default argument the trainer never uses.
  The paper's Table 7 row "neither RGP nor revision" equals its TRADES row (82.41 / 52.76 / 48.37), a
  TRADES result of beta near 5-6, not 1. TRADES: 6 (Zhang et al. 2019 on CIFAR-10; the official CURE
  code ran its TRADES baseline with 5). Fashion-MNIST gets the same per-method values: nothing documents
  another choice for it (the TRADES authors' MNIST script defaults to 1.0, but that is MNIST at eps 0.3
  with their small CNN, not our setting).
* **docs/method.md** (our statement of the method) -- the CIFAR threat model eps = 8/255, eta = eps/4,
  K = 10 attack steps, SGD with momentum 0.9.
* **official README** (github NeurAI-Lab/CURE) -- batch size 128 and a second parameter block with
  weight decay 7e-4 and 120 epochs (our ``official-readme`` variants).
* **official code** -- the learning-rate schedule: step decay by 0.1 at epochs 100 and 150 (its
  ``--epoch_step`` default; its README's ``scheduler: 'None'`` selects exactly this step decay), i.e. at
  50 % and 75 % of the paper's 200 epochs. Neither docs/method.md nor the paper names a schedule, so we
  take the official code's ("piecewise"). When ``epochs`` is set explicitly and ``lr_milestones`` is
  not, the preset's milestones are scaled to the same fractions of the new epoch count (100 and 150 of
  200 become 25 and 37 of 50). "cosine" is available as an alternative.
* **MART** (Wang et al., ICLR 2020, "Improving adversarial robustness requires revisiting misclassified
  examples") -- beta = 6, the value of its CIFAR-10 experiments and the default of ``mart_loss`` in the
  authors' released code (github YisenWang/MART, mart.py); applied to ``--method mart`` unless beta is set
  explicitly (:data:`METHOD_BETA`).
* **L2 threat model** (``norm="l2"``, :data:`L2_RADII`) -- the official CURE code has an L2 attack
  (``--distance l_2``) but no L2 radius of its own (its ``--epsilon`` default 0.031 is the L-inf one), so
  for 32x32 RGB data we take the RobustBench / TRADES convention eps = 0.5; for Fashion-MNIST we choose
  eps = 1.5 (the L2 radii used for 28x28 grayscale digits and clothes lie between 1.5 and 2.0; the smaller
  end because Fashion-MNIST is the harder of the two). The step is eps / 4 as for L-inf. They replace a
  preset's L-inf eps and step size unless those are set explicitly.

Every resolved value has a source ("default", a method default, a preset name or "command line");
:func:`resolve_config_with_sources` returns them and ``cure train --print-config`` prints them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

# The threat model's defaults live with the attacks, the evaluation protocols with the evaluation; both
# are re-exported here for the configuration's users (neither module imports this one).
from cure.attacks import L2_RADII, default_radius
from cure.evaluation import EVAL_PROTOCOLS

__all__ = [
    "METHODS",
    "MASK_MODES",
    "REVISION_BN_MODES",
    "LR_SCHEDULES",
    "DEVICES",
    "EVAL_PROTOCOLS",
    "METHOD_BETA",
    "PRESETS",
    "Preset",
    "ConfigError",
    "L2_RADII",
    "TrainConfig",
    "default_preset_name",
    "default_radius",
    "resolve_config",
    "resolve_config_with_sources",
    "scale_milestones",
]

METHODS = ("st", "at", "trades", "cure", "mart")
MASK_MODES = ("grad", "update")
#: BatchNorm of the revision model (cure.revision): "batch" (the official code's; default) or "ema".
REVISION_BN_MODES = ("batch", "ema")
LR_SCHEDULES = ("piecewise", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")

#: beta, the weight of the KL term, per method: (value, source). :func:`resolve_config` sets it for the
#: run's method on every dataset unless beta is given explicitly; a method without a row keeps the
#: dataclass default (ST and AT have no KL term). A new method with a KL-type term adds its row here.
METHOD_BETA: dict[str, tuple[float, str]] = {
    "cure": (
        5.0,
        "official code: --trades_beta default 5, passed to its CURE loss (utilities/args.py, "
        "utilities/train.py); beta=1.0 is only an unused default argument of its loss functions",
    ),
    "trades": (
        6.0,
        "Zhang et al. 2019, CIFAR-10 (1/lambda = 6); the official CURE code trained TRADES with 5",
    ),
    "mart": (6.0, "Wang et al. 2020, CIFAR-10 (beta = 6)"),
}
#: Fields a resumed run may change: they do not alter what is computed, only where and how it is reported.
RESUMABLE_OVERRIDES = frozenset(
    {"device", "data_root", "download", "progress", "checkpoint_every", "log_every"}
)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


@dataclass
class TrainConfig:
    """One training run. Accuracies are reported in percent; fractions live in [0, 1]."""

    # --- what to train
    method: str = "cure"  # st (natural), at (Madry), trades, cure, mart (Wang et al. 2020)
    dataset: str = "fashion-mnist"
    arch: str = "cnn"
    preset: str | None = None  # name of the preset the defaults came from (recorded; see PRESETS)
    # --- optimisation (SGD, momentum 0.9, no Nesterov)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "piecewise"  # piecewise: x lr_decay at each milestone; cosine: to 0 over all steps
    # epochs (0-based) where the lr drops; None: 50 % and 75 %. A preset's milestones are scaled with epochs.
    lr_milestones: tuple[int, ...] | None = None
    lr_decay: float = 0.1
    # --- threat model and inner maximisation (None: the dataset's usual values)
    eps: float | None = None  # radius of the norm ball, inputs in [0, 1]
    step_size: float | None = None  # PGD step eta
    attack_steps: int = 10  # K
    norm: str = "linf"  # threat model of training and evaluation: linf or l2 (defaults in L2_RADII)
    # --- losses
    beta: float = 5.0  # TRADES / CURE KL weight (Eq. 5); resolve_config sets METHOD_BETA[method]
    gamma: float = 1.0  # consistency weight of L_CR (Eq. 8)
    # --- conserve: Robust Gradient Prominence (Eq. 6)
    alpha: float = 0.1  # weight of |dL_nat/dw| in the score
    p: float = 0.3  # conserved fraction per tensor
    mask_mode: str = "grad"  # grad: mask the gradient (official); update: also freeze momentum and decay
    no_mask: bool = False  # ablation: no RGP masking (and no extra backward passes)
    # --- revise (Eq. 7)
    revision_rate: float = 0.2  # r: probability of an EMA update per step
    revision_decay: float = 0.999  # d; warmed up as d_t = min(1 - 1/(t + 1), d)
    revision_rate_decay_epoch: int | None = None  # from this epoch (0-based) on, r is multiplied by ...
    revision_rate_decay_factor: float = 0.5  # ... this factor (the paper decays r late in training)
    no_revision: bool = False  # ablation: no L_CR and no revision model
    # BatchNorm of the revision model: "batch" (the official code: L_CR targets in train mode, EMA over the
    # parameters, its own running statistics) or "ema" (targets in eval mode, statistics averaged; departs)
    revision_bn: str = "batch"
    # --- natural pre-training
    init: str | None = None  # checkpoint (e.g. DIR/last.pt of `cure train --method st`) to start from
    warmup_epochs: int = 0  # CURE-Eff: the first N epochs are natural training, inside `epochs`
    from_scratch: bool = False  # CURE from random weights on purpose (no init, no warm-up)
    # --- layer study (paper section 3): block names of cure.models.model_blocks, applied after `init`
    reinit: tuple[str, ...] = ()  # blocks returned to a fresh initialisation before training
    freeze: tuple[str, ...] = ()  # blocks left out of training (requires_grad False, not in the optimizer)
    # --- data
    data_root: str = "data"
    download: bool = False
    train_samples: int | None = (
        None  # deterministic subset of the training split (after the validation split)
    )
    val_size: int = 1000  # images held out of the training split for model selection
    eval_samples: int | None = None  # deterministic subset of the test split for the final evaluation
    data_seed: int = 0  # seed of the validation split and of the subsets (the same for every training seed)
    # --- evaluation
    eval_attacks: tuple[str, ...] = ("nat", "pgd20")
    eval_batch_size: int = 256
    eval_protocol: str = "ours"  # attack settings of validation and test evaluation, see EVAL_PROTOCOLS
    # --- run
    seed: int = 0
    device: str = "auto"
    amp: bool = False  # bfloat16 autocast for the forward passes (losses and softmax stay float32)
    compile: bool = False  # torch.compile the model
    channels_last: bool | None = None  # None: on for CUDA, off for CPU
    kernel_backend: str = "auto"  # cure_kernels backend for masking and revision
    checkpoint_every: int = 0  # also save last.pt every N optimizer steps (0: at epoch ends only)
    log_every: int = 20  # steps between host synchronisations for progress, TensorBoard and fault checks
    max_skipped_steps: int = 20  # stop when more consecutive steps than this had to be skipped
    progress: bool = True  # tqdm progress bars

    # ------------------------------------------------------------------------------------------
    def resolved_milestones(self) -> tuple[int, ...]:
        """Epochs at which the piecewise schedule multiplies the learning rate by ``lr_decay``."""
        if self.lr_milestones is not None:
            return tuple(self.lr_milestones)
        return tuple(sorted({self.epochs // 2, (3 * self.epochs) // 4} - {0}))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown configuration field(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        for key in ("lr_milestones", "eval_attacks", "reinit", "freeze"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def validate(self) -> TrainConfig:
        """Check every value; raise :class:`ConfigError` naming the first bad field. Returns self."""
        from cure.attacks import NORMS
        from cure.data import DATASETS
        from cure.evaluation import ATTACKS
        from cure.models import ARCHS

        _choice("method", self.method, METHODS)
        _choice("dataset", self.dataset, tuple(DATASETS))
        _choice("arch", self.arch, tuple(ARCHS))
        _choice("norm", self.norm, NORMS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("mask_mode", self.mask_mode, MASK_MODES)
        _choice("device", self.device, DEVICES)
        _choice("kernel_backend", self.kernel_backend, ("auto", "reference", "cpu", "triton", "cuda", "torch"))
        _choice("eval_protocol", self.eval_protocol, EVAL_PROTOCOLS)
        if self.preset is not None:
            _choice("preset", self.preset, tuple(PRESETS))
        _int("epochs", self.epochs, low=1)
        _int("batch_size", self.batch_size, low=1)
        _positive("lr", self.lr)
        _fraction("momentum", self.momentum, upper_open=True)
        _nonneg("weight_decay", self.weight_decay)
        _fraction("lr_decay", self.lr_decay)
        if self.lr_milestones is not None:
            for m in self.lr_milestones:
                _int("lr_milestones", m, low=1)
            if list(self.lr_milestones) != sorted(set(self.lr_milestones)):
                raise ConfigError(
                    f"lr_milestones must be strictly increasing, got {list(self.lr_milestones)}"
                )
        if self.eps is not None:
            _fraction("eps", self.eps) if self.norm == "linf" else _positive("eps", self.eps)
        if self.step_size is not None:
            _positive("step_size", self.step_size)
            if self.step_size > 1 and self.norm == "linf":
                raise ConfigError(
                    f"step_size must be at most 1 (inputs are in [0, 1]), got {self.step_size!r}"
                )
        _int("attack_steps", self.attack_steps, low=1)
        _nonneg("beta", self.beta)
        _nonneg("gamma", self.gamma)
        _fraction("alpha", self.alpha)
        _fraction("p", self.p)
        _fraction("revision_rate", self.revision_rate)
        _fraction("revision_decay", self.revision_decay)
        if self.revision_rate_decay_epoch is not None:
            _int("revision_rate_decay_epoch", self.revision_rate_decay_epoch, low=0)
        _fraction("revision_rate_decay_factor", self.revision_rate_decay_factor)
        _choice("revision_bn", self.revision_bn, REVISION_BN_MODES)
        _int("warmup_epochs", self.warmup_epochs, low=0)
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(
                f"warmup_epochs must be smaller than epochs ({self.epochs}), got {self.warmup_epochs}"
            )
        if self.warmup_epochs and self.method == "st":
            raise ConfigError(
                "warmup_epochs is a natural warm-up before adversarial training; it makes no sense "
                "with method 'st'"
            )
        if self.init is not None and not isinstance(self.init, str):
            raise ConfigError(f"init must be a path, got {self.init!r}")
        if not isinstance(self.from_scratch, bool):
            raise ConfigError(f"from_scratch must be true or false, got {self.from_scratch!r}")
        if self.from_scratch and self.init is not None:
            raise ConfigError(
                f"from_scratch (start from random weights) contradicts init {self.init!r}; drop one of them"
            )
        if self.train_samples is not None:
            _int("train_samples", self.train_samples, low=1)
        _int("val_size", self.val_size, low=1)
        if self.eval_samples is not None:
            _int("eval_samples", self.eval_samples, low=1)
        _int("data_seed", self.data_seed, low=0)
        _check_blocks(self)
        if not self.eval_attacks:
            raise ConfigError("eval_attacks must name at least one attack, e.g. nat,pgd20")
        for name in self.eval_attacks:
            _choice("eval_attacks", name, tuple(ATTACKS))
        _int("eval_batch_size", self.eval_batch_size, low=1)
        _int("seed", self.seed, low=0)
        _int("checkpoint_every", self.checkpoint_every, low=0)
        _int("log_every", self.log_every, low=1)
        _int("max_skipped_steps", self.max_skipped_steps, low=0)
        return self

    def check_starting_point(self) -> None:
        """CURE continues from a naturally trained network (the paper's and the official code's setting).

        A fresh CURE run needs ``init`` (a checkpoint of a natural run), ``warmup_epochs`` (CURE-Eff: the
        first epochs are natural training) or an explicit ``from_scratch``; otherwise raise
        :class:`ConfigError` saying how to get a natural checkpoint. Not part of :meth:`validate`, which
        also checks resumed runs and step-level configurations.
        """
        if self.method != "cure" or self.init is not None or self.warmup_epochs > 0 or self.from_scratch:
            return
        raise ConfigError(
            "method 'cure' starts from a naturally trained network, but neither --init nor --warmup-epochs "
            f"was given. Train one first: `cure train --method st --dataset {self.dataset} --arch "
            f"{self.arch} --out runs/st`, then pass --init runs/st/last.pt; or add --warmup-epochs N "
            "(CURE-Eff: the first N epochs are natural training); or --from-scratch to start CURE from "
            "random weights on purpose"
        )

    # Convenience views used by the trainer ------------------------------------------------------
    @property
    def uses_mask(self) -> bool:
        """RGP masking runs (CURE without the no-mask ablation)."""
        return self.method == "cure" and not self.no_mask

    @property
    def uses_revision(self) -> bool:
        """A revision model is kept (CURE without the no-revision ablation)."""
        return self.method == "cure" and not self.no_revision


# ------------------------------------------------------------------------------------------------
# Presets
@dataclass(frozen=True)
class Preset:
    """Default values for one (dataset, architecture) setting and where each value comes from."""

    dataset: str
    arch: str
    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    description: str = ""


_CIFAR_EPS = 8 / 255
_PAPER_COMMON = {
    "lr": 0.1,
    "epochs": 200,
    "batch_size": 128,
    "weight_decay": 5e-3,
    "momentum": 0.9,
    "lr_schedule": "piecewise",
    "lr_milestones": (100, 150),
    "lr_decay": 0.1,
    "eps": _CIFAR_EPS,
    "step_size": _CIFAR_EPS / 4,
    "attack_steps": 10,
    "revision_rate": 0.2,
    "revision_decay": 0.999,
}
_PAPER_SOURCES = {
    "lr": "paper Table 9",
    "epochs": "paper Table 9",
    "revision_rate": "paper Table 9",
    "revision_decay": "paper Table 9",
    "p": "paper Table 9",
    "alpha": "paper Table 9",
    "gamma": "paper Table 9",
    "weight_decay": "paper text (5e-3)",
    "eps": "docs/method.md, the paper's CIFAR threat model (8/255)",
    "step_size": "docs/method.md (eta = eps/4 = 2/255)",
    "attack_steps": "docs/method.md (K = 10)",
    "batch_size": "official README (128)",
    "momentum": "docs/method.md and official code (SGD, momentum 0.9)",
    "lr_schedule": "official code (step decay by 0.1; neither docs/method.md nor the paper gives one)",
    "lr_milestones": "official code (--epoch_step default 100 150); scaled to the same fractions of --epochs",
    "lr_decay": "official code (0.1)",
}


def _paper(dataset: str, arch: str, p: float, alpha: float, gamma: float) -> Preset:
    return Preset(
        dataset,
        arch,
        {**_PAPER_COMMON, "p": p, "alpha": alpha, "gamma": gamma},
        dict(_PAPER_SOURCES),
        f"paper Table 9: {arch} on {dataset}",
    )


def _official_readme(dataset: str, arch: str, p: float, alpha: float, gamma: float) -> Preset:
    base = _paper(dataset, arch, p, alpha, gamma)
    values = {**base.values, "epochs": 120, "weight_decay": 7e-4, "lr_milestones": (100,)}
    sources = {
        **base.sources,
        "epochs": "official README parameter block (120)",
        "weight_decay": "official README parameter block (7e-4)",
        "lr_milestones": "official code (--epoch_step default 100 150; only 100 lies within 120 epochs); "
        "scaled to the same fraction of --epochs",
    }
    return Preset(dataset, arch, values, sources, f"official README parameter block: {arch} on {dataset}")


_FASHION_SOURCES = {
    k: "ours (Fashion-MNIST is not in the paper)"
    for k in (
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "eps",
        "step_size",
        "attack_steps",
        "p",
        "alpha",
        "gamma",
        "lr_schedule",
        "val_size",
    )
}
_FASHION_SOURCES.update(
    {
        "eps": "ours: the usual Fashion-MNIST L-inf radius 0.1",
        "revision_rate": "paper Table 9",
        "revision_decay": "paper Table 9",
    }
)

PRESETS: dict[str, Preset] = {
    "paper-cifar10-resnet18": _paper("cifar10", "resnet18", 0.30, 0.1, 1.0),
    "paper-cifar100-resnet18": _paper("cifar100", "resnet18", 0.30, 0.1, 1.0),
    "paper-svhn-resnet18": _paper("svhn", "resnet18", 0.30, 0.2, 1.0),
    "paper-cifar10-wrn-34-10": _paper("cifar10", "wrn-34-10", 0.50, 0.3, 0.5),
    "paper-cifar100-wrn-34-10": _paper("cifar100", "wrn-34-10", 0.50, 0.3, 0.5),
    "paper-cifar10-preact-resnet18": _paper("cifar10", "preact-resnet18", 0.20, 0.2, 1.0),
    "official-readme-cifar10-resnet18": _official_readme("cifar10", "resnet18", 0.30, 0.1, 1.0),
    "fashion-mnist-cnn": Preset(
        "fashion-mnist",
        "cnn",
        {
            "epochs": 10,
            "batch_size": 128,
            "lr": 0.05,
            "weight_decay": 5e-4,
            "eps": 0.1,
            "step_size": 0.025,
            "attack_steps": 10,
            "p": 0.3,
            "alpha": 0.1,
            "gamma": 1.0,
            "revision_rate": 0.2,
            "revision_decay": 0.999,
            "lr_schedule": "piecewise",
            "val_size": 1000,
        },
        _FASHION_SOURCES,
        "ours: small CNN on Fashion-MNIST, L-inf eps 0.1, eta 0.025, K 10 (runs on a CPU)",
    ),
}


def default_preset_name(dataset: str, arch: str) -> str | None:
    """The preset used when none is named: the paper's for (dataset, arch), else ours for Fashion-MNIST."""
    for name, preset in PRESETS.items():
        if name.startswith(("paper-", "fashion-")) and preset.dataset == dataset and preset.arch == arch:
            return name
    return None


def scale_milestones(milestones: tuple[int, ...], preset_epochs: int, epochs: int) -> tuple[int, ...]:
    """A preset's lr milestones moved to the same fractions of ``epochs`` (rounded down).

    Milestones that land on epoch 0 or on the same epoch as another are dropped, so a very short run may
    keep fewer drops (an empty tuple: a constant learning rate). ``scale_milestones((100, 150), 200, 50)``
    is ``(25, 37)``, the same epochs as the dataclass default of 50 % and 75 %.
    """
    if preset_epochs < 1:
        raise ConfigError(f"preset_epochs must be at least 1, got {preset_epochs}")
    return tuple(sorted({m * epochs // preset_epochs for m in milestones} - {0}))


def resolve_config(overrides: dict[str, Any], preset: str | None = "auto") -> TrainConfig:
    """Layer dataclass defaults, a preset, the method's defaults and explicit ``overrides``; validate.

    ``preset`` is a name from :data:`PRESETS`, "auto" (the preset for the requested dataset and arch,
    if there is one) or None (no preset). The method's beta (:data:`METHOD_BETA`) applies in every case.
    When ``epochs`` is given and ``lr_milestones`` is not, the preset's milestones are scaled to the new
    epoch count (:func:`scale_milestones`). Explicit overrides always win.
    """
    return resolve_config_with_sources(overrides, preset)[0]


def resolve_config_with_sources(
    overrides: dict[str, Any], preset: str | None = "auto"
) -> tuple[TrainConfig, dict[str, str]]:
    """:func:`resolve_config`, plus the source of every field: "default" (the dataclass), "default for
    method M" (:data:`METHOD_BETA`), the preset's name (with a note when its milestones were scaled) or
    "command line" (an explicit override)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown configuration field(s) {unknown}")
    sources = {name: "default" for name in known}
    base = TrainConfig()
    dataset = overrides.get("dataset", base.dataset)
    arch = overrides.get("arch", base.arch)
    method = overrides.get("method", base.method)
    named = preset not in (None, "auto")
    if preset == "auto":
        preset = default_preset_name(dataset, arch)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        chosen = PRESETS[preset]
        if (chosen.dataset, chosen.arch) != (dataset, arch):
            raise ConfigError(
                f"preset {preset!r} is for {chosen.arch} on {chosen.dataset}, but the run trains "
                f"{arch} on {dataset}; name the dataset and arch of the preset or another preset"
            )
        values.update(chosen.values)
        sources.update(dict.fromkeys(chosen.values, preset))
        values["preset"] = preset
        sources["preset"] = "command line" if named else f"default for {arch} on {dataset}"
        milestones = chosen.values.get("lr_milestones")
        epochs = overrides.get("epochs")
        if (
            milestones is not None
            and "lr_milestones" not in overrides
            and isinstance(epochs, int)
            and not isinstance(epochs, bool)
            and epochs >= 1
            and epochs != chosen.values["epochs"]
        ):
            values["lr_milestones"] = scale_milestones(tuple(milestones), chosen.values["epochs"], epochs)
            sources["lr_milestones"] = (
                f"{preset} ({', '.join(map(str, milestones))} of {chosen.values['epochs']} epochs, "
                f"scaled to {epochs})"
            )
    if method in METHOD_BETA:
        values["beta"] = METHOD_BETA[method][0]
        sources["beta"] = f"default for method {method}"
    values.update(overrides)
    sources.update(dict.fromkeys(overrides, "command line"))
    values.setdefault("dataset", dataset)
    values.setdefault("arch", arch)
    _norm_defaults(values, overrides, sources)
    cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})
    return cfg.validate(), sources


def _norm_defaults(values: dict[str, Any], overrides: dict[str, Any], sources: dict[str, str]) -> None:
    """For ``norm="l2"``, the L2 radius and step (:data:`L2_RADII`) in place of a preset's L-inf ones;
    explicit overrides always win."""
    if values.get("norm", TrainConfig.norm) == "l2" and values["dataset"] in L2_RADII:
        eps, _ = default_radius(values["dataset"], "l2")
        if "eps" not in overrides:
            values["eps"] = eps
            sources["eps"] = f"L2 radius for {values['dataset']} (L2_RADII)"
        if "step_size" not in overrides:
            values["step_size"] = values["eps"] / 4
            sources["step_size"] = "eps / 4"


def _check_blocks(cfg: TrainConfig) -> None:
    """freeze / reinit name blocks of the (already checked) architecture, and something is left to train."""
    from cure.models import block_names, check_block_names

    if not (cfg.freeze or cfg.reinit):
        return
    for option in ("reinit", "freeze"):
        names = getattr(cfg, option)
        if isinstance(names, str) or not isinstance(names, (tuple, list)):
            raise ConfigError(f"{option} must be a list of block names, got {names!r}")
        try:
            check_block_names(cfg.arch, names, option)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    if set(cfg.freeze) == set(block_names(cfg.arch)):
        raise ConfigError(
            f"freeze names every block of {cfg.arch} ({', '.join(cfg.freeze)}): nothing would be trained; "
            f"leave at least one block out of --freeze"
        )


# ------------------------------------------------------------------------------------------------
# Checks
def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _int(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> None:
    if _number(name, value) <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


def _nonneg(name: str, value: Any) -> None:
    if _number(name, value) < 0:
        raise ConfigError(f"{name} must be non-negative, got {value!r}")


def _fraction(name: str, value: Any, *, upper_open: bool = False) -> None:
    v = _number(name, value)
    if not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"{name} must lie in {interval}, got {value!r}")
