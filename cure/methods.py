"""One training step per method: ST, AT (Madry), TRADES, MART and CURE (with its ablations).

Notation: f is the network (logits), p(x) = softmax(f(x)), CE the cross-entropy, and
KL(q || p) = sum_c q_c (log q_c - log p_c), averaged over the batch ("batchmean"). Softmax, KL and CE
are computed in float32 even when the forward passes run under bfloat16 autocast.

* **st** (natural training):       L = CE(f(x), y)
* **at** (Madry et al.):            x_adv = PGD-CE(x) from a uniform random start;  L = CE(f(x_adv), y)
* **trades** (Zhang et al.):        x_adv = argmax KL(p(x) || p(x')) (K signed steps from x + 0.001 N(0, I));
  L = CE(f(x), y) + beta * KL(p(x) || p(x_adv))
* **mart** (Wang et al., ICLR 2020):  x_adv = PGD-CE(x) from x + 0.001 N(0, I) (the authors' code);
  L = CE(f(x_adv), y) - log(1 - max_{k != y} p_k(x_adv))
      + beta * mean_i KL(p(x_i) || p(x_adv_i)) * (1 - p_y(x_i))   (see :func:`mart_loss`)
* **cure** (docs/method.md, paper Eqs. 4-8), with theta_rev the revision model:
  x_adv as in TRADES (Eq. 4); L_adv = CE(f(x), y) + beta * KL(p(x) || p(x_adv)) (Eq. 5);
  L_CR = KL(p_rev(x) || p(x)) + KL(p_rev(x_adv) || p(x_adv)) (Eq. 8); L = L_adv + gamma * L_CR.
  The Robust Gradient Prominence s = alpha |dL_nat/dw| + (1 - alpha) |dL_rob/dw| (Eq. 6), with
  L_nat = CE(f(x), y) and L_rob = CE(f(x_adv), y), zeroes the entries of dL/dw below each tensor's
  p-quantile (conserve), SGD applies the rest (update), and with probability r the revision model moves
  towards the new weights (revise, Eq. 7).

How CURE gets its three gradients: three backward passes over one graph. ``L_nat.backward`` and
``L_rob.backward`` (``retain_graph=True``) only traverse the natural and the adversarial branch
respectively, and ``L.backward`` traverses both, so a step costs four branch-backwards where TRADES needs
two. That is the minimum: the cotangents of L at the two logits differ from those of L_nat and L_rob, so
no gradient can be recovered from another by linearity. ``ProminenceMasker.capture`` routes the first two
passes into flat buffers so masking is one kernel launch over all tensors. The no-mask ablation skips both
extra passes.

The parameter update of a CURE step with a mask is one op: :func:`cure_kernels.rgp_sgd_step_` masks
dL/dw (conserve), applies SGD with momentum and weight decay (update) and, on steps whose draw selects a
revision, moves the revision model's parameters towards the new weights (revise), in one call over all
parameters. ``torch.optim.SGD`` still owns the state: the op reads lr, momentum and weight decay from its
param group at that step (so the lr scheduler works unchanged) and updates its momentum buffers in
place (so checkpoints and resume are unchanged). The buffers are created as zeros up front, and with a
zero buffer the op's first step gives buf = momentum * 0 + d = d, which is what PyTorch's first step
copies in. Mask mode "update" freezes the whole update of a conserved entry inside the same op. The
revision draw u and the warmed-up decay d_t are taken before the op (in ``--revision-bn ema`` the
revision model's BatchNorm statistics follow in a small separate update after it). ST, AT, TRADES and
the no-mask ablation step with ``torch.optim.SGD(fused=True)`` (the ablation has no prominence gradients
to give the op, and the fused SGD is already one multi-tensor kernel); its revision runs through
:func:`cure_kernels.revise_`.

Overlap on CUDA: the selection half of that op (every tensor's threshold, from the captured natural and
adversarial gradients only) does not depend on the last backward pass. A single-process CUDA run with a
fast kernel backend (:func:`overlaps_selection`) therefore queues :func:`cure_kernels.rgp_select` on a side
stream right after the adversarial backward pass, runs ``loss.backward()`` on the current stream meanwhile,
waits for the side stream, and calls ``rgp_sgd_step_(..., thresholds=, nonfinite=)``, which runs the apply
pass alone: the same bits as the one call (:func:`_start_selection` explains the stream ordering and the
allocator). On CPU and in data-parallel runs the step makes the one call.

Faults without host synchronisation: every step computes a device flag ``bad`` (the loss is not finite,
or the mask saw NaN/inf scores). The fused SGD kernel reads the ``found_inf`` tensor on the device and
:func:`cure_kernels.rgp_sgd_step_` its ``skip`` tensor (it also skips on its own when a score is not
finite); either leaves parameters and momentum untouched, so a bad step is skipped without the host ever
looking at the flag. The model's buffers (BatchNorm statistics) are restored with ``where(bad, old, new)``
for the same reason. The revision draw and update of a skipped step still happen (towards the unchanged
weights), which keeps t and the random stream independent of faults. The trainer reads the counts every
``log_every`` steps.

Data-parallel runs (``ctx.dist.world_size`` > 1, see :mod:`cure.distributed`): the attack and every
forward and backward pass run on the unwrapped module, locally on the rank's shard; after the last
backward pass one packed all-reduce per dtype averages the natural, adversarial and update gradients,
the BatchNorm buffers and the loss, so the skip decision, the masks (computed from the averaged
gradients) and the SGD step are the same on every rank. The revision draw comes from a CPU generator
seeded identically on every rank.

The revision model gives its consistency targets in train mode (BatchNorm with the batch's statistics,
as the official code does), under ``no_grad``; its EMA covers the parameters, and its running statistics
move only through those forward passes (restored, like the model's, on a skipped step; averaged over the
ranks of a data-parallel run). ``--revision-bn ema`` keeps the earlier eval-mode design (see
:mod:`cure.revision`).

Every TRADES-style step also returns its loss terms (``loss_ce`` = CE(f(x), y), ``loss_kl`` = beta * KL,
``loss_cr`` = gamma * L_CR) and the revision model's correct predictions on x, as device tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cure.attacks import mart_pgd, pgd, trades_pgd
from cure.config import TrainConfig
from cure.distributed import DistributedContext, all_reduce_mean_
from cure.revision import RevisionModel
from cure_kernels import MaskStats, ProminenceMasker, backends, rgp_select, rgp_sgd_step_

__all__ = [
    "build_step_context",
    "overlaps_selection",
    "StepContext",
    "StepResult",
    "STEP_FUNCTIONS",
    "kl_divergence",
    "trades_loss",
    "consistency_loss",
    "cure_loss",
    "natural_step",
    "madry_step",
    "trades_step",
    "cure_step",
    "mart_loss",
    "mart_step",
]


def kl_divergence(target_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(target_logits) || softmax(logits)), summed over classes, mean over the batch, in float32.

    Gradients flow into both arguments unless the caller detaches one.
    """
    return F.kl_div(
        F.log_softmax(logits.float(), dim=1),
        F.log_softmax(target_logits.float(), dim=1),
        reduction="batchmean",
        log_target=True,
    )


