"""End-to-end training-step benchmark: images/s of a CURE step against a TRADES step, and against a
CURE step that masks the way the official code does (per tensor: copy the score to the host, then
numpy.percentile). Same model, batch, attack and device; all in one process.

Usage:  python bench/bench_step.py [--device cpu|cuda] [--arch cnn|resnet18|...] [--batch-size N] [--steps N]
Writes bench/results/step_<device>_<arch>.csv and prints one table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, print_table, write_csv  # noqa: E402
from cure.config import resolve_config  # noqa: E402
from cure.data import DATASETS  # noqa: E402
from cure.methods import STEP_FUNCTIONS, build_step_context  # noqa: E402
from cure.models import build_model  # noqa: E402


def official_mask_(masker) -> None:
    """The official code's conserve step: per tensor, the score to the host and numpy.percentile."""
    for q, g_nat, g_adv in zip(masker.params, masker.grads_nat, masker.grads_adv):
        s = masker.alpha * g_nat.abs() + (1 - masker.alpha) * g_adv.abs()
        thr = np.percentile(s.float().cpu().numpy(), masker.p * 100)
        q.grad[s < torch.tensor(thr, device=s.device)] = 0


def time_method(name: str, method: str, arch: str, dataset: str, device: torch.device, batch_size: int,
                steps: int, warmup: int, official: bool = False) -> dict:
    torch.manual_seed(0)
    spec = DATASETS[dataset]
    cfg = resolve_config({"method": method, "dataset": dataset, "arch": arch, "device": device.type,
                          "batch_size": batch_size, "progress": False})
    module = build_model(arch, spec).to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    ctx = build_step_context(cfg, module, eps=spec.eps, step_size=spec.step_size, attack_seed=0, revision_seed=0)
    if official:
        masker = ctx.masker

        def mask_the_official_way():
            official_mask_(masker)
            return _unit_stats(masker)

        masker.mask_ = mask_the_official_way
    step = STEP_FUNCTIONS[method]
    x = torch.rand(batch_size, *spec.shape, device=device)
    y = torch.randint(0, spec.num_classes, (batch_size,), device=device)
    for _ in range(warmup):
        step(ctx, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(ctx, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return {"provider": name, "arch": arch, "batch": batch_size, "median_ms": median * 1e3,
            "p20_ms": float(np.percentile(times, 20)) * 1e3, "p80_ms": float(np.percentile(times, 80)) * 1e3,
            "images/s": batch_size / median}


def _unit_stats(masker):
    """MaskStats-shaped results for the official path, which reports none (the step only reads their sums)."""
    from cure_kernels import MaskStats

    n = len(masker.params)
    device = masker.params[0].device
    kept = torch.tensor([q.numel() for q in masker.params], device=device)
    return MaskStats(torch.zeros(n, device=device), kept, torch.zeros(n, dtype=torch.long, device=device))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default=None, help="default: resnet18 on CUDA, cnn on CPU")
    parser.add_argument("--dataset", default=None, help="default: cifar10 on CUDA, fashion-mnist on CPU")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 5 on CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    arch = args.arch or ("resnet18" if gpu else "cnn")
    dataset = args.dataset or ("cifar10" if gpu else "fashion-mnist")
    steps = args.steps or (30 if gpu else 5)
    warmup = 5 if gpu else 1
    env = environment(device)
    rows = [time_method("trades", "trades", arch, dataset, device, args.batch_size, steps, warmup),
            time_method("cure", "cure", arch, dataset, device, args.batch_size, steps, warmup),
            time_method("cure (official masking)", "cure", arch, dataset, device, args.batch_size, steps, warmup,
                        official=True)]
    trades_ms, cure_ms = rows[0]["median_ms"], rows[1]["median_ms"]
    for r in rows:
        r["vs trades"] = r["median_ms"] / trades_ms
        r["cure speed-up"] = r["median_ms"] / cure_ms
        r.update(env)
    path = write_csv(f"step_{device.type}_{arch}.csv", rows)
    print(f"\nTraining step, {arch} on {dataset}-shaped batches of {args.batch_size}, {env['machine']} "
          f"(torch {env['torch']}, git {env['git_sha']}). 'vs trades' is step time over TRADES' "
          f"(target <= 1.35); 'cure speed-up' is step time over our CURE step's.")
    print_table(rows, ["provider", "arch", "batch", "median_ms", "p20_ms", "p80_ms", "images/s", "vs trades",
                       "cure speed-up"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
