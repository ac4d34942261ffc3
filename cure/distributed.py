"""Data-parallel training over processes started by ``torchrun`` (NCCL on GPUs, gloo on CPUs).

``python -m cure train`` without ``torchrun`` runs with world size 1 and never creates a process group;
every function here is then a no-op (or the identity), so single-process runs are unchanged bit for bit.

Design (no ``DistributedDataParallel`` wrapper). A CURE step takes three backward passes (L_nat, L_rob
and L, see :mod:`cure.methods`) whose gradients land in the flat buffers of
:class:`cure_kernels.ProminenceMasker` (one buffer per kind and dtype). DDP would all-reduce during every
backward pass (three times per step, or needs ``no_sync`` plus hand-made reductions for two of them), and
a DDP-wrapped model would also run its hooks during the PGD steps of the attack. Instead the model is
never wrapped: the attack, the forward and the backward passes run on the plain module, purely locally,
and after the last backward pass :func:`all_reduce_mean_` averages, in **one collective per dtype**
(float32 only for the built-in models), a packed buffer holding

* the natural, adversarial and update gradients (the masker's three flat buffers, or every ``.grad``
  for the methods without a mask),
* the floating-point buffers of the model (BatchNorm running statistics), so all ranks keep identical
  buffers (with ``--sync-bn`` they are identical already), and
* the loss, so every rank takes the same skip decision for a non-finite loss.

With equal shards of one global batch B (``|B_r| = |B| / W``), the mean over ranks of the per-rank
mean-reduced losses' gradients is the gradient of the global mean loss:
(1/W) sum_r (W/|B|) sum_{i in B_r} dl_i/dw = (1/|B|) sum_i dl_i/dw. The mask is then computed from the
reduced natural and adversarial gradients, so every rank applies the same mask to the same update, the
fused SGD step is identical everywhere, and the weights stay identical without a broadcast. The revision
draw u ~ U(0, 1) comes from a CPU generator seeded identically on every rank, so revisions agree too.

The loss of this packing is overlap: the reduction starts after the last backward pass instead of
overlapping with it. For the models of this project the reduction is small next to the attack (10 PGD
steps, each a forward and a backward pass), which dominates a step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch import distributed as dist

__all__ = [
    "DistributedContext",
    "setup",
    "teardown",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "broadcast_object",
]


@dataclass(frozen=True)
class DistributedContext:
    """Rank, world size and the device of this process (world size 1: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, metrics and checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(device_name: str) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in WORLD_SIZE / RANK / LOCAL_RANK.

    Without those variables (or with WORLD_SIZE=1) nothing is initialised. Backend: NCCL when the run
    trains on CUDA, gloo otherwise. On CUDA each process uses GPU ``LOCAL_RANK``. A process group that
    already exists (e.g. created by a test) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistributedContext()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                f"start at most that many processes per node (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world, local_rank)


def teardown(ctx: DistributedContext, *, created: bool) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if created and ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _packed_all_reduce(tensors: Sequence[Tensor], scale: float | None) -> None:
    """Sum (then multiply by ``scale``) every tensor over the ranks, one collective per dtype and device."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for members in groups.values():
        flat = torch.cat([t.reshape(-1) for t in members])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if scale is not None:
            flat.mul_(scale)
        offset = 0
        for t in members:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def all_reduce_mean_(tensors: Sequence[Tensor], ctx: DistributedContext) -> None:
    """In place: t <- (1/W) sum_r t_r for every tensor; a no-op for world size 1."""
    if ctx.enabled and tensors:
        _packed_all_reduce(tensors, 1.0 / ctx.world_size)


def all_reduce_sum_(tensors: Sequence[Tensor], ctx: DistributedContext) -> None:
    """In place: t <- sum_r t_r for every tensor; a no-op for world size 1."""
    if ctx.enabled and tensors:
        _packed_all_reduce(tensors, None)


def broadcast_object(obj, ctx: DistributedContext, src: int = 0):
    """``obj`` of rank ``src`` on every rank (a pickled Python object); the identity for world size 1."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