@dataclass
class StepContext:
    """Everything a step needs. ``model`` is what is called for forward passes (possibly a
    ``torch.compile`` wrapper of ``module``); ``module`` owns the parameters."""

    cfg: TrainConfig
    model: Callable[[Tensor], Tensor]
    module: nn.Module
    optimizer: torch.optim.SGD
    eps: float
    step_size: float
    attack_generator: torch.Generator  # on the training device: attack noise and random starts
    revision_generator: torch.Generator  # on the CPU: the draws u ~ U(0, 1) of the revision stage
    found_inf: Tensor  # float32 scalar on the device, read by the fused SGD kernel (1: skip the step)
    masker: ProminenceMasker | None = None
    revision: RevisionModel | None = None
    revision_forward: Callable[[Tensor], Tensor] | None = None  # forward of revision.module (maybe compiled)
    amp: bool = False
    cure_step: int = 0  # t: steps taken in the CURE stage so far
    revision_rate: float = 0.2  # current r (the trainer lowers it late in training if configured)
    dist: DistributedContext = field(default_factory=DistributedContext)  # world size 1: no collectives
    # Run the mask's selection on a side CUDA stream during the last backward pass where that is possible
    # (see overlaps_selection); False keeps the one-call path everywhere (it gives the same bits).
    overlap_selection: bool = True
    _param_numel: int = field(default=0, init=False)
    _selection_stream: torch.cuda.Stream | None = field(default=None, init=False)  # created on first use

    def __post_init__(self) -> None:
        self._param_numel = sum(q.numel() for q in self.module.parameters() if q.requires_grad)
        self.optimizer.found_inf = self.found_inf  # the fused SGD kernel skips the step when this is 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast for forward passes when ``amp`` is on (a no-op context otherwise)."""
        device_type = self.found_inf.device.type
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.amp)

    def zero_grad(self) -> None:
        """Clear the update gradients before a step's backward passes."""
        if self.masker is not None:
            self.masker.zero_grad()  # keeps every .grad a view of the masker's flat buffer
        else:
            self.optimizer.zero_grad(set_to_none=True)


