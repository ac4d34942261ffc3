"""Natural and robust accuracy of a model under the attacks the paper reports.

    res = evaluate(model, images, labels, spec=DATASETS["cifar10"], attacks=("nat", "pgd20", "aa"),
                   device="cuda")
    res  # {"nat": 86.1, "pgd20": 54.3, "aa": 49.2}  (percent)
    nrr(res["nat"], res["pgd20"])

Attacks (all in the ``norm`` ball, L-inf by default or L2, of radius ``eps``, default the dataset's usual
one: 8/255 L-inf for CIFAR and SVHN, see :func:`cure.config.default_radius` for L2), under protocol "ours"
(the default):

* ``nat``: no attack.
* ``pgd20`` / ``pgd100``: PGD on the cross-entropy, 20 / 100 steps of size eps/4 (2/255 at 8/255), from a
  uniform random start in the ball.
* ``cw``: PGD-30 on the C&W margin loss max_{j != y} z_j - z_y, step size eps/4, random start.
* ``aa``: AutoAttack, version 'standard' (APGD-CE, APGD-T, FAB-T, Square; Croce & Hein 2020), run with
  the original authors' code (PyPI package ``pyautoattack``), norm 'Linf' or 'L2'.

Protocol "official" reproduces the official CURE evaluation (its ``test.py`` calls
``eval_adv_robustness`` of ``utilities/adv_utils.py`` with eps 8/255, 20 steps, step 0.003, random start):

* ``pgd20``: 20 steps of 0.003 (an absolute step, whatever eps is) on the cross-entropy, from x plus
  uniform noise in [-eps, eps] that is *not* clipped to [0, 1] before the first gradient (their code
  clips only after each step);
* ``cw``: their ``cnw`` attack: the same loop on the margin clamped at kappa = 50, i.e. the objective
  min(max_{j != y} z_j - z_y, 50) (their loss -max(z_y - max_{j != y} z_j + 50, 0) up to a constant);
* ``pgd100``: 100 such steps (their code has no PGD-100; this is its PGD-20 run longer);
* ``nat`` and ``aa``: as above.

At eps 8/255 twenty steps of 0.003 cover 0.06, about 1.9 eps. On Fashion-MNIST (eps 0.1) the official
step would still be 0.003 -- their code takes the step as given, whatever eps is -- so the twenty steps
cover only 0.6 eps and the attack relies on its random start to reach the boundary; that is what the
protocol measures there.

The PGD-type attacks run batch by batch with counts kept on the device (one host read at the end). The
random starts come from a generator seeded with ``seed``, so results are reproducible. AutoAttack
seeds the global generators itself; the global RNG state is saved before and restored after it, so an
evaluation does not perturb the caller's random stream.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cure.attacks import pgd
from cure.data import DatasetSpec

__all__ = [
    "ATTACKS",
    "PGD_STEPS",
    "CW_STEPS",
    "OFFICIAL_STEP_SIZE",
    "OFFICIAL_CW_STEPS",
    "OFFICIAL_CW_KAPPA",
    "AA_CHUNK_BATCHES",
    "EVAL_PROTOCOLS",
    "nrr",
    "attack_settings",
    "evaluate",
]

ATTACKS = ("nat", "pgd20", "pgd100", "cw", "aa")
#: How the attacks of the evaluation are run: "ours" (PGD-20 in 20 steps of eps/4, C&W in 30 steps of
#: eps/4 on the unclamped margin) or "official" (the official code's test.py and utilities/adv_utils.py:
#: steps of 0.003, C&W margin clamped at kappa = 50, 20 steps each).
EVAL_PROTOCOLS = ("ours", "official")
PGD_STEPS = {"pgd20": 20, "pgd100": 100}
CW_STEPS = 30
#: The official evaluation (test.py, utilities/adv_utils.py): absolute step, C&W steps and confidence.
OFFICIAL_STEP_SIZE = 0.003
OFFICIAL_CW_STEPS = 20
OFFICIAL_CW_KAPPA = 50.0
#: AutoAttack runs on chunks of this many evaluation batches (one progress-bar tick per chunk); inside a
#: chunk it re-packs the still-robust samples into full batches after each of its attacks.
AA_CHUNK_BATCHES = 8


def nrr(nat: float, rob: float) -> float:
    """Natural-robustness ratio, the harmonic mean NRR = 2 Nat Rob / (Nat + Rob); 0 when both are 0."""
    if nat + rob == 0:
        return 0.0
    return 2.0 * nat * rob / (nat + rob)


def attack_settings(attacks: Sequence[str], eps: float, protocol: str = "ours") -> dict[str, dict]:
    """How each PGD-type attack of ``attacks`` runs at radius ``eps`` under ``protocol``: the keyword
    arguments of :func:`cure.attacks.pgd` beyond the model and data (recorded in summary.json/eval.json).
    "nat" and "aa" have no such settings and are left out."""
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(map(repr, EVAL_PROTOCOLS))}, got {protocol!r}")
    official = protocol == "official"
    out: dict[str, dict] = {}
    for name in attacks:
        if name not in ("pgd20", "pgd100", "cw"):
            continue
        cw = name == "cw"
        if official:
            steps = OFFICIAL_CW_STEPS if cw else PGD_STEPS[name]
        else:
            steps = CW_STEPS if cw else PGD_STEPS[name]
        out[name] = {
            "eps": float(eps),
            "step_size": OFFICIAL_STEP_SIZE if official else float(eps) / 4,
            "steps": steps,
            "loss": "cw" if cw else "ce",
            "kappa": OFFICIAL_CW_KAPPA if (cw and official) else None,
            "random_start": True,
            "clip_start": not official,
        }
    return out


def _to_unit(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = images.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _uses_channels_last(model: nn.Module) -> bool:
    """True when the model's first 4-d parameter (a conv weight) is stored channels_last."""
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def _autoattack(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float,
    batch_size: int,
    device: torch.device,
    seed: int,
    channels_last: bool,
    progress: bool,
    norm: str = "linf",
) -> Tensor:
    """Number of samples (a device tensor) AutoAttack 'standard' (L-inf or L2, ``eps``) fails to flip."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:  # pragma: no cover - installed with the "train" extra
        raise ImportError(
            "the 'aa' attack needs the original AutoAttack code: pip install pyautoattack"
        ) from exc

    aa_norm = {"linf": "Linf", "l2": "L2"}[norm]
    adversary = AutoAttack(model, norm=aa_norm, eps=float(eps), version="standard", seed=seed, device=device)
    chunk = batch_size * AA_CHUNK_BATCHES
    robust = torch.zeros((), dtype=torch.int64, device=device)
    devices = [device] if device.type == "cuda" else []
    n = len(labels)
    with (
        torch.random.fork_rng(devices=devices),
        tqdm(total=n, desc="eval aa", unit="img", disable=not progress, leave=False, file=sys.stderr) as bar,
    ):
        for lo in range(0, n, chunk):
            x = _to_unit(images[lo : lo + chunk], device, channels_last)
            y = labels[lo : lo + chunk].to(device, dtype=torch.int64)
            # y_adv: the model's prediction on the returned points (clean prediction where AA gave up).
            _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
            robust += (y_adv == y).sum()
            bar.update(len(y))
    return robust


def evaluate(
    model: nn.Module,
    images_uint8: Tensor,
    labels: Tensor,
    *,
    spec: DatasetSpec,
    attacks: Sequence[str],
    batch_size: int = 256,
    device: torch.device | str,
    eps: float | None = None,
    progress: bool = True,
    seed: int = 0,
    protocol: str = "ours",
    norm: str = "linf",
) -> dict[str, float]:
    """Accuracy in percent of ``model`` on (images, labels) under each of ``attacks``.

    Args:
        model: inputs in [0, 1] -> logits; put in eval mode for the evaluation (its previous mode is
            restored at the end).
        images_uint8: (N, C, H, W) uint8 images (float images in [0, 1] are accepted too), any device.
        labels: (N,) int64.
        spec: the dataset (its ``eps`` is the default radius).
        attacks: names from :data:`ATTACKS`: "nat", "pgd20", "pgd100" (PGD-20/100 on CE, step eps/4,
            random start), "cw" (PGD-30 on the C&W margin, step eps/4, random start), "aa" (AutoAttack
            standard, L-inf).
        batch_size: images per forward/attack batch.
        device: where the model lives and the attacks run.
        eps: radius of the ``norm`` ball; default the dataset's usual one (``spec.eps`` for L-inf).
        progress: show a tqdm bar.
        seed: seeds the PGD random starts and AutoAttack.
        protocol: "ours" or "official" (the official code's step 0.003 and clamped C&W margin; see the
            module docstring and :func:`attack_settings`).
        norm: "linf" or "l2" (L2: normalised-gradient PGD steps and AutoAttack's 'L2' version).

    Returns:
        {attack: accuracy in percent} in the order of ``attacks``.
    """
    attacks = tuple(attacks)
    for name in attacks:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks lists a name twice: {attacks}")
    if images_uint8.dim() != 4 or images_uint8.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images must be (N, C, H, W) with one label each; got images {tuple(images_uint8.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    if tuple(images_uint8.shape[1:]) != tuple(spec.shape):
        raise ValueError(
            f"images have shape {tuple(images_uint8.shape[1:])} but {spec.name} expects {spec.shape}"
        )
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("evaluate needs at least one image, got 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if eps is None:
        from cure.attacks import default_radius

        eps = default_radius(spec.name, norm)[0] if norm == "l2" else spec.eps
    eps = float(eps)
    if norm == "linf" and not 0 <= eps <= 1:
        raise ValueError(f"eps must lie in [0, 1], got {eps}")
    if norm == "l2" and not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if norm == "l2" and protocol == "official":
        raise ValueError("protocol 'official' reproduces the official L-inf evaluation; use protocol 'ours' "
                         "with norm 'l2'")
    settings = attack_settings(attacks, eps, protocol)
    device = torch.device(device)
    channels_last = _uses_channels_last(model)

    was_training = model.training
    model.eval()
    try:
        correct = {name: torch.zeros((), dtype=torch.int64, device=device) for name in attacks}
        batched = [name for name in attacks if name != "aa"]
        if batched:
            generator = torch.Generator(device=device).manual_seed(seed)
            n_batches = -(-n // batch_size)
            desc = "eval " + ",".join(batched)
            for lo in tqdm(
                range(0, n, batch_size),
                total=n_batches,
                desc=desc,
                disable=not progress,
                leave=False,
                file=sys.stderr,
            ):
                x = _to_unit(images_uint8[lo : lo + batch_size], device, channels_last)
                y = labels[lo : lo + batch_size].to(device, dtype=torch.int64)
                for name in batched:
                    if name == "nat":
                        x_eval = x
                    else:
                        x_eval = pgd(model, x, y, norm=norm, generator=generator, **settings[name])
                    with torch.no_grad():
                        correct[name] += (model(x_eval).argmax(dim=1) == y).sum()
        if "aa" in attacks:
            correct["aa"] = _autoattack(
                model,
                images_uint8,
                labels,
                eps=eps,
                batch_size=batch_size,
                device=device,
                seed=seed,
                channels_last=channels_last,
                progress=progress,
                norm=norm,
            )
        counts = torch.stack([correct[name] for name in attacks]).tolist()  # the one host read
    finally:
        model.train(was_training)
    return {name: 100.0 * count / n for name, count in zip(attacks, counts)}


# ------------------------------------------------------------------------------------------------
# Natural corruptions (CIFAR-10-C's 15 types, see cure.corruptions)
__all__ += ["evaluate_corruptions"]


@torch.no_grad()
def evaluate_corruptions(
    model: nn.Module,
    images_uint8: Tensor,
    labels: Tensor,
    *,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    corruptions: Sequence[str] | None = None,
    batch_size: int = 256,
    device: torch.device | str,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Accuracy in percent of ``model`` on ``images_uint8`` under each common corruption and severity.

    Each batch is corrupted on the CPU (:func:`cure.corruptions.corrupt`, image i seeded with (seed, type,
    severity, i), so the result does not depend on ``batch_size``) and classified on ``device``.

    Returns:
        {"corruption_acc": mean over types and severities,
         "corruptions": {type: mean over severities},
         "corruptions_by_severity": {type: {severity (str): accuracy}},
         "severities": [...]}
    """
    from cure.corruptions import CORRUPTIONS, SEVERITIES, corrupt

    names = tuple(CORRUPTIONS if corruptions is None else corruptions)
    for name in names:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    severities = tuple(severities)
    if not severities or any(s not in SEVERITIES for s in severities) or len(set(severities)) != len(severities):
        raise ValueError(f"severities must be distinct values from {SEVERITIES}, got {severities}")
    if images_uint8.dim() != 4 or images_uint8.shape[0] != labels.shape[0] or labels.shape[0] == 0:
        raise ValueError(
            f"images must be (N, C, H, W) with N >= 1 and one label each; got images "
            f"{tuple(images_uint8.shape)} and labels {tuple(labels.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device)
    channels_last = _uses_channels_last(model)
    n = int(labels.shape[0])
    correct = torch.zeros(len(names), len(severities), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        with tqdm(
            total=len(names) * len(severities) * n,
            desc="eval corruptions",
            unit="img",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        ) as bar:
            for lo in range(0, n, batch_size):
                x = images_uint8[lo : lo + batch_size].cpu()
                y = labels[lo : lo + batch_size].to(device, dtype=torch.int64)
                for i, name in enumerate(names):
                    for j, sev in enumerate(severities):
                        xc = _to_unit(corrupt(x, name, sev, seed=seed, start_index=lo), device, channels_last)
                        correct[i, j] += (model(xc).argmax(dim=1) == y).sum()
                        bar.update(len(y))
        acc = (100.0 * correct.double() / n).tolist()  # the one host read
    finally:
        model.train(was_training)
    per_type = {name: sum(row) / len(row) for name, row in zip(names, acc)}
    by_severity = {name: {str(s): a for s, a in zip(severities, row)} for name, row in zip(names, acc)}
    return {
        "corruption_acc": sum(per_type.values()) / len(per_type),
        "corruptions": per_type,
        "corruptions_by_severity": by_severity,
        "severities": list(severities),
    }
