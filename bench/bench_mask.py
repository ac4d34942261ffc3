"""Mask-pass and revision-pass benchmark: our backends against what users would otherwise run.

Providers, all in one process on the same gradients (real parameter shapes of the models):
  official        per tensor: copy the score to the host, numpy.percentile, mask (the official CURE code path)
  torch-kthvalue  per tensor on the device: two torch.kthvalue calls + numpy's interpolation formula
  torch-sort      per tensor on the device: torch.sort + the formula
  torch-quantile  per tensor on the device: torch.quantile (refuses tensors above 2^24 elements)
  cure-<backend>  cure_kernels.rgp_mask_ with each fast backend that runs on the device

  cure-cpu@<sha>  the CPU kernel as of bench.common.BASELINE_COMMIT (before the one-read selection), built
                  from git under its own op namespace: the old/new comparison in one process

Usage:  python bench/bench_mask.py [--device cpu|cuda] [--models resnet18,wrn-34-10,large] [--data random,zeros30]
                                   [--threads 2] [--providers official,cure-cpu,cure-cpu@] [--reps N]
On the CPU the providers' repetitions are interleaved (round robin). Results are merged into
bench/results/mask_<device>.csv by (bench, model, provider, device, threads, data); prints one table.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cure_kernels as ck  # noqa: E402
from bench.common import (  # noqa: E402
    BASELINE_COMMIT,
    environment,
    load_cpu_mask_baseline,
    print_table,
    time_fn,
    time_round_robin,
    write_csv,
)
from cure_kernels import reference  # noqa: E402

ALPHA, P = 0.1, 0.3
BYTES_PER_PARAM_MASK = 16  # read g_nat, g_adv and the update (fp32), write the update: the one-pass floor


def param_shapes(model_name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of our CIFAR-10 model, or one > 2^24-element tensor next to small ones."""
    if model_name == "large":
        return [(4096, 4097), (4097,), (4096,), (1024, 1024)]  # 16.8 M elements: above torch.quantile's limit
    from cure.data import DATASETS
    from cure.models import build_model

    model = build_model(model_name, DATASETS["cifar10"])
    return [tuple(q.shape) for q in model.parameters()]


