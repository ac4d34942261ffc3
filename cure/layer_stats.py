"""Per-layer statistics of a training run: ``layer_stats.csv`` in the run directory and TensorBoard scalars
``layers/<column>/<parameter name>`` (step = the 1-based epoch).

One row per (epoch, parameter tensor) -- ``layer`` is the parameter's qualified name, e.g. ``conv1.weight``
(trainable parameters only: blocks frozen with ``--freeze`` are left out) -- with these columns, each the
mean over the epoch's applied steps:

* ``kept_fraction``: the fraction of the tensor's gradient entries the RGP mask kept (``MaskStats.kept``
  divided by the tensor's number of entries; 1 - p when no score ties the threshold).
* ``grad_nat_mean_abs``: the mean |dL_nat/dw| over the tensor's entries (the natural cross-entropy's
  gradient, the masker's natural buffer).
* ``grad_rob_mean_abs``: the mean |dL_rob/dw| (the adversarial cross-entropy's gradient, the masker's
  adversarial buffer).
* ``update_norm``: the L2 norm of the tensor's update gradient dL/dw after masking (the gradient SGD
  receives, before weight decay and momentum are added).

What each method records: the steps of CURE with the RGP mask (``cure`` without ``--no-mask``, after the
ST warm-up epochs of CURE-Eff) record all four columns; every other step (ST, AT, TRADES, MART, CURE with
``--no-mask``, the warm-up epochs) has no mask and no separate natural and adversarial gradients, and
records ``update_norm`` only (the norm of the unmasked gradient); the other columns are empty there.

Skipped steps (non-finite loss or prominence scores: the weights were left unchanged) are excluded from
the means on the device (their values are replaced by zeros with ``torch.where``, so that a NaN cannot
leak into the sums, and they are not counted); an epoch whose steps were all skipped has empty cells.

Cost: per step, three fused ``torch._foreach_norm`` launches (L1 norms of the natural and adversarial
gradients, L2 norms of the updates, accumulated in float64) and a few elementwise operations on a [T, 6]
float64 device tensor (T parameter tensors). Nothing is read on the host until the end of the epoch.
Data-parallel runs: the gradients are the all-reduced ones, so every rank accumulates the same values;
rank 0 writes the file.

Resume: the sums of the current epoch and the rows of the finished epochs are part of the checkpoint
(:class:`cure.train.RunState`), and ``layer_stats.csv`` is rewritten from them at the end of every
epoch, as ``metrics.csv`` is: a resumed run never duplicates or loses rows.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cure.checkpoint import atomic_write_text

__all__ = ["LAYER_COLUMNS", "CSV_COLUMNS", "LayerStats", "write_layer_stats"]

#: The statistics, in the order of the first four columns of the device sums.
LAYER_COLUMNS = ("kept_fraction", "grad_nat_mean_abs", "grad_rob_mean_abs", "update_norm")
#: ``layer_stats.csv``'s columns (what :mod:`cure.plots` reads).
CSV_COLUMNS = ("epoch", "layer") + LAYER_COLUMNS

# Device sums, one row per tensor: the four statistics, then the number of applied steps with a mask
# (the divisor of the first three) and the number of applied steps (the divisor of update_norm).
_MASKED, _APPLIED = 4, 5
_WIDTH = 6


class LayerStats:
    """Accumulates the per-layer statistics of ``module``'s trainable parameters on their device.

        stats = LayerStats(module)
        sums = stats.zeros()
        stats.record(sums, result, masker)      # after every step, no host synchronisation
        values = stats.means(sums)               # end of the epoch: one host read
    """

    def __init__(self, module: nn.Module):
        named = [(name, q) for name, q in module.named_parameters() if q.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameter; there is nothing to record per layer")
        self.names = [name for name, _ in named]
        self.params = [q for _, q in named]
        device = self.params[0].device
        numel = torch.tensor([max(q.numel(), 1) for q in self.params], dtype=torch.float64, device=device)
        self._inv_numel = 1.0 / numel
        self._zero_grad = torch.zeros((), device=device)  # stands in for a .grad that is None
        self._zeros = torch.zeros(len(self.params), dtype=torch.float64, device=device)
        self._ones = torch.ones(len(self.params), dtype=torch.float64, device=device)

    def zeros(self) -> Tensor:
        """Fresh epoch sums: float64 [T, 6] on the parameters' device."""
        return torch.zeros(len(self.params), _WIDTH, dtype=torch.float64, device=self._inv_numel.device)

    def record(self, sums: Tensor, result: Any, masker: Any | None) -> None:
        """Add one step to ``sums`` (in place). ``result`` is the step's :class:`cure.methods.StepResult`;
        ``masker`` the run's :class:`cure_kernels.ProminenceMasker` (None without a mask). Read after the
        step: the update gradients are the masked ones then. A skipped step adds nothing."""
        stats = getattr(result, "mask_stats", None)
        if stats is not None and masker is not None:
            if len(masker.params) != len(self.params):
                raise ValueError(
                    f"the masker holds {len(masker.params)} parameter tensors, the model "
                    f"{len(self.params)} trainable ones; build LayerStats on the masker's model"
                )
            grads = [q.grad if q.grad is not None else view for q, view in zip(masker.params, masker.updates)]
            # Accumulated in float64 (each entry converted on the fly): a float32 sum over a large layer
            # drifts by a few 1e-5 relative, and by a different amount with another thread count.
            update = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))
            nat = torch.stack(torch._foreach_norm(masker.grads_nat, 1, dtype=torch.float64)) * self._inv_numel
            adv = torch.stack(torch._foreach_norm(masker.grads_adv, 1, dtype=torch.float64)) * self._inv_numel
            kept = stats.kept.double() * self._inv_numel
            values = torch.stack([kept, nat, adv, update, self._ones, self._ones], dim=1)
        else:
            grads = [q.grad if q.grad is not None else self._zero_grad for q in self.params]
            update = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))
            values = torch.stack([self._zeros, self._zeros, self._zeros, update, self._zeros, self._ones], dim=1)
        applied = ~result.skipped.reshape(())
        sums.add_(torch.where(applied, values, 0.0))

    def means(self, sums: Tensor | None) -> list[list[float | None]]:
        """The epoch's means per tensor, ``[[kept, nat, adv, update], ...]`` (None where nothing was
        recorded). Reads ``sums`` on the host."""
        if sums is None:
            return [[None] * len(LAYER_COLUMNS) for _ in self.names]
        rows = []
        for row in sums.tolist():
            masked, applied = row[_MASKED], row[_APPLIED]
            rows.append(
                [row[i] / masked if masked > 0 else None for i in range(3)]
                + [row[3] / applied if applied > 0 else None]
            )
        return rows

    def add_scalars(self, writer, epoch: int, values: list[list[float | None]]) -> None:
        """TensorBoard scalars ``layers/<column>/<name>`` at step ``epoch`` (recorded values only)."""
        for name, row in zip(self.names, values):
            for column, value in zip(LAYER_COLUMNS, row):
                if value is not None:
                    writer.add_scalar(f"layers/{column}/{name}", value, epoch)


def write_layer_stats(path: Path, names: list[str], history: list[dict[str, Any]]) -> None:
    """Write ``layer_stats.csv`` (atomically) from ``history``: one ``{"epoch": e, "values": [[...], ...]}``
    per finished epoch, the values per tensor in the order of ``names`` (empty cells for None)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in history:
        for name, row in zip(names, entry["values"]):
            writer.writerow([entry["epoch"], name] + ["" if v is None else f"{v:.6g}" for v in row])
    atomic_write_text(buf.getvalue(), path)
