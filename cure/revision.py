"""The revision model of CURE: a stochastic exponential moving average of the trained model (paper Eq. 7).

Each training step t (counted from the start of the CURE stage, 1-based) draws u ~ U(0, 1) from the
trainer's generator; if u < r::

    theta_rev <- d_t * theta_rev + (1 - d_t) * theta,      d_t = min(1 - 1/(t + 1), d)

(the warm-up of d_t is the official code's). The average covers every parameter **and every
floating-point buffer** (BatchNorm running mean and variance); integer buffers (``num_batches_tracked``)
are copied. :meth:`RevisionModel.update` runs it through :func:`cure_kernels.revise_` over one flat list.
A CURE step with a mask instead fuses the parameters' average into its SGD step
(:func:`cure_kernels.rgp_sgd_step_` with ``revision=``:meth:`RevisionModel.counterparts`), so the new
weights are read once, and completes the update with :meth:`RevisionModel.update_rest` (the buffers).

Design decisions (the official code differs; see docs/method.md):

* The revision model runs in **eval mode** when it provides the consistency targets of L_CR and when it
  is evaluated. The official code keeps it in train mode, so its BatchNorm normalises with the statistics
  of the current batch and updates its own running statistics from its forward passes. In eval mode the
  target is a fixed function of theta_rev (it does not depend on which images share the batch), and the
  network that produced the targets during training is exactly the one evaluated and saved afterwards.
* Its BatchNorm running statistics **follow the EMA** of the trained model's running statistics. The
  trained model forwards both natural and adversarial batches in train mode, so its running statistics
  describe the mixture the revision model sees; averaging them with the same decay as the weights keeps
  the statistics matched to the averaged weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import cure_kernels

__all__ = ["RevisionModel", "revision_decay_at"]


def revision_decay_at(step: int, decay: float) -> float:
    """Warmed-up decay d_t = min(1 - 1/(t + 1), d) for the t-th step (t >= 1) of the CURE stage."""
    if step < 1:
        raise ValueError(f"step must be at least 1 (the first CURE step is t = 1), got {step}")
    return min(1.0 - 1.0 / (step + 1), decay)


def _float_state(module: nn.Module) -> list[Tensor]:
    """Parameters then floating-point buffers, in a fixed order."""
    params = [p.detach() for p in module.parameters()]
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    return params + buffers


def _int_buffers(module: nn.Module) -> list[Tensor]:
    return [b for b in module.buffers() if not b.is_floating_point()]


class RevisionModel:
    """Holds theta_rev (a deep copy of the trained model, no gradients, eval mode) and updates it.

    Args:
        model: the trained model (not a ``torch.compile`` wrapper: pass the module it wraps).
        rate: r, the probability of an update per step.
        decay: d, the EMA decay after warm-up.
        backend: :func:`cure_kernels.revise_` backend.
    """

    def __init__(self, model: nn.Module, *, rate: float, decay: float, backend: str = "auto"):
        self.rate = float(rate)
        self.decay = float(decay)
        self.backend = backend
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        self.updates = 0  # EMA updates applied so far
        self._source = model
        self._pair_lists(model)
        self._fused_key: tuple[int, ...] | None = None  # ids of the parameters the fused step revises
        self._fused: list[Tensor] = []
        self._rest_rev: list[Tensor] = []
        self._rest_src: list[Tensor] = []

    def _pair_lists(self, model: nn.Module) -> None:
        self._rev_float, self._src_float = _float_state(self.module), _float_state(model)
        self._rev_int, self._src_int = _int_buffers(self.module), _int_buffers(model)
        if len(self._rev_float) != len(self._src_float) or len(self._rev_int) != len(self._src_int):
            raise ValueError("the revision model and the trained model have different parameters or buffers")
        for i, (r, s) in enumerate(zip(self._rev_float, self._src_float)):
            if r.shape != s.shape or r.dtype != s.dtype:
                raise ValueError(
                    f"revision tensor {i} is {tuple(r.shape)} {r.dtype} but the model's is "
                    f"{tuple(s.shape)} {s.dtype}"
                )

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """theta_rev <- decay * theta_rev + (1 - decay) * theta (parameters and floating buffers);
        integer buffers are copied."""
        cure_kernels.revise_(self._rev_float, self._src_float, decay=decay, backend=self.backend)
        for r, s in zip(self._rev_int, self._src_int):
            r.copy_(s)
        self.updates += 1

    def decay_for(self, t: int, u: float, rate: float | None = None) -> float | None:
        """The decay d_t of step t's revision given the draw u ~ U(0, 1), or None when u >= r (no update).

        ``rate`` overrides r (e.g. after a late decay of the revision rate).
        """
        r = self.rate if rate is None else rate
        return revision_decay_at(t, self.decay) if u < r else None

    def step(self, t: int, u: float, rate: float | None = None) -> bool:
        """The stochastic revision of step t (1-based in the CURE stage) given the draw u ~ U(0, 1).

        Updates with d_t = min(1 - 1/(t + 1), d) when u < r (``rate`` overrides r, e.g. after a late decay).
        Returns whether an update happened.
        """
        decay = self.decay_for(t, u, rate)
        if decay is not None:
            self.update(decay)
        return decay is not None

    def counterparts(self, params: Sequence[Tensor]) -> list[Tensor]:
        """theta_rev's tensor for each of the trained model's parameters in ``params`` (matched by identity).

        The ``revision=`` list of :func:`cure_kernels.rgp_sgd_step_`, which revises these parameters inside
        the SGD step; :meth:`update_rest` then revises everything else. The split is computed once per
        parameter list.
        """
        key = tuple(id(q) for q in params)
        if key != self._fused_key:
            index = {id(q): i for i, q in enumerate(self._source.parameters())}
            rev_params = [q.detach() for q in self.module.parameters()]
            fused = []
            for i, q in enumerate(params):
                if id(q) not in index:
                    raise ValueError(f"params[{i}] (shape {tuple(q.shape)}) is not a parameter of the model "
                                     f"this revision model was copied from")
                fused.append(rev_params[index[id(q)]])
            covered = {r.data_ptr() for r in fused}  # parameters own their storage
            rest = [(r, s) for r, s in zip(self._rev_float, self._src_float) if r.data_ptr() not in covered]
            self._fused = fused
            self._rest_rev = [r for r, _ in rest]
            self._rest_src = [s for _, s in rest]
            self._fused_key = key
        return self._fused

    @torch.no_grad()
    def update_rest(self, decay: float, params: Sequence[Tensor]) -> None:
        """Complete an update whose parameters ``params`` the fused SGD step has already revised with
        ``decay``: every other floating-point tensor of theta_rev (the BatchNorm statistics, parameters not
        in ``params``) through :func:`cure_kernels.revise_`, integer buffers copied. Counts one update.

        Together with the fused step this equals :meth:`update` (``decay``), tensor for tensor.
        """
        self.counterparts(params)  # the split for this parameter list
        if self._rest_rev:
            cure_kernels.revise_(self._rest_rev, self._rest_src, decay=decay, backend=self.backend)
        for r, s in zip(self._rev_int, self._src_int):
            r.copy_(s)
        self.updates += 1

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """theta_rev <- theta exactly (all parameters and buffers); used when the CURE stage starts."""
        for r, s in zip(self._rev_float + self._rev_int, self._src_float + self._src_int):
            r.copy_(s)

    def state_dict(self) -> dict:
        """Weights and buffers of the revision model plus the update counter."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
