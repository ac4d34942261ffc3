"""The cost of the per-layer statistics (cure.layer_stats): a CURE training step with and without
``LayerStats.record`` after it, round-robin in one process, and the time of ``record`` alone.

The data is random: the cost of a step does not depend on the pixel values.

Usage:  python bench/bench_layer_stats.py [--device cpu|cuda] [--arch cnn] [--batch-size N] [--steps N]
Writes bench/results/layer_stats_<device>_<arch>.csv and prints one table.
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
from cure.layer_stats import LayerStats  # noqa: E402
from cure.methods import build_step_context, cure_step  # noqa: E402
from cure.models import build_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default=None, help="default: resnet18 on CUDA, cnn on CPU")
    parser.add_argument("--dataset", default=None, help="default: cifar10 on CUDA, fashion-mnist on CPU")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 30 CUDA, 6 CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    arch = args.arch or ("resnet18" if gpu else "cnn")
    dataset = args.dataset or ("cifar10" if gpu else "fashion-mnist")
    steps = args.steps or (30 if gpu else 6)
    spec = DATASETS[dataset]
    cfg = resolve_config({"dataset": dataset, "arch": arch, "device": device.type, "batch_size": args.batch_size,
                          "progress": False, "method": "cure"})
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, *spec.shape, generator=g).to(device)
    y = torch.randint(0, spec.num_classes, (args.batch_size,), generator=g).to(device)
    contexts = {}
    for variant in ("cure", "cure + layer stats"):
        torch.manual_seed(0)
        module = build_model(arch, spec).to(device)
        contexts[variant] = build_step_context(cfg, module, eps=spec.eps, step_size=spec.step_size,
                                               attack_seed=0, revision_seed=0)
    layer_stats = LayerStats(contexts["cure + layer stats"].module)
    sums = layer_stats.zeros()
    times: dict[str, list[float]] = {v: [] for v in (*contexts, "record alone")}
    for rep in range(1 + steps):  # one untimed warm-up round
        for variant, ctx in contexts.items():
            _sync(device)
            t0 = time.perf_counter()
            result = cure_step(ctx, x, y)
            if variant != "cure":
                t1 = time.perf_counter()
                layer_stats.record(sums, result, ctx.masker)
                _sync(device)
                if rep:
                    times["record alone"].append(time.perf_counter() - t1)
            float(result.loss)  # waits for the step to finish
            if rep:
                times[variant].append(time.perf_counter() - t0)
    params = sum(q.numel() for q in contexts["cure"].module.parameters())
    base = float(np.median(times["cure"]))
    rows = []
    for variant, samples in times.items():
        median = float(np.median(samples))
        rows.append({"variant": variant, "arch": arch, "params": params, "tensors": len(layer_stats.names),
                     "batch": args.batch_size, "median_ms": median * 1e3,
                     "p20_ms": float(np.percentile(samples, 20)) * 1e3,
                     "p80_ms": float(np.percentile(samples, 80)) * 1e3, "vs cure step": median / base})
    env = environment(device)
    for r in rows:
        r.update(env)
    path = write_csv(f"layer_stats_{device.type}_{arch}.csv", rows)
    print(f"\nPer-layer statistics, CURE step of {arch} ({params} parameters) on {dataset}-shaped batches of "
          f"{args.batch_size}, {env['machine']} (torch {env['torch']}, git {env['git_sha']}); median of {steps} "
          f"steps, round-robin.")
    print_table(rows, ["variant", "tensors", "median_ms", "p20_ms", "p80_ms", "vs cure step"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