@dataclass
class StepResult:
    """Device tensors describing one step (read by the trainer only every ``log_every`` steps)."""

    loss: Tensor  # the minimised loss (float32 scalar, detached)
    correct_nat: Tensor  # correct predictions on x (0 for at, which has no natural forward pass)
    correct_adv: Tensor  # correct predictions on x_adv (0 for st)
    skipped: Tensor  # bool scalar: the update was not applied (non-finite loss or scores)
    kept_fraction: Tensor  # fraction of gradient entries the mask kept (1 without masking)
    nonfinite: Tensor  # non-finite prominence scores (0 without masking)
    revised: bool = False  # the revision model was updated this step
    mask_stats: MaskStats | None = None  # per-tensor thresholds, kept and non-finite counts (CURE with a mask)
    # Loss terms of TRADES-style steps (None where the method has no such term), detached float32 scalars.
    loss_ce: Tensor | None = None  # CE(f(x), y)
    loss_kl: Tensor | None = None  # beta * KL(p(x) || p(x_adv))
    loss_cr: Tensor | None = None  # gamma * L_CR (CURE with a revision model)
    rev_correct_nat: Tensor | None = None  # the revision model's correct predictions on x (from its target pass)


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(dim=1) == y).sum()


def _train_mode(ctx: StepContext) -> list[Tensor]:
    """Put the model in train mode; return a copy of its buffers (BatchNorm statistics, a few KB) so that a
    skipped step can also undo what its forward passes did to them."""
    ctx.module.train()
    return [b.clone() for b in ctx.module.buffers()]


def _apply_update(ctx: StepContext, bad: Tensor, buffers_before: list[Tensor]) -> None:
    """SGD step unless ``bad`` (device bool); the decision is taken on the device by the fused kernel.

    On a bad step the buffers are restored too (``where(bad, old, new)``, no host synchronisation), so a
    NaN batch cannot poison the BatchNorm running statistics.
    """
    ctx.found_inf.copy_(bad)
    ctx.optimizer.step()
    _restore_buffers(ctx, bad, buffers_before)


def _restore_buffers(ctx: StepContext, bad: Tensor, buffers_before: list[Tensor]) -> None:
    """``buffer <- where(bad, old, buffer)`` for the model's buffers (no host synchronisation)."""
    with torch.no_grad():
        for buf, old in zip(ctx.module.buffers(), buffers_before):
            buf.copy_(torch.where(bad, old, buf))


def _reduce(ctx: StepContext, loss: Tensor, captured: bool = False, extra_buffers: list[Tensor] = ()) -> Tensor:
    """Data-parallel runs: average over the ranks, in one packed collective per dtype, the update
    gradients (plus the natural and adversarial ones when ``captured``), the model's floating-point
    buffers (BatchNorm statistics), the floating-point tensors of ``extra_buffers`` (the revision model's
    own running statistics) and the loss; return the (averaged) detached loss.

    Called after the step's last backward pass and before masking, so the mask, the skip decision and
    the SGD step are computed from identical values on every rank (see :mod:`cure.distributed`).
    A no-op for world size 1.
    """
    loss = loss.detach().float().reshape(1).clone() if ctx.dist.enabled else loss.detach()
    if not ctx.dist.enabled:
        return loss
    masker = ctx.masker
    if masker is not None:
        kinds = ("nat", "adv", "update") if captured else ("update",)
        tensors = [b for kind in kinds for b in masker.buffers[kind].values()]
        # A .grad that autograd replaced (not our view) would be missed by the flat buffers.
        tensors += [q.grad for q, v in zip(masker.params, masker.updates)
                    if q.grad is not None and q.grad.data_ptr() != v.data_ptr()]
    else:
        tensors = [q.grad for q in ctx.module.parameters() if q.grad is not None]
    tensors += [b for b in ctx.module.buffers() if b.is_floating_point()]
    tensors += [b for b in extra_buffers if b.is_floating_point()]
    tensors.append(loss)
    all_reduce_mean_(tensors, ctx.dist)
    return loss.reshape(())


