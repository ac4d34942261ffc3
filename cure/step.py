"""A whole CURE step for your own training loop.

    import torch, cure

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    step = cure.CureStep(model, optimizer, eps=8 / 255, step_size=2 / 255)
    for x, y in loader:                      # inputs in [0, 1]
        result = step(x, y)                  # attack, three gradients, fused mask + SGD + revision
        scheduler.step()                     # your lr schedule: the step reads the optimizer's lr
    step.revision_model                      # theta_rev, for evaluation or saving

One call is :func:`cure.methods.cure_step`, the trainer's own step: the TRADES-style attack on the KL
divergence (paper Eq. 4), the losses ``CE(f(x), y) + beta * KL(p(x) || p(x_adv)) + gamma * L_CR`` (Eqs. 5
and 8, the revision model's targets in train mode as in the official code), the natural and adversarial
gradients captured for the Robust Gradient Prominence (Eq. 6), and one :func:`cure_kernels.rgp_sgd_step_`
that conserves the p least prominent gradient entries of every tensor, takes the SGD step with your
optimizer's lr, momentum and weight decay (its momentum buffers, so checkpoints of the optimizer stay
valid) and, with probability r, moves the revision model (Eq. 7). A step whose loss or scores are not
finite is skipped on the device. The loss terms (:func:`trades_loss`, :func:`consistency_loss`) are the
ones the step uses, for loops that compose their own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cure.config import TrainConfig
from cure.methods import StepContext, StepResult, consistency_loss, cure_step, trades_loss
from cure.revision import RevisionModel
from cure_kernels import ProminenceMasker

__all__ = ["CureStep", "trades_loss", "consistency_loss"]  # the losses are cure.methods', re-exported


class CureStep:
    """CURE's training step (attack, losses, prominence mask, SGD, revision) on your model and optimizer.

    Args:
        model: the network being trained (inputs in [0, 1], logits out), on its device. Start from a
            naturally trained one, as the paper does.
        optimizer: ``torch.optim.SGD`` over the model's trainable parameters in one param group, without
            nesterov or dampening. Its lr (as a scheduler sets it), momentum and weight decay are read at
            every step, and its momentum buffers are created here (zeros) when missing.
        eps, step_size: the attack's radius and step (inputs in [0, 1]; CIFAR: 8/255 and 2/255).
        attack_steps: K, the attack's steps. norm: "linf" or "l2".
        beta, gamma: weights of the KL term and of L_CR. alpha, p: the prominence weight and the conserved
            fraction per tensor. revision_rate, revision_decay: r and d of Eq. 7. mask_mode: "grad" (the
            official code) or "update". revision_bn: "batch" (the official code) or "ema".
        seed: seeds the attack noise and the revision draws. backend: the cure_kernels backend.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.SGD, *, eps: float, step_size: float,
                 attack_steps: int = 10, norm: str = "linf", beta: float = 5.0, gamma: float = 1.0,
                 alpha: float = 0.1, p: float = 0.3, revision_rate: float = 0.2, revision_decay: float = 0.999,
                 mask_mode: str = "grad", revision_bn: str = "batch", seed: int = 0, backend: str = "auto"):
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            raise ValueError("pass the module itself, not its torch.compile wrapper (CureStep copies it for "
                             "the revision model)")
        params = [q for q in model.parameters() if q.requires_grad]
        in_optimizer = {id(q) for group in optimizer.param_groups for q in group["params"]}
        missing = [i for i, q in enumerate(params) if id(q) not in in_optimizer]
        if missing:
            raise ValueError(f"the optimizer does not hold {len(missing)} of the model's {len(params)} trainable "
                             f"parameters (the first is parameter {missing[0]}); build it over model.parameters()")
        self.config = TrainConfig(
            method="cure", attack_steps=attack_steps, norm=norm, beta=beta, gamma=gamma, alpha=alpha, p=p,
            revision_rate=revision_rate, revision_decay=revision_decay, mask_mode=mask_mode,
            revision_bn=revision_bn, eps=eps, step_size=step_size, kernel_backend=backend, seed=seed,
        ).validate()
        device = params[0].device
        for q in params:
            if optimizer.state[q].get("momentum_buffer") is None:
                optimizer.state[q]["momentum_buffer"] = torch.zeros_like(q, memory_format=torch.preserve_format)
        revision = RevisionModel(model, rate=revision_rate, decay=revision_decay, backend=backend, bn=revision_bn)
        self.ctx = StepContext(
            cfg=self.config, model=model, module=model, optimizer=optimizer, eps=float(eps),
            step_size=float(step_size),
            attack_generator=torch.Generator(device=device).manual_seed(seed),
            revision_generator=torch.Generator().manual_seed(seed + 1),
            found_inf=torch.zeros((), device=device),
            masker=ProminenceMasker(params, alpha=alpha, p=p, backend=backend),
            revision=revision, revision_forward=revision.module, revision_rate=revision_rate,
        )

    def __call__(self, x: Tensor, y: Tensor) -> StepResult:
        """One CURE step on the batch ``(x, y)``; returns its device statistics (loss, its terms, correct
        predictions, kept fraction, whether it was skipped or revised), read without synchronising."""
        return cure_step(self.ctx, x, y)

    @property
    def revision_model(self) -> nn.Module:
        """theta_rev (train mode while stepping; put it in eval mode to evaluate it)."""
        return self.ctx.revision.module

    @property
    def steps(self) -> int:
        """CURE steps taken (t of the revision's warmed-up decay)."""
        return self.ctx.cure_step