def _scores(gn: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
    return ALPHA * gn.abs() + (1 - ALPHA) * ga.abs()


def _threshold_from(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    h = (n - 1) * P
    g = h - math.floor(h)
    d = b - a
    return a + d * np.float32(g) if g < 0.5 else b - d * np.float32(1 - g)


def official(updates, nat, adv):
    for u, gn, ga in zip(updates, nat, adv):
        s = _scores(gn, ga)
        thr = np.percentile(s.cpu().numpy(), P * 100)
        u[s < torch.tensor(thr, device=s.device)] = 0


def torch_kthvalue(updates, nat, adv):
    for u, gn, ga in zip(updates, nat, adv):
        s = _scores(gn, ga).reshape(-1)
        n = s.numel()
        k = math.floor((n - 1) * P)
        if k >= n - 1:
            a = b = s.max()
        else:
            a, b = torch.kthvalue(s, k + 1).values, torch.kthvalue(s, k + 2).values
        u[s.view_as(u) < _threshold_from(a, b, n)] = 0


def torch_sort(updates, nat, adv):
    for u, gn, ga in zip(updates, nat, adv):
        s = _scores(gn, ga).reshape(-1)
        v = torch.sort(s).values
        n = s.numel()
        k = min(math.floor((n - 1) * P), n - 1)
        u[s.view_as(u) < _threshold_from(v[k], v[min(k + 1, n - 1)], n)] = 0


def torch_quantile(updates, nat, adv):
    for u, gn, ga in zip(updates, nat, adv):
        s = _scores(gn, ga)
        u[s < torch.quantile(s.reshape(-1), P)] = 0


BASELINES = {"official": official, "torch-kthvalue": torch_kthvalue, "torch-sort": torch_sort,
             "torch-quantile": torch_quantile}


def _our_backends(device: torch.device) -> list[str]:
    # Triton's interpreter is a test vehicle, not a CPU backend: time Triton on GPUs only.
    return [b for b in ck.available_backends(device)
            if b != "reference" and not (b == "triton" and device.type == "cpu")]


def _mask_with(backend: str):
    return lambda u, n, a: ck.rgp_mask_(u, n, a, alpha=ALPHA, p=P, backend=backend)


def _before_provider() -> dict:
    """The CPU kernel before the one-read selection (bench.common.BASELINE_COMMIT), when it builds here."""
    op = load_cpu_mask_baseline()
    if op is None:
        return {}
    return {f"cure-cpu@{BASELINE_COMMIT}": lambda u, n, a: op(u, n, a, ALPHA, P)}


def gradients(shapes: list[tuple[int, ...]], data: str, device: torch.device, seed: int = 0):
    """g_nat, g_adv and an update per shape. data "random": normal entries; "zeros30": the same 30 % of
    the entries of g_nat and g_adv exactly zero (scores exactly 0, as behind dead units)."""
    gen = torch.Generator().manual_seed(seed)
    nat = [torch.randn(s, generator=gen) for s in shapes]
    adv = [torch.randn(s, generator=gen) for s in shapes]
    if data == "zeros30":
        for a, b in zip(nat, adv):
            dead = torch.rand(a.shape, generator=gen) < 0.3
            a[dead] = 0.0
            b[dead] = 0.0
    elif data != "random":
        raise ValueError(f"unknown data kind {data!r}; choose random or zeros30")
    updates = [torch.randn(s, generator=gen) for s in shapes]
    return [[t.to(device) for t in ts] for ts in (nat, adv, updates)]


def bench_model(model_name: str, device: torch.device, reps: int, env: dict, data: str = "random",
                providers: list[str] | None = None, revise: bool = True) -> list[dict]:
    shapes = param_shapes(model_name)
    n_params = sum(math.prod(s) for s in shapes)
    common = {"model": model_name, "data": data, "threads": torch.get_num_threads(), "device": device.type,
              "params_M": n_params / 1e6, "tensors": len(shapes)}
    nat, adv, original = gradients(shapes, data, device)
    updates = [o.clone() for o in original]
    expected = [o.clone() for o in original]
    reference.rgp_mask_reference(expected, nat, adv, ALPHA, P)

    def restore():
        for u, o in zip(updates, original):
            u.copy_(o)

    candidates = dict(BASELINES) | {f"cure-{b}": _mask_with(b) for b in _our_backends(device)}
    if device.type == "cpu" and (providers is None or any("@" in p for p in providers)):
        candidates |= _before_provider()
    if providers is not None:
        # "cure-cpu@" selects the baseline build whatever its commit
        candidates = {k: v for k, v in candidates.items()
                      if k in providers or ("@" in k and k.split("@")[0] + "@" in providers)}
    rows, timed = [], {}
    for name, fn in candidates.items():
        try:
            restore()
            fn(updates, nat, adv)
        except RuntimeError as exc:  # e.g. torch.quantile on more than 2^24 elements
            rows.append({"bench": "mask", **common, "provider": name, "note": str(exc).split("\n")[0][:60], **env})
            continue
        exact = all(torch.equal(u, e) for u, e in zip(updates, expected))
        timed[name] = (functools.partial(fn, updates, nat, adv), exact)
    if device.type == "cpu":  # interleaved repetitions: a shared machine's load hits every provider alike
        timings = time_round_robin({k: f for k, (f, _) in timed.items()}, reps=reps, setup=restore)
    else:
        timings = {k: time_fn(f, device, reps=reps, setup=restore) for k, (f, _) in timed.items()}
    official_ms = timings["official"].median_ms if "official" in timings else None
    for name, (_, exact) in timed.items():
        t = timings[name]
        rows.append({"bench": "mask", **common, "provider": name, "median_ms": t.median_ms, "p20_ms": t.p20_ms,
                     "p80_ms": t.p80_ms, "GB/s": n_params * BYTES_PER_PARAM_MASK / (t.median_ms * 1e-3) / 1e9,
                     "speed-up": official_ms / t.median_ms if official_ms else None, "exact": exact, **env})
        print(f"  {model_name:10s} {data:8s} {name:22s} {t.median_ms:9.3f} ms  exact={exact}", file=sys.stderr)
    if not revise:
        return rows

    # Revision pass: rev <- d*rev + (1-d)*param over all tensors (read 2, write 1: 12 B/param).
    revision = [o.clone() for o in original]

    def foreach():
        torch._foreach_mul_(revision, 0.999)
        torch._foreach_add_(revision, nat, alpha=0.001)

    revisers = {"torch-foreach": foreach} | {f"cure-{b}": functools.partial(ck.revise_, revision, nat, decay=0.999,
                                                                           backend=b) for b in _our_backends(device)}
    base_ms = None
    for name, fn in revisers.items():
        t = time_fn(fn, device, reps=reps)
        base_ms = base_ms or t.median_ms
        rows.append({"bench": "revise", **common, "provider": name, "median_ms": t.median_ms, "p20_ms": t.p20_ms,
                     "p80_ms": t.p80_ms, "GB/s": n_params * 12 / (t.median_ms * 1e-3) / 1e9,
                     "speed-up": base_ms / t.median_ms, "exact": None, **env})
    return rows


CSV_KEY = ["bench", "model", "provider", "device", "threads", "data"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="resnet18,wrn-34-10",
                        help="comma-separated: resnet18, preact-resnet18, wrn-34-10, large")
    parser.add_argument("--data", default="random", help="comma-separated: random, zeros30 (30 %% exact zeros)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset to time (default: all), e.g. official,cure-cpu,cure-cpu@")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: unchanged)")
    parser.add_argument("--no-revise", action="store_true", help="skip the revision-pass rows")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7 on CPU, 50 on CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (50 if device.type == "cuda" else 7)
    providers = args.providers.split(",") if args.providers else None
    env = environment(device)
    rows = [row for name in args.models.split(",") for data in args.data.split(",")
            for row in bench_model(name, device, reps, env, data, providers, not args.no_revise)]
    path = write_csv(f"mask_{device.type}.csv", rows, key=CSV_KEY)
    print(f"\nRGP mask and revision passes on {env['machine']} (torch {env['torch']}, git {env['git_sha']}); "
          f"alpha={ALPHA}, p={P}.\nGB/s counts 16 B/param for the mask (read 3 fp32, write 1) and 12 for revise; "
          f"speed-up is over the official path (mask) or torch-foreach (revise).")
    print_table(rows, ["bench", "model", "data", "threads", "params_M", "tensors", "provider", "median_ms", "p20_ms",
                       "p80_ms", "GB/s", "speed-up", "exact", "note"])
    print(f"\nwrote {path} (merged by {', '.join(CSV_KEY)})")


if __name__ == "__main__":
    main()
