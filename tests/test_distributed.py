"""Data-parallel training with real processes (gloo on the CPU, 2 ranks, a FileStore rendezvous).

* Every rank ends several CURE steps with identical weights, BatchNorm buffers, momentum, revision
  model and masks (checked bit for bit on every step).
* Two ranks on one global batch take the same steps as one process on it, up to float rounding
  (model without BatchNorm: with BatchNorm the batch statistics of a shard differ from those of the
  global batch, and SyncBatchNorm has no CPU implementation in torch).
* The trainer under 2 ranks: only rank 0 writes, and an interrupted run resumed from last.pt ends
  bit-identical to an uninterrupted one.
* The loader shards: disjoint shards whose union is the global batch, redrawn every epoch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_RUN
from torch import distributed as tdist
from torch import nn

from cure.checkpoint import load_checkpoint
from cure.config import resolve_config
from cure.data import BatchLoader
from cure.distributed import DistributedContext, all_reduce_mean_
from cure.methods import build_step_context, cure_step
from cure_kernels.reference import rgp_scores

WORLD = 2
#: The shared tiny configuration (tests/conftest.py; the spawned workers cannot take fixtures) with
#: global batches of 16, two attack steps and host reads every step.
TINY = dict(TINY_RUN, batch_size=16, attack_steps=2, revision_rate=0.5, log_every=1)


def _init(rank: int, store_path: str) -> DistributedContext:
    torch.set_num_threads(1)
    store = tdist.FileStore(store_path, WORLD)
    tdist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    return DistributedContext(rank, WORLD, rank)


def _spawn(fn, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(os.path.join(tmp, "store"), *args), nprocs=WORLD, join=True)


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


class _NoBatchNorm(nn.Module):
    """A small convolutional network without BatchNorm (per-sample computation only)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 13 * 13, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _run_cure(module: nn.Module, dist: DistributedContext, steps: int, eps: float, record: list) -> object:
    """``steps`` CURE steps (mask mode "update", so the keep masks are explicit) on global batches of 16."""
    cfg = resolve_config(dict(TINY, method="cure", mask_mode="update", revision_rate=0.6), preset=None)
    ctx = build_step_context(
        cfg, module, eps=eps, step_size=0.01, attack_seed=11, revision_seed=12, dist=dist
    )
    images, labels = _images(64, seed=3)
    loader = BatchLoader(
        images, labels, batch_size=16, shuffle=True, augment="none", device="cpu", drop_last=True,
        rank=dist.rank, world_size=dist.world_size,
    )
    gen = torch.Generator().manual_seed(5)
    ctx.revision.copy_from_model()
    for step, (x, y) in enumerate(loader.epoch(gen)):
        if step == steps:
            break
        ctx.attack_generator.manual_seed(1000 * dist.rank + step)
        result = cure_step(ctx, x, y)
        # The keep masks of the step: score at or above the tensor's threshold (docs/method.md).
        masker, thresholds = ctx.masker, result.mask_stats.thresholds
        keeps = [~(rgp_scores(g_nat, g_adv, masker.alpha) < thr)
                 for g_nat, g_adv, thr in zip(masker.grads_nat, masker.grads_adv, thresholds)]
        record.append({"keeps": keeps, "thresholds": thresholds.clone(), "revised": result.revised,
                       "loss": float(result.loss)})
    return ctx


def _state(ctx) -> dict:
    momentum = [ctx.optimizer.state[q]["momentum_buffer"].clone() for q in ctx.module.parameters()]
    return {
        "model": {k: v.clone() for k, v in ctx.module.state_dict().items()},
        "revision": {k: v.clone() for k, v in ctx.revision.module.state_dict().items()},
        "momentum": momentum,
    }