def _zero(ctx: StepContext) -> Tensor:
    return torch.zeros((), device=ctx.found_inf.device)


def natural_step(ctx: StepContext, x: Tensor, y: Tensor) -> StepResult:
    """ST: one SGD step on CE(f(x), y)."""
    buffers = _train_mode(ctx)
    ctx.zero_grad()
    with ctx.autocast():
        logits = ctx.model(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    loss = _reduce(ctx, loss)
    bad = ~torch.isfinite(loss)
    _apply_update(ctx, bad, buffers)
    zero = _zero(ctx)
    return StepResult(loss, _correct(logits, y), zero, bad, zero + 1, zero)


def madry_step(ctx: StepContext, x: Tensor, y: Tensor) -> StepResult:
    """AT (Madry): x_adv = PGD-CE from a uniform random start in the eps-ball; SGD on CE(f(x_adv), y)."""
    cfg = ctx.cfg
    with ctx.autocast():
        x_adv = pgd(
            ctx.model,
            x,
            y,
            eps=ctx.eps,
            step_size=ctx.step_size,
            steps=cfg.attack_steps,
            norm=cfg.norm,
            loss="ce",
            random_start=True,
            generator=ctx.attack_generator,
        )
    buffers = _train_mode(ctx)
    ctx.zero_grad()
    with ctx.autocast():
        logits_adv = ctx.model(x_adv)
    loss = F.cross_entropy(logits_adv.float(), y)
    loss.backward()
    loss = _reduce(ctx, loss)
    bad = ~torch.isfinite(loss)
    _apply_update(ctx, bad, buffers)
    zero = _zero(ctx)
    # Natural accuracy is not computed during AT steps (it would cost a forward pass); 0 is reported.
    return StepResult(loss, zero, _correct(logits_adv, y), bad, zero + 1, zero)


def _trades_terms(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(CE(f(x), y), beta * KL(p(x) || p(x_adv))): the two terms of TRADES' loss and of CURE's L_adv
    (Eq. 5), whose sum is the loss."""
    return F.cross_entropy(logits_nat.float(), y), beta * kl_divergence(logits_nat, logits_adv)


def trades_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES' loss and CURE's L_adv (Eq. 5): ``CE(f(x), y) + beta * KL(p(x) || p(x_adv))``, batch means,
    float32. Gradients flow into both logits."""
    ce, kl = _trades_terms(logits_nat, logits_adv, y, beta)
    return ce + kl


def cure_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, rev_nat: Tensor | None, rev_adv: Tensor | None,
              *, beta: float, gamma: float) -> Tensor:
    """CURE's training loss: ``trades_loss + gamma * consistency_loss`` (Eqs. 5 and 8); without the revision
    model's logits (``None``, the no-revision ablation) the TRADES-style loss alone. The step masks its
    gradient with the prominence of ``CE(f(x), y)`` and ``CE(f(x_adv), y)`` (:class:`cure.CureStep`)."""
    loss = trades_loss(logits_nat, logits_adv, y, beta)
    if rev_nat is None or rev_adv is None:
        return loss
    return loss + gamma * consistency_loss(rev_nat, logits_nat, rev_adv, logits_adv)


def consistency_loss(rev_nat: Tensor, logits_nat: Tensor, rev_adv: Tensor, logits_adv: Tensor) -> Tensor:
    """CURE's L_CR (Eq. 8): ``KL(p_rev(x) || p(x)) + KL(p_rev(x_adv) || p(x_adv))``; the revision model's
    logits are targets (pass them detached, or computed under ``no_grad``)."""
    return kl_divergence(rev_nat, logits_nat) + kl_divergence(rev_adv, logits_adv)


def trades_step(ctx: StepContext, x: Tensor, y: Tensor) -> StepResult:
    """TRADES: x_adv maximises KL(p(x) || p(x')); SGD on CE(f(x), y) + beta * KL(p(x) || p(x_adv))."""
    cfg = ctx.cfg
    with ctx.autocast():
        x_adv = trades_pgd(
            ctx.model,
            x,
            eps=ctx.eps,
            step_size=ctx.step_size,
            steps=cfg.attack_steps,
            norm=cfg.norm,
            generator=ctx.attack_generator,
        )

    def loss_fn(nat: Tensor, adv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ce, kl = _trades_terms(nat, adv, y, cfg.beta)
        return ce + kl, {"loss_ce": ce.detach(), "loss_kl": kl.detach()}

    return _paired_loss_step(ctx, x, y, x_adv, loss_fn)


def _paired_loss_step(ctx: StepContext, x: Tensor, y: Tensor, x_adv: Tensor, loss_fn) -> StepResult:
    """The update of TRADES and MART: ``loss_fn(f(x), f(x_adv))`` in train mode, one backward pass, PyTorch's
    fused SGD (skipped on the device when the loss is not finite). ``loss_fn`` returns the loss, or
    ``(loss, terms)`` with ``terms`` StepResult's loss-term fields."""
    buffers = _train_mode(ctx)
    ctx.zero_grad()
    with ctx.autocast():
        logits_nat = ctx.model(x)
        logits_adv = ctx.model(x_adv)
    loss = loss_fn(logits_nat, logits_adv)
    loss, terms = loss if isinstance(loss, tuple) else (loss, {})
    loss.backward()
    loss = _reduce(ctx, loss)
    bad = ~torch.isfinite(loss)
    _apply_update(ctx, bad, buffers)
    zero = _zero(ctx)
    return StepResult(loss, _correct(logits_nat, y), _correct(logits_adv, y), bad, zero + 1, zero, **terms)


def _sgd_hyperparameters(optimizer: torch.optim.SGD) -> tuple[float, float, float]:
    """(lr, momentum, weight_decay) of the optimizer's single param group as it stands now (after any lr
    scheduler step); the fused CURE update implements plain SGD only, so other settings are an error."""
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"the fused CURE update needs an optimizer with one param group, got "
                         f"{len(optimizer.param_groups)}; build it with build_step_context")
    group = optimizer.param_groups[0]
    unsupported = {k: group.get(k) for k in ("nesterov", "dampening", "maximize") if group.get(k)}
    if unsupported:
        raise ValueError(f"the fused CURE update implements SGD without nesterov, dampening or maximize; "
                         f"the optimizer has {unsupported}")
    return float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])


