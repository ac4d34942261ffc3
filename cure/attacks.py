"""White-box attacks for training and evaluation: PGD (cross-entropy or C&W margin) and TRADES' KL attack.

    x_adv = pgd(model, x, y, eps=8/255, step_size=2/255, steps=20)                 # L-inf PGD-20 on CE
    x_adv = trades_pgd(model, x, eps=8/255, step_size=2/255, steps=10)             # CURE's Eq. 4
    x_adv = mart_pgd(model, x, y, eps=0.5, step_size=0.125, steps=10, norm="l2")    # MART's attack, L2

Common contract:

* the result is detached, lies in the eps-ball around x (L-inf: |x_adv - x| <= eps elementwise; L2:
  ||x_adv - x||_2 <= eps per sample) and in [0, 1];
* the model runs in eval mode during the attack and gets its previous mode back afterwards;
* gradients are taken with ``torch.autograd.grad`` with respect to the input only, so nothing is
  accumulated into the parameters' ``.grad``;
* losses and softmaxes are computed in float32 (``logits.float()``), also under bfloat16 autocast;
* no host synchronisation inside the step loop (no ``.item()``, no data-dependent Python control flow),
  so the loop can run ahead of the GPU and be captured;
* random starts are drawn from ``generator`` (on its own device, then moved), so an attack is a
  deterministic function of the generator state.

Update rules, with g the gradient of the loss with respect to x_adv:
  L-inf: x_adv <- clip_[0,1](proj_{||. - x||_inf <= eps}(x_adv + step_size * sign(g)))
  L2:    x_adv <- clip_[0,1](proj_{||. - x||_2 <= eps}(x_adv + step_size * g / ||g||_2))
where the L2 projection rescales delta = x_adv - x by min(1, eps / ||delta||_2) per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NORMS", "LOSSES", "L2_RADII", "default_radius", "pgd", "trades_pgd", "mart_pgd", "margin_loss"]

NORMS = ("linf", "l2")
LOSSES = ("ce", "cw")
_TINY = 1e-12  # keeps per-sample L2 norms of all-zero gradients or perturbations away from 0


def _check(eps: float, step_size: float, steps: int, norm: str) -> None:
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if not (isinstance(step_size, (int, float)) and step_size >= 0):
        raise ValueError(f"step_size must be a number >= 0, got {step_size!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def margin_loss(logits: Tensor, y: Tensor, kappa: float | None = None) -> Tensor:
    """C&W margin per sample: max_{j != y} z_j - z_y (positive iff the sample is misclassified), float32.

    With ``kappa`` the margin is clamped from above, min(margin, kappa): samples misclassified by more
    than kappa contribute no gradient (Carlini & Wagner's confidence; the official CURE evaluation uses
    kappa = 50 as -max(z_y - max_{j != y} z_j + kappa, 0), which differs from this by the constant kappa).
    """
    z = logits.float()
    z_true = z.gather(1, y[:, None]).squeeze(1)
    # scatter rather than one_hot: one_hot validates the labels with a host read on some devices.
    z_other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    margin = z_other - z_true
    return margin if kappa is None else margin.clamp(max=kappa)


def _per_sample_norm(t: Tensor) -> Tensor:
    """||t_i||_2 per sample, shaped to broadcast against t."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def _box(x: Tensor, eps: float, norm: str) -> tuple[Tensor, Tensor] | None:
    """For L-inf, the per-coordinate bounds of (eps-ball around x) intersected with [0, 1]."""
    if norm != "linf":
        return None
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str, box: tuple[Tensor, Tensor] | None) -> Tensor:
    """Projection onto the eps-ball around x intersected with [0, 1].

    L-inf: one clamp to [max(x - eps, 0), min(x + eps, 1)] (the ball and the box are both products of
    intervals, so this is the exact projection). L2: rescale delta = x_adv - x to norm <= eps, then clip
    to [0, 1] (which only shrinks |delta| coordinatewise, so the result stays in the ball).
    """
    if box is not None:
        return torch.clamp(x_adv, min=box[0], max=box[1])
    delta = x_adv - x
    delta = delta * torch.clamp(eps / (_per_sample_norm(delta) + _TINY), max=1.0)
    return (x + delta).clamp_(0.0, 1.0)


