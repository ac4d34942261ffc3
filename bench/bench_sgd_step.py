"""Fused CURE step benchmark on the CPU: rgp_sgd_step_ against mask + torch.optim.SGD(fused=True).

Providers, interleaved repetitions in one process, on the same gradients (parameter shapes of the models):
  mask@<sha>+sgd-fused   the CPU mask kernel as of bench.common.BASELINE_COMMIT (before the one-read selection),
                         then torch.optim.SGD(fused=True) (momentum, weight decay): what a trainer ran before
  mask+sgd-fused         today's cure_kernels.rgp_mask_(backend="cpu"), then the same SGD step
  step                   cure_kernels.rgp_sgd_step_(backend="cpu"): mask + SGD in one op, no revision
  step+skip              the same with skip= (selection of every tensor before any parameter is written)
  step+skip+revision     the same with the revision EMA
``vs before`` is each provider's median over the first provider's. ``exact`` (for the fused op): bit for bit
equal to cure_kernels.sgd_step.rgp_sgd_step_reference on the first repetition's inputs.

Usage:  python bench/bench_sgd_step.py [--models resnet18,wrn-34-10,large] [--data random,zeros30] [--threads 2]
                                       [--reps 7]
Results are merged into bench/results/sgd_step_cpu.csv by (bench, model, provider, device, threads, data).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cure_kernels as ck  # noqa: E402
from bench.bench_mask import gradients, param_shapes  # noqa: E402
from bench.common import (  # noqa: E402
    BASELINE_COMMIT,
    environment,
    load_cpu_mask_baseline,
    print_table,
    time_round_robin,
    write_csv,
)

ALPHA, P = 0.1, 0.3
HYPER = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
CSV_KEY = ["bench", "model", "provider", "device", "threads", "data"]


def _bits(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.view(torch.int32) for t in ts]


def check_exact(nat, adv, grads0, params0, bufs0, **kw) -> bool:
    lists = [[t.clone() for t in ts] for ts in (params0, grads0, bufs0)]
    expected = [[t.clone() for t in ts] for ts in (params0, grads0, bufs0)]
    got = ck.rgp_sgd_step_(lists[0], lists[1], nat, adv, lists[2], alpha=ALPHA, p=P, backend="cpu", **HYPER, **kw)
    exp = ck.rgp_sgd_step_(expected[0], expected[1], nat, adv, expected[2], alpha=ALPHA, p=P, backend="reference",
                           **HYPER, **kw)
    same = torch.equal(got.thresholds.view(torch.int32), exp.thresholds.view(torch.int32))
    return same and all(torch.equal(x, y) for a, b in zip(lists, expected) for x, y in zip(_bits(a), _bits(b)))


def bench_model(model: str, data: str, reps: int, env: dict) -> list[dict]:
    shapes = param_shapes(model)
    n_params = sum(math.prod(s) for s in shapes)
    common = {"bench": "sgd_step", "model": model, "data": data, "threads": torch.get_num_threads(), "device": "cpu",
              "params_M": n_params / 1e6, "tensors": len(shapes)}
    nat, adv, grads0 = gradients(shapes, data, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    params0 = [torch.randn(s, generator=gen) for s in shapes]
    bufs0 = [0.1 * torch.randn(s, generator=gen) for s in shapes]
    exact = check_exact(nat, adv, grads0, params0, bufs0, skip=torch.tensor(False))

    # torch.optim.SGD(fused=True) over leaf parameters whose .grad is the update gradient.
    leaves = [q.clone().requires_grad_() for q in params0]
    opt = torch.optim.SGD(leaves, fused=True, **HYPER)
    for q, b in zip(leaves, bufs0):
        opt.state[q]["momentum_buffer"] = b.clone()
    grads = [g.clone() for g in grads0]
    for q, g in zip(leaves, grads):
        q.grad = g
    params = [q.clone() for q in params0]
    bufs = [b.clone() for b in bufs0]
    revision = [q.clone() for q in params0]
    skip = torch.tensor(False)

    def restore():
        for g, g0 in zip(grads, grads0):
            g.copy_(g0)

    def step(**kw):
        return lambda: ck.rgp_sgd_step_(params, grads, nat, adv, bufs, alpha=ALPHA, p=P, backend="cpu", **HYPER,
                                        **kw)

    providers = {}
    before = load_cpu_mask_baseline()
    if before is not None:
        providers[f"mask@{BASELINE_COMMIT}+sgd-fused"] = lambda: (before(grads, nat, adv, ALPHA, P), opt.step())
    providers["mask+sgd-fused"] = lambda: (ck.rgp_mask_(grads, nat, adv, alpha=ALPHA, p=P, backend="cpu"),
                                           opt.step())
    providers["step"] = step()
    providers["step+skip"] = step(skip=skip)
    providers["step+skip+revision"] = step(skip=skip, revision=revision, decay=0.999)
    timings = time_round_robin(providers, reps=reps, setup=restore)
    first = next(iter(timings.values())).median_ms
    rows = []
    for name, t in timings.items():
        rows.append({**common, "provider": name, "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                     "vs before": t.median_ms / first, "exact": exact if name.startswith("step") else None, **env})
        print(f"  {model:10s} {data:8s} {name:28s} {t.median_ms:9.3f} ms", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18", help="comma-separated: resnet18, wrn-34-10, large")
    parser.add_argument("--data", default="random", help="comma-separated: random, zeros30")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: unchanged)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    rows = [r for m in args.models.split(",") for d in args.data.split(",") for r in bench_model(m, d, args.reps, env)]
    path = write_csv("sgd_step_cpu.csv", rows, key=CSV_KEY)
    print(f"\nCURE parameter step (mask + SGD) on {env['machine']} (torch {env['torch']}, git {env['git_sha']}); "
          f"alpha={ALPHA}, p={P}, {HYPER}.")
    print_table(rows, ["model", "data", "threads", "params_M", "provider", "median_ms", "p20_ms", "p80_ms",
                       "vs before", "exact"])
    print(f"\nwrote {path} (merged by {', '.join(CSV_KEY)})")


if __name__ == "__main__":
    main()
