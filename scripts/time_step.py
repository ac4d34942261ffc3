"""Time one training step of each method (and CURE's ablations) on one model, side by side in one process.

    .venv/bin/python scripts/time_step.py          # cnn, Fashion-MNIST, batch 128, CPU
    .venv/bin/python scripts/time_step.py --arch resnet18 --dataset cifar10 --device cuda --amp

Steps are interleaved round-robin (method A, B, C, A, B, C, ...) so that a change in machine load hits
every method alike; the median over the repetitions is reported with the ratio to TRADES, the method
CURE extends. The data is random (the cost of a step does not depend on the pixel values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cure.config import resolve_config
from cure.data import DATASETS
from cure.methods import STEP_FUNCTIONS, build_step_context
from cure.models import build_model

VARIANTS = {
    "st": {"method": "st"},
    "at": {"method": "at"},
    "trades": {"method": "trades"},
    "cure": {"method": "cure"},
    "cure --no-mask": {"method": "cure", "no_mask": True},
    "cure --no-revision": {"method": "cure", "no_revision": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kernel-backend", default="auto")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS)
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    spec = DATASETS[args.dataset]
    g = torch.Generator().manual_seed(0)
    x = torch.rand((args.batch_size, *spec.shape), generator=g).to(device)
    y = torch.randint(0, spec.num_classes, (args.batch_size,), generator=g).to(device)
    names = [v.strip() for v in args.variants.split(",")]
    contexts = {}
    for name in names:
        cfg = resolve_config(
            {
                "dataset": args.dataset,
                "arch": args.arch,
                "attack_steps": args.attack_steps,
                "amp": args.amp,
                "kernel_backend": args.kernel_backend,
                **VARIANTS[name],
            }
        )
        torch.manual_seed(0)
        module = build_model(args.arch, spec).to(device)
        contexts[name] = build_step_context(
            cfg, module, eps=spec.eps, step_size=spec.step_size, attack_seed=1, revision_seed=2
        )
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.warmup + args.repeats):
        for name in names:
            ctx = contexts[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = STEP_FUNCTIONS[ctx.cfg.method](ctx, x, y)
            float(result.loss)  # wait for the step to finish
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["trades"]) if "trades" in times else None
    print(
        f"{args.arch} on {args.dataset}, batch {args.batch_size}, K={args.attack_steps}, {device}, "
        f"torch threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    for name in names:
        med = statistics.median(times[name])
        ratio = f"{med / base:5.2f}x trades" if base else ""
        print(f"  {name:<20} {1000 * med:9.1f} ms/step  (min {1000 * min(times[name]):.1f})  {ratio}")


if __name__ == "__main__":
    main()