def _ascent(x_adv: Tensor, grad: Tensor, step_size: float, norm: str) -> Tensor:
    if norm == "linf":
        return x_adv + step_size * grad.sign()
    return x_adv + step_size * grad / (_per_sample_norm(grad) + _TINY)


def _draw(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, kind: str
) -> Tensor:
    """Uniform [0, 1) or standard normal float32 noise from ``generator`` (on its device), moved to device."""
    source = device if generator is None else generator.device
    fn = torch.rand if kind == "uniform" else torch.randn
    return fn(shape, generator=generator, device=source, dtype=torch.float32).to(device, non_blocking=True)


def _noise_like(x: Tensor, generator: torch.Generator | None, kind: str) -> Tensor:
    """Noise shaped and laid out like x (channels_last stays channels_last)."""
    return torch.empty_like(x, dtype=torch.float32).copy_(_draw(tuple(x.shape), generator, x.device, kind))


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """A random point of the eps-ball: uniform per coordinate (L-inf); a uniformly drawn direction
    (normalised Gaussian) times a radius drawn uniformly from [0, eps] (L2)."""
    if norm == "linf":
        return x + (2.0 * _noise_like(x, generator, "uniform") - 1.0) * eps
    direction = _noise_like(x, generator, "normal")
    direction = direction / (_per_sample_norm(direction) + _TINY)
    radius = _draw((x.shape[0],), generator, x.device, "uniform").view(-1, *([1] * (x.dim() - 1)))
    return x + direction * (radius * eps)


