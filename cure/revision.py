"""The revision model of CURE: a stochastic exponential moving average of the trained model (paper Eq. 7).

Each training step t (counted from the start of the CURE stage, 1-based) draws u ~ U(0, 1) from the
trainer's generator; if u < r::

    theta_rev <- d_t * theta_rev + (1 - d_t) * theta,      d_t = min(1 - 1/(t + 1), d)

(the warm-up of d_t is the official code's). :meth:`RevisionModel.update` runs it through
:func:`cure_kernels.revise_` over one flat list. A CURE step with a mask instead fuses the parameters'
average into its SGD step (:func:`cure_kernels.rgp_sgd_step_` with ``revision=``
:meth:`RevisionModel.counterparts`), so the new weights are read once, and completes the update with
:meth:`RevisionModel.update_rest`.

BatchNorm (``bn``), two modes:

* ``"batch"`` (the default; what the official code, NeurAI-Lab/CURE ``utilities/train.py``, does): the
  revision model gives the consistency targets of L_CR in **train mode**, so its BatchNorm layers
  normalise with the statistics of the batch being trained on, under ``no_grad``. The EMA covers the
  **parameters only**. Its BatchNorm running statistics (and ``num_batches_tracked``) are its own: they
  move only through its own forward passes on x and x_adv, so when it is evaluated or saved (eval mode)
  its statistics were measured with its own weights. At the first CURE step theta_rev = theta exactly,
  so both networks compute the same logits and L_CR is exactly 0.
* ``"ema"`` (``--revision-bn ema``; an earlier design of this project, kept as an option): targets in
  **eval mode**, and the running statistics averaged with the same EMA as the weights (integer buffers
  copied). Measured on ResNet-20 / Fashion-MNIST from a natural model (docs/method.md, "Revision model
  and BatchNorm"): the averaged running variances are dominated by the iterates of the first large-lr
  steps and no longer fit the averaged weights, the eval-mode targets fall to near chance, and with
  gamma = 1 L_CR pulls the trained model down (32 steps: test Nat 17.2 % against 46.4 % with ``batch``;
  two epochs: CURE 26.4 / 9.2 % Nat / PGD-20 against 61.6 / 36.4 %). Networks without BatchNorm compute
  the same in both modes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import cure_kernels
from cure.config import REVISION_BN_MODES

__all__ = ["RevisionModel", "REVISION_BN_MODES", "revision_decay_at"]


def revision_decay_at(step: int, decay: float) -> float:
    """Warmed-up decay d_t = min(1 - 1/(t + 1), d) for the t-th step (t >= 1) of the CURE stage."""
    if step < 1:
        raise ValueError(f"step must be at least 1 (the first CURE step is t = 1), got {step}")
    return min(1.0 - 1.0 / (step + 1), decay)


def _averaged(module: nn.Module, bn: str) -> list[Tensor]:
    """The tensors the EMA covers, in a fixed order: the parameters, plus the floating-point buffers in
    mode "ema"."""
    params = [p.detach() for p in module.parameters()]
    if bn == "batch":
        return params
    return params + [b for b in module.buffers() if b.is_floating_point()]


def _copied(module: nn.Module, bn: str) -> list[Tensor]:
    """The tensors an EMA update copies from the trained model: the integer buffers in mode "ema"."""
    if bn == "batch":
        return []
    return [b for b in module.buffers() if not b.is_floating_point()]


class RevisionModel:
    """Holds theta_rev (a deep copy of the trained model, no gradients) and updates it.

    Args:
        model: the trained model (not a ``torch.compile`` wrapper: pass the module it wraps).
        rate: r, the probability of an update per step.
        decay: d, the EMA decay after warm-up.
        backend: :func:`cure_kernels.revise_` backend.
        bn: "batch" (default, the official code's: targets in train mode, EMA over the parameters, own
            running statistics) or "ema" (targets in eval mode, running statistics averaged); see the
            module docstring.
    """

    def __init__(self, model: nn.Module, *, rate: float, decay: float, backend: str = "auto",
                 bn: str = "batch"):
        if bn not in REVISION_BN_MODES:
            raise ValueError(f"bn must be one of {REVISION_BN_MODES}, got {bn!r}")
        self.rate = float(rate)
        self.decay = float(decay)
        self.backend = backend
        self.bn = bn
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

    @property
    def batch_statistics(self) -> bool:
        """The targets of L_CR come from train mode (BatchNorm with the batch's statistics)."""
        return self.bn == "batch"

    def target_mode(self) -> nn.Module:
        """Put the revision model in the mode it gives the L_CR targets in (train for "batch", eval for
        "ema") and return it. Evaluation puts it in eval mode itself."""
        return self.module.train(self.batch_statistics)

    def _pair_lists(self, model: nn.Module) -> None:
        self._rev_float, self._src_float = _averaged(self.module, self.bn), _averaged(model, self.bn)
        self._rev_int, self._src_int = _copied(self.module, self.bn), _copied(model, self.bn)
        rev_all = list(self.module.parameters()) + list(self.module.buffers())
        src_all = list(model.parameters()) + list(model.buffers())
        if len(rev_all) != len(src_all):
            raise ValueError("the revision model and the trained model have different parameters or buffers")
        for i, (r, s) in enumerate(zip(rev_all, src_all)):
            if r.shape != s.shape or r.dtype != s.dtype:
                raise ValueError(
                    f"revision tensor {i} is {tuple(r.shape)} {r.dtype} but the model's is "
                    f"{tuple(s.shape)} {s.dtype}"
                )

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """theta_rev <- decay * theta_rev + (1 - decay) * theta over the averaged tensors (the parameters;
        in mode "ema" also the floating-point buffers, integer buffers copied)."""
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
        ``decay``: every other averaged tensor of theta_rev (parameters not in ``params``; in mode "ema" the
        BatchNorm statistics too, integer buffers copied) through :func:`cure_kernels.revise_`. Counts one
        update.

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
        """theta_rev <- theta exactly (all parameters and buffers, in both modes); used when the CURE stage
        starts (after the natural pre-training, or after CURE-Eff's warm-up)."""
        rev = list(self.module.parameters()) + list(self.module.buffers())
        src = list(self._source.parameters()) + list(self._source.buffers())
        for r, s in zip(rev, src):
            r.copy_(s)

    def own_buffers(self) -> list[Tensor]:
        """The buffers that the revision model's own forward passes move (its BatchNorm running statistics
        and counters in mode "batch"; none in mode "ema", where they follow the trained model's)."""
        return list(self.module.buffers()) if self.batch_statistics else []

    def state_dict(self) -> dict:
        """Weights and buffers of the revision model plus the update counter."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
