"""End-to-end training-step benchmark: the time of one step of each method, side by side in one process.

Variants (same model, batch, attack and device):
  st, at, trades                the baselines (TRADES is the method CURE extends)
  cure                          CURE with our fused mask and revision ops
  cure (official masking)       CURE whose mask is done the official code's way (per tensor: copy the
                                score to the host, then numpy.percentile)
  cure --no-mask, cure --no-revision   CURE's two ablations

Steps run round-robin (A, B, C, A, B, C, ...) so that a change in machine load hits every variant alike.
The data is random: the cost of a step does not depend on the pixel values.

Usage:  python bench/bench_step.py [--device cpu|cuda] [--arch cnn|resnet18|...] [--batch-size N] [--steps N]
        [--variants trades,cure,...] [--amp]
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

OFFICIAL = "cure (official masking)"
VARIANTS = {
    "st": {"method": "st"},
    "at": {"method": "at"},
    "trades": {"method": "trades"},
    "cure": {"method": "cure"},
    OFFICIAL: {"method": "cure"},
    "cure --no-mask": {"method": "cure", "no_mask": True},
    "cure --no-revision": {"method": "cure", "no_revision": True},
}


def official_mask_(masker) -> None:
    """The official code's conserve step: per tensor, the score to the host and numpy.percentile."""
    for q, g_nat, g_adv in zip(masker.params, masker.grads_nat, masker.grads_adv):
        s = masker.alpha * g_nat.abs() + (1 - masker.alpha) * g_adv.abs()
        thr = np.percentile(s.float().cpu().numpy(), masker.p * 100)
        q.grad[s < torch.tensor(thr, device=s.device)] = 0


def build_context(variant: str, arch: str, dataset: str, device: torch.device, batch_size: int, amp: bool):
    """The step function and its context for one variant, on a freshly initialised model (seed 0)."""
    torch.manual_seed(0)
    spec = DATASETS[dataset]
    cfg = resolve_config({"dataset": dataset, "arch": arch, "device": device.type, "batch_size": batch_size,
                          "amp": amp, "progress": False, **VARIANTS[variant]})
    module = build_model(arch, spec).to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    ctx = build_step_context(cfg, module, eps=spec.eps, step_size=spec.step_size, attack_seed=0, revision_seed=0)
    step = STEP_FUNCTIONS[cfg.method]
    if variant == OFFICIAL:
        step = _with_official_update(step, ctx)
    return step, ctx


def _with_official_update(step, ctx):
    """``step`` with CURE's fused update (one :func:`cure_kernels.rgp_sgd_step_` call) replaced, for the
    duration of the step, by the official code's sequence: the mask through numpy.percentile per tensor,
    then PyTorch's fused SGD, then the revision EMA through foreach ops."""
    import cure.methods

    masker = ctx.masker

    def official_update(params, grads, grads_nat, grads_adv, momentum_buffers, *, revision, decay, skip, **_):
        official_mask_(masker)
        ctx.found_inf.copy_(skip)
        ctx.optimizer.step()
        if revision is not None:
            with torch.no_grad():
                torch._foreach_mul_(revision, decay)
                torch._foreach_add_(revision, params, alpha=1 - decay)
        return _unit_stats(masker)

    def official_step(ctx_, x, y):
        fused = cure.methods.rgp_sgd_step_
        cure.methods.rgp_sgd_step_ = official_update
        try:
            return step(ctx_, x, y)
        finally:
            cure.methods.rgp_sgd_step_ = fused

    return official_step


def time_variants(variants: list[str], arch: str, dataset: str, device: torch.device, batch_size: int,
                  steps: int, warmup: int, amp: bool) -> list[dict]:
    spec = DATASETS[dataset]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, *spec.shape, generator=g).to(device)
    y = torch.randint(0, spec.num_classes, (batch_size,), generator=g).to(device)
    built = {v: build_context(v, arch, dataset, device, batch_size, amp) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(warmup + steps):
        for v in variants:
            step, ctx = built[v]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = step(ctx, x, y)
            float(result.loss)  # waits for the step to finish
            if rep >= warmup:
                times[v].append(time.perf_counter() - t0)
    rows = []
    for v in variants:
        median = float(np.median(times[v]))
        rows.append({"provider": v, "arch": arch, "batch": batch_size, "median_ms": median * 1e3,
                     "p20_ms": float(np.percentile(times[v], 20)) * 1e3,
                     "p80_ms": float(np.percentile(times[v], 80)) * 1e3, "images/s": batch_size / median})
    return rows


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
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    arch = args.arch or ("resnet18" if gpu else "cnn")
    dataset = args.dataset or ("cifar10" if gpu else "fashion-mnist")
    steps = args.steps or (30 if gpu else 5)
    warmup = 5 if gpu else 1
    env = environment(device)
    rows = time_variants(variants, arch, dataset, device, args.batch_size, steps, warmup, args.amp)
    by_name = {r["provider"]: r["median_ms"] for r in rows}
    for r in rows:
        r["vs trades"] = r["median_ms"] / by_name["trades"] if "trades" in by_name else float("nan")
        r["vs cure"] = r["median_ms"] / by_name["cure"] if "cure" in by_name else float("nan")
        r.update(env)
    path = write_csv(f"step_{device.type}_{arch}.csv", rows)
    print(f"\nTraining step, {arch} on {dataset}-shaped batches of {args.batch_size}{' (amp)' if args.amp else ''}, "
          f"{env['machine']} (torch {env['torch']}, git {env['git_sha']}); median of {steps} steps, round-robin. "
          f"'vs trades' and 'vs cure' are step time over TRADES' (target for cure <= 1.25) and over our CURE step's.")
    print_table(rows, ["provider", "arch", "batch", "median_ms", "p20_ms", "p80_ms", "images/s", "vs trades",
                       "vs cure"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