class _EvalMode:
    """Puts a module in eval mode and restores its previous mode on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    loss: str = "ce",
    random_start: bool | str = True,
    generator: torch.Generator | None = None,
    kappa: float | None = None,
    clip_start: bool = True,
) -> Tensor:
    """Projected gradient ascent on ``loss`` inside the ``norm`` ball of radius ``eps`` around x.

    Maximises, summed over the batch, either the cross-entropy CE(f(x_adv), y) (``loss="ce"``, Madry et
    al. 2018) or the C&W margin max_{j != y} z_j - z_y (``loss="cw"``, Carlini & Wagner 2017; clamped
    at ``kappa`` when given), for ``steps`` steps of the update in the module docstring, from a random
    point of the ball (``random_start``) or from x itself.

    Args:
        model: maps inputs in [0, 1] to logits.
        x: clean inputs in [0, 1]; y: int64 labels.
        eps: radius of the ball; step_size: ascent step; steps: number of steps (0: just the start).
        norm: "linf" or "l2"; loss: "ce" or "cw".
        random_start: True: start from a uniformly drawn point of the ball (L-inf) or a random L2
            perturbation; "gaussian": from x + 0.001 * N(0, I) (MART's and TRADES' start); False: from x.
        generator: source of the random start (default: the global generator of x's device).
        kappa: C&W confidence, only with ``loss="cw"``: the objective is min(margin, kappa).
        clip_start: project the random start onto [0, 1] before the first gradient (default). False
            takes the first gradient at the raw start x + noise, which may leave [0, 1], as the official
            CURE evaluation does; every later iterate, and the result, is projected either way.

    Returns:
        x_adv, detached, in the ball and in [0, 1], with x's dtype and memory format.
    """
    _check(eps, step_size, steps, norm)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if kappa is not None:
        if loss != "cw":
            raise ValueError(f"kappa (the C&W confidence) needs loss='cw', got loss={loss!r}")
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not kappa >= 0:
            raise ValueError(f"kappa must be a number >= 0 or None, got {kappa!r}")
    if y.shape != x.shape[:1]:
        raise ValueError(
            f"y must hold one label per input: x has {x.shape[0]} inputs, y has shape {tuple(y.shape)}"
        )
    x = x.detach()
    y = y.detach()
    with _EvalMode(model), torch.enable_grad():
        box = _box(x, eps, norm)
        if random_start == "gaussian":
            x_adv = x + 0.001 * _noise_like(x, generator, "normal")
        elif random_start:
            x_adv = _random_start(x, eps, norm, generator)
        else:
            x_adv = x.clone()
        if clip_start or steps == 0:
            x_adv = _project(x_adv, x, eps, norm, box)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            logits = model(x_adv)
            if loss == "ce":
                objective = F.cross_entropy(logits.float(), y, reduction="sum")
            else:
                objective = margin_loss(logits, y, kappa).sum()
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = _project(_ascent(x_adv.detach(), grad, step_size, norm), x, eps, norm, box)
    return x_adv.detach().to(x.dtype)


def trades_pgd(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    generator: torch.Generator | None = None,
) -> Tensor:
    """TRADES' inner maximisation (Zhang et al. 2019), CURE's Eq. 4.

    x_adv maximises KL(p(x) || p(x_adv)) = sum_c p_c(x) (log p_c(x) - log p_c(x_adv)) (batchmean), p the
    softmax of the logits in float32; p(x) is computed once, without gradient, in eval mode. Start:
    x + 0.001 * N(0, I) (projected onto the ball and [0, 1]); then ``steps`` ascent steps (signed gradient
    for L-inf, normalised gradient for L2) each followed by the projection.

    Returns:
        x_adv, detached, in the eps-ball around x and in [0, 1].
    """
    _check(eps, step_size, steps, norm)
    x = x.detach()
    with _EvalMode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x).float(), dim=1)
        box = _box(x, eps, norm)
        x_adv = _project(x + 0.001 * _noise_like(x, generator, "normal"), x, eps, norm, box)
        with torch.enable_grad():
            for _ in range(steps):
                x_adv = x_adv.detach().requires_grad_(True)
                log_p_adv = F.log_softmax(model(x_adv).float(), dim=1)
                objective = F.kl_div(log_p_adv, p_nat, reduction="batchmean")
                (grad,) = torch.autograd.grad(objective, x_adv)
                x_adv = _project(_ascent(x_adv.detach(), grad, step_size, norm), x, eps, norm, box)
    return x_adv.detach().to(x.dtype)


def mart_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    generator: torch.Generator | None = None,
) -> Tensor:
    """MART's inner maximisation (Wang et al. 2020, as in the authors' released code): PGD on the
    cross-entropy CE(f(x'), y) from the start x + 0.001 * N(0, I) (projected onto the ball and [0, 1]), then
    ``steps`` ascent steps (signed gradient for L-inf, normalised gradient for L2) each followed by the
    projection. The model is in eval mode, as in :func:`pgd`.

    Returns:
        x_adv, detached, in the eps-ball around x and in [0, 1].
    """
    return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, loss="ce",
               random_start="gaussian", generator=generator)


#: L2 radius per dataset (inputs in [0, 1]) when norm is "l2" and eps is not given; step eps / 4.
#: 32x32 RGB: the RobustBench / TRADES L2 convention 0.5; Fashion-MNIST: our choice 1.5 (module docstring).
L2_RADII: dict[str, float] = {"cifar10": 0.5, "cifar100": 0.5, "svhn": 0.5, "fashion-mnist": 1.5}


def default_radius(dataset: str, norm: str) -> tuple[float, float]:
    """(eps, step size) of the dataset's usual threat model in ``norm``: the L-inf ones of
    :data:`cure.data.DATASETS`, or :data:`L2_RADII` with step eps / 4."""
    from cure.data import DATASETS

    if norm == "l2":
        eps = L2_RADII[dataset]
        return eps, eps / 4
    spec = DATASETS[dataset]
    return spec.eps, spec.step_size