def _momentum_buffers(optimizer: torch.optim.SGD, params: list[Tensor]) -> list[Tensor]:
    """The optimizer's momentum buffers of ``params``, created as zeros where missing (read every step:
    ``optimizer.load_state_dict`` replaces them)."""
    buffers = []
    for q in params:
        state = optimizer.state[q]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(q, memory_format=torch.preserve_format)
        buffers.append(buf)
    return buffers


FAST_SELECTION_BACKENDS = ("triton", "cuda")


def overlaps_selection(device: torch.device, backend: str, distributed: bool) -> bool:
    """Whether a CURE step on ``device`` with kernel backend ``backend`` runs the mask's selection
    (:func:`cure_kernels.rgp_select`) on a side stream while its last backward pass runs.

    Only on CUDA (a CPU op runs on the calling thread: there is nothing to overlap), only with a backend
    that neither synchronises with the host nor runs on it (Triton or the CUDA kernels, as ``backend``
    resolves for ``rgp_select``; the reference synchronises on every call), and not in data-parallel runs:
    there the captured gradients are all-reduced after the last backward pass, so they are not final
    before it.
    """
    if device.type != "cuda" or distributed:
        return False
    if backend == "auto":
        name = backends.auto_backend(device, "rgp_select")
    elif backends.unavailable_reason(backend, device, "rgp_select") is None:
        name = backend
    else:
        return False
    return name in FAST_SELECTION_BACKENDS