def _worker_identical(rank: int, store_path: str, out_dir: str) -> None:
    dist = _init(rank, store_path)
    try:
        torch.manual_seed(0)
        from cure.data import DATASETS
        from cure.models import build_model

        # Part 1: the cnn (with BatchNorm), real attack noise that differs per rank.
        module = build_model("cnn", DATASETS["fashion-mnist"])
        record: list = []
        ctx = _run_cure(module, dist, steps=3, eps=0.1, record=record)
        torch.save({"state": _state(ctx), "record": record}, os.path.join(out_dir, f"cnn{rank}.pt"))
        # Part 2: no BatchNorm, eps = 0 (x_adv = x exactly, so the per-rank attack noise does not matter).
        torch.manual_seed(1)
        module = _NoBatchNorm()
        record = []
        ctx = _run_cure(module, dist, steps=3, eps=0.0, record=record)
        torch.save({"state": _state(ctx), "record": record}, os.path.join(out_dir, f"nobn{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def _assert_equal_states(a: dict, b: dict) -> None:
    for part in ("model", "revision"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key} differs between ranks"
    for i, (ma, mb) in enumerate(zip(a["momentum"], b["momentum"])):
        assert torch.equal(ma, mb), f"momentum {i} differs between ranks"


def test_two_ranks_hold_identical_weights_revision_and_masks_and_match_one_process(tmp_path: Path) -> None:
    _spawn(_worker_identical, str(tmp_path))
    for name in ("cnn", "nobn"):
        r0, r1 = (torch.load(tmp_path / f"{name}{r}.pt", weights_only=False) for r in range(WORLD))
        _assert_equal_states(r0["state"], r1["state"])
        assert len(r0["record"]) == 3
        for s0, s1 in zip(r0["record"], r1["record"]):
            assert s0["loss"] == s1["loss"]
            assert s0["revised"] == s1["revised"]
            assert torch.equal(s0["thresholds"].view(torch.int32), s1["thresholds"].view(torch.int32))
            for k0, k1 in zip(s0["keeps"], s1["keeps"]):
                assert torch.equal(k0, k1)
            # the mask conserves something and updates something (it is a real mask)
            flat = torch.cat([k.reshape(-1) for k in s0["keeps"]])
            assert 0 < flat.sum() < flat.numel()
        assert any(s["revised"] for s in r0["record"])
    # The weights moved: they are not the initial ones.
    torch.manual_seed(1)
    init = _NoBatchNorm().state_dict()
    two = torch.load(tmp_path / "nobn0.pt", weights_only=False)
    assert not torch.equal(init["net.0.weight"], two["state"]["model"]["net.0.weight"])
    # One process on the same global batches takes the same steps up to float rounding.
    torch.manual_seed(1)
    record: list = []
    ctx = _run_cure(_NoBatchNorm(), DistributedContext(), steps=3, eps=0.0, record=record)
    one = _state(ctx)
    for part in ("model", "revision"):
        for key, value in one[part].items():
            torch.testing.assert_close(two["state"][part][key], value, rtol=1e-5, atol=1e-6)
    for s1, s2 in zip(record, two["record"]):
        assert s1["revised"] == s2["revised"]
        assert abs(s1["loss"] - s2["loss"]) <= 1e-5 * max(1.0, abs(s1["loss"]))
        mismatched = sum(int((a != b).sum()) for a, b in zip(s1["keeps"], s2["keeps"]))
        total = sum(a.numel() for a in s1["keeps"])
        assert mismatched <= total * 1e-3  # only entries whose score ties the threshold up to rounding


def _worker_train(rank: int, store_path: str, runs: str) -> None:
    from cure.train import train

    _init(rank, store_path)
    try:
        cfg = resolve_config(dict(TINY, method="cure"), preset=None)
        full = Path(runs) / "full"
        summary = train(cfg, full, echo=False)
        assert summary is not None and summary["train_images"] == 64
        part = Path(runs) / "part"
        assert train(cfg, part, stop_after_step=2, echo=False) is None
        train(None, part, resume=True, echo=False)
    finally:
        tdist.destroy_process_group()


def test_trainer_two_ranks_rank0_writes_and_resume_is_exact(tmp_path: Path) -> None:
    _spawn(_worker_train, str(tmp_path))
    full, part = tmp_path / "full", tmp_path / "part"
    for run in (full, part):
        for name in ("config.json", "metrics.csv", "layer_stats.csv", "summary.json", "last.pt", "best.pt"):
            assert (run / name).is_file(), f"{run / name} missing"
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(part / "last.pt")
    assert a["distributed"]["world_size"] == WORLD
    assert a["progress"] == b["progress"] and a["progress"]["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"model {key}"
    for key, value in a["revision"]["module"].items():
        assert torch.equal(value, b["revision"]["module"][key]), f"revision {key}"
    assert a["trainer"]["history"][0]["train_loss"] == b["trainer"]["history"][0]["train_loss"]
    # Per-layer statistics from the all-reduced gradients, written by rank 0, exact across the resume.
    assert (full / "layer_stats.csv").read_text() == (part / "layer_stats.csv").read_text()
    assert a["trainer"]["layer_history"] == b["trainer"]["layer_history"]
    # the training accuracy counts all 64 images of both shards
    row = a["trainer"]["history"][0]
    assert 0 <= row["train_nat_acc"] <= 100


def test_loader_shards_are_disjoint_and_cover_the_global_batch() -> None:
    images, labels = _images(40, seed=9)
    labels = torch.arange(40)  # identify samples by their label
    whole = BatchLoader(images, labels, batch_size=8, shuffle=True, augment="crop", device="cpu")
    shards = [
        BatchLoader(images, labels, batch_size=8, shuffle=True, augment="crop", device="cpu",
                    rank=r, world_size=WORLD)
        for r in range(WORLD)
    ]
    for epoch in range(2):
        ref = list(whole.epoch(torch.Generator().manual_seed(epoch)))
        parts = [list(s.epoch(torch.Generator().manual_seed(epoch))) for s in shards]
        for k, (x, y) in enumerate(ref):
            xs = torch.cat([parts[r][k][0] for r in range(WORLD)])
            ys = torch.cat([parts[r][k][1] for r in range(WORLD)])
            assert torch.equal(ys, y) and torch.equal(xs, x)
            assert len(parts[0][k][1]) == 4
    # an incomplete last global batch (44 = 5 * 8 + 4) is split between the ranks
    ragged = [BatchLoader(_images(44, 9)[0], torch.arange(44), batch_size=8,
                          shuffle=True, augment="none", device="cpu", rank=r, world_size=WORLD)
              for r in range(WORLD)]
    tails = [list(s.epoch(torch.Generator().manual_seed(3)))[-1][1] for s in ragged]
    assert [len(t) for t in tails] == [2, 2]
    seen = torch.cat([y for s in ragged for _, y in s.epoch(torch.Generator().manual_seed(3))])
    assert torch.equal(seen.sort().values, torch.arange(44))
    first = [y for _, y in whole.epoch(torch.Generator().manual_seed(0))]
    second = [y for _, y in whole.epoch(torch.Generator().manual_seed(1))]
    assert not torch.equal(torch.cat(first), torch.cat(second))  # reshuffled per epoch
    with pytest.raises(ValueError, match="multiple of the world size"):
        BatchLoader(images, labels, batch_size=7, shuffle=True, augment="none", device="cpu", world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(images, labels, batch_size=8, shuffle=True, augment="none", device="cpu",
                    rank=2, world_size=2)


def test_single_process_needs_no_process_group() -> None:
    dist = DistributedContext()
    assert not dist.enabled and dist.is_main
    t = torch.tensor([1.0, 2.0])
    all_reduce_mean_([t], dist)  # no process group: the identity
    assert torch.equal(t, torch.tensor([1.0, 2.0]))
    assert not tdist.is_initialized()