def _start_selection(ctx: StepContext) -> tuple[torch.cuda.Stream, Tensor, Tensor]:
    """Queue :func:`cure_kernels.rgp_select` of the captured gradients on the context's side stream and
    return ``(side stream, thresholds, nonfinite)``; the caller makes main wait for ``side`` right after
    queueing the last backward pass, also when that raises (:func:`cure_step`), before anything reads them.

    Ordering: the captured gradients were written by the backward passes on the current ("main") stream,
    so ``side`` first waits for everything queued on main so far; the selection kernels then run on
    ``side`` while the caller queues ``loss.backward()`` on main. That backward pass writes ``.grad`` (the
    masker's update buffers) and never the captured buffers, which nothing writes again before main has
    waited for ``side`` (the next step's zero_grad zeroes them on main, after that wait): no race. Main
    waits for ``side`` once, on the device; the host never waits.

    Memory (the caching allocator reuses a freed block at once for later allocations on the stream that
    allocated it, without regard to other streams):

    * thresholds and nonfinite are allocated on ``side`` and read on main by the apply pass; when the
      caller drops them, their blocks could go to a new allocation on ``side`` while main's kernels still
      read them. ``record_stream(main)`` makes the allocator, when they are freed, wait for the work
      queued on main by then before it reuses their blocks.
    * the captured buffers (allocated on main) are read on ``side``. They live as long as the masker, but
      if it were dropped mid-step (an exception before the wait), their blocks could be reused on main
      while ``side`` still reads them: ``record_stream(side)`` on each flat buffer covers that.
    * the selection's own workspaces (and packed copies) are allocated and freed on ``side``, so any
      reuse is ordered after the kernels that used them. Triton's per-layout tables, uploaded on
      ``side`` by the first call (a blocking copy) and read by both streams afterwards, stay cached for
      the run.
    """
    masker = ctx.masker
    device = masker.params[0].device
    if ctx._selection_stream is None:
        ctx._selection_stream = torch.cuda.Stream(device=device)
    side = ctx._selection_stream
    main = torch.cuda.current_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        thresholds, nonfinite = rgp_select(masker.grads_nat, masker.grads_adv, alpha=masker.alpha, p=masker.p,
                                           backend=masker.backend)
    for kind in ("nat", "adv"):
        for buf in masker.buffers[kind].values():
            buf.record_stream(side)
    thresholds.record_stream(main)
    nonfinite.record_stream(main)
    return side, thresholds, nonfinite


def _fused_update(ctx: StepContext, bad: Tensor, revision_decay: float | None,
                  selection: tuple[torch.cuda.Stream, Tensor, Tensor] | None = None) -> MaskStats:
    """Conserve, update and (when ``revision_decay`` is given) revise the parameters in one
    :func:`cure_kernels.rgp_sgd_step_` call over all of them; skipped on the device when ``bad`` is set or
    a score is not finite (the gradients are still masked and the revision still moves).

    ``selection``: what :func:`_start_selection` returned, the current stream having waited for its side
    stream: the op applies those thresholds (its apply pass alone; the same bits as selecting here)."""
    masker = ctx.masker
    params = masker.params
    # A .grad that is not the masker's view (replaced by autograd or the caller) is masked where it is.
    grads = [q.grad if q.grad is not None else view for q, view in zip(params, masker.updates)]
    lr, momentum, weight_decay = _sgd_hyperparameters(ctx.optimizer)
    revision = None
    if revision_decay is not None:
        revision = ctx.revision.counterparts(params)
    thresholds = nonfinite = None
    if selection is not None:
        _, thresholds, nonfinite = selection
    stats = rgp_sgd_step_(
        params,
        grads,
        masker.grads_nat,
        masker.grads_adv,
        _momentum_buffers(ctx.optimizer, params),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        alpha=masker.alpha,
        p=masker.p,
        mask_mode=ctx.cfg.mask_mode,
        revision=revision,
        decay=0.0 if revision_decay is None else revision_decay,
        skip=bad,
        thresholds=thresholds,
        nonfinite=nonfinite,
        backend=masker.backend,
    )
    # This was the optimizer's step: lr schedulers check for one before their own step.
    ctx.optimizer._opt_called = True
    return stats


def cure_step(ctx: StepContext, x: Tensor, y: Tensor) -> StepResult:
    """CURE: attack, losses (Eqs. 5 and 8), prominence mask (Eq. 6), SGD, stochastic revision (Eq. 7)."""
    cfg = ctx.cfg
    masker, revision = ctx.masker, ctx.revision
    # 1. Attack (Eq. 4): TRADES-style KL maximisation, model in eval mode inside the attack.
    with ctx.autocast():
        x_adv = trades_pgd(
            ctx.model,
            x,
            eps=ctx.eps,
            step_size=ctx.step_size,
            steps=cfg.attack_steps,
            norm=cfg.norm,
            generator=ctx.attack_generator,
        )
    # 2. Losses, model in train mode.
    buffers = _train_mode(ctx)
    ctx.zero_grad()
    with ctx.autocast():
        logits_nat = ctx.model(x)
        logits_adv = ctx.model(x_adv)
    loss_nat, loss_kl = _trades_terms(logits_nat, logits_adv, y, cfg.beta)  # L_nat: also the prominence's
    loss = loss_adv = loss_nat + loss_kl  # Eq. 5
    loss_cr = rev_correct = None
    rev_buffers: list[Tensor] = []
    if revision is not None:
        # The targets of L_CR: the revision model in train mode (BatchNorm with this batch's statistics, as
        # the official code), no gradients. Its running statistics move with these two passes; they are
        # saved first so that a skipped step can undo them, like the trained model's.
        revision.target_mode()
        rev_buffers = [b.clone() for b in revision.own_buffers()]
        with torch.no_grad(), ctx.autocast():
            rev_nat = ctx.revision_forward(x)
            rev_adv = ctx.revision_forward(x_adv)
        loss_cr = cfg.gamma * consistency_loss(rev_nat, logits_nat, rev_adv, logits_adv)  # Eq. 8
        loss = loss_adv + loss_cr
        rev_correct = _correct(rev_nat, y)
    # 3. Gradients: dL_nat/dw and dL_rob/dw into the masker's buffers, dL/dw into .grad.
    stats: MaskStats | None = None
    selection = None
    if masker is not None:
        loss_rob = F.cross_entropy(logits_adv.float(), y)  # L_rob: prominence only
        with masker.capture("nat"):
            loss_nat.backward(retain_graph=True)
        with masker.capture("adv"):
            loss_rob.backward(retain_graph=True)
        # The captured gradients are final now: on CUDA the mask's selection runs on a side stream while
        # the last backward pass runs on the current one.
        if ctx.overlap_selection and overlaps_selection(masker.params[0].device, masker.backend, ctx.dist.enabled):
            selection = _start_selection(ctx)
    try:
        loss.backward()
    finally:
        if selection is not None:
            # Main waits for the selection (on the device) once the last backward pass is queued; also when
            # that pass raised, so that nothing queued on main later (the next step's zero_grad zeroing the
            # captured buffers) can overtake the side stream's reads.
            torch.cuda.current_stream(masker.params[0].device).wait_stream(selection[0])
    # Data-parallel: one packed all-reduce of the three gradients, the BatchNorm buffers and the loss.
    loss = _reduce(ctx, loss, captured=masker is not None,
                   extra_buffers=revision.own_buffers() if revision is not None else [])
    bad = ~torch.isfinite(loss)
    # The revision draw of this step (Eq. 7), taken first: a selected revision is fused into the update.
    ctx.cure_step += 1
    revision_decay = None
    if revision is not None:
        u = float(torch.rand((), generator=ctx.revision_generator))
        revision_decay = revision.decay_for(ctx.cure_step, u, rate=ctx.revision_rate)
    if masker is not None:
        # 4-6. Conserve (zero the least prominent fraction p of dL/dw in every tensor), update (skipped on
        # the device when bad) and revise the parameters: one op.
        stats = _fused_update(ctx, bad, revision_decay, selection)
        bad = bad | (stats.nonfinite.sum() > 0)
        _restore_buffers(ctx, bad, buffers)
        if revision_decay is not None:
            revision.update_rest(revision_decay, masker.params)  # what the fused step did not revise
    else:
        _apply_update(ctx, bad, buffers)
        if revision_decay is not None:
            revision.update(revision_decay)
    if rev_buffers:
        with torch.no_grad():
            for buf, old in zip(revision.own_buffers(), rev_buffers):
                buf.copy_(torch.where(bad, old, buf))
    revised = revision_decay is not None
    if stats is not None:
        kept_fraction = stats.kept.sum().float() / ctx._param_numel
        nonfinite = stats.nonfinite.sum().float()
    else:
        kept_fraction = _zero(ctx) + 1
        nonfinite = _zero(ctx)
    return StepResult(
        loss,
        _correct(logits_nat, y),
        _correct(logits_adv, y),
        bad,
        kept_fraction,
        nonfinite,
        revised,
        stats,
        loss_ce=loss_nat.detach(),
        loss_kl=loss_kl.detach(),
        loss_cr=None if loss_cr is None else loss_cr.detach(),
        rev_correct_nat=rev_correct,
    )


def mart_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """MART's training loss (Wang et al., ICLR 2020), in float32, averaged over the batch:

        BCE(p(x'), y) + beta * mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i)),
        BCE(p(x'), y) = CE(f(x'), y) - log(1 - max_{k != y} p_k(x'))      (boosted cross-entropy),

    KL summed over classes per example. log(1 - p_k) is computed as logsumexp_{j != k} log p_j (no
    clamping constants, finite however confident the model is) and 1 - p_y as -expm1(log p_y). The most
    likely wrong class k is chosen without gradient; gradients flow into both logits, the weight
    1 - p_y(x) included, as in the paper and the authors' code.
    """
    log_p_nat = F.log_softmax(logits_nat.float(), dim=1)
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    labels = y[:, None]
    wrong = log_p_adv.detach().scatter(1, labels, float("-inf")).argmax(dim=1, keepdim=True)
    log_one_minus_wrong = log_p_adv.scatter(1, wrong, float("-inf")).logsumexp(dim=1)
    boosted_ce = F.nll_loss(log_p_adv, y) - log_one_minus_wrong.mean()
    kl = F.kl_div(log_p_adv, log_p_nat, reduction="none", log_target=True).sum(dim=1)
    one_minus_true = -torch.expm1(log_p_nat.gather(1, labels).squeeze(1))
    return boosted_ce + beta * (kl * one_minus_true).mean()


def mart_step(ctx: StepContext, x: Tensor, y: Tensor) -> StepResult:
    """MART: x_adv = PGD-CE from x + 0.001 N(0, I); SGD on :func:`mart_loss` (weight ``cfg.beta``)."""
    cfg = ctx.cfg
    with ctx.autocast():
        x_adv = mart_pgd(
            ctx.model,
            x,
            y,
            eps=ctx.eps,
            step_size=ctx.step_size,
            steps=cfg.attack_steps,
            norm=cfg.norm,
            generator=ctx.attack_generator,
        )
    return _paired_loss_step(ctx, x, y, x_adv, lambda nat, adv: mart_loss(nat, adv, y, cfg.beta))


def build_step_context(
    cfg: TrainConfig,
    module: nn.Module,
    *,
    model: Callable[[Tensor], Tensor] | None = None,
    eps: float,
    step_size: float,
    attack_seed: int,
    revision_seed: int,
    dist: DistributedContext | None = None,
) -> StepContext:
    """The optimizer, masker, revision model and generators of a run around ``module`` (on its device).

    The optimizer is ``SGD(lr, momentum, weight_decay, nesterov=False, fused=True)`` with its momentum
    buffers created up front (zeros), so that a skipped first step cannot leave them uninitialised; the
    first real step then gives buf = 0.9 * 0 + g = g, as PyTorch's first step does.
    """
    device = next(module.parameters()).device
    trainable = [q for q in module.parameters() if q.requires_grad]  # frozen blocks stay out (cfg.freeze)
    optimizer = torch.optim.SGD(
        trainable,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=False,
        weight_decay=cfg.weight_decay,
        fused=True,
    )
    for q in trainable:
        optimizer.state[q]["momentum_buffer"] = torch.zeros_like(q, memory_format=torch.preserve_format)
    masker = None
    if cfg.uses_mask:
        masker = ProminenceMasker(trainable, alpha=cfg.alpha, p=cfg.p, backend=cfg.kernel_backend)
    revision = revision_forward = None
    if cfg.uses_revision:
        revision = RevisionModel(
            module, rate=cfg.revision_rate, decay=cfg.revision_decay, backend=cfg.kernel_backend,
            bn=cfg.revision_bn,
        )
        revision_forward = torch.compile(revision.module) if cfg.compile else revision.module
    return StepContext(
        cfg=cfg,
        model=module if model is None else model,
        module=module,
        optimizer=optimizer,
        eps=eps,
        step_size=step_size,
        attack_generator=torch.Generator(device=device).manual_seed(attack_seed),
        revision_generator=torch.Generator().manual_seed(revision_seed),
        found_inf=torch.zeros((), device=device),
        masker=masker,
        revision=revision,
        revision_forward=revision_forward,
        amp=cfg.amp,
        revision_rate=cfg.revision_rate,
        dist=DistributedContext() if dist is None else dist,
    )


STEP_FUNCTIONS: dict[str, Callable[[StepContext, Tensor, Tensor], StepResult]] = {
    "st": natural_step,
    "at": madry_step,
    "trades": trades_step,
    "cure": cure_step,
    "mart": mart_step,
}
