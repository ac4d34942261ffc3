"""How often does the sampling bracket of the exact selection miss on real gradients?

The selection (docs/selection.md, csrc/cpu/select_cpu.cpp) brackets each large tensor's order statistics
v[k], v[k+1] between two keys lo <= hi taken from a fixed sample of the scores, counts and compacts in one
pass, and falls back to the radix path when a rank lands outside [lo, hi] or the candidates overflow.
:func:`bracket_outcome` mirrors that algorithm exactly with the CPU kernel's constants (the same sample
positions, sample ranks, capacity), in PyTorch; it is checked against the kernel's own path counters
(``torch.ops.cure.cpu_selection_counters``) in tests/test_cpu_backend.py and in every run below.

Two workloads:
  cnn       CURE steps of the ``cnn`` on a Fashion-MNIST subset exactly as ``cure train`` takes them (CPU):
            every mask call's tensors (real CURE gradients).
  resnet18  a randomly initialised ResNet-18 on synthetic CIFAR-shaped batches, a few SGD steps; g_nat from
            the clean batch, g_adv from a sign-perturbed copy (eps 8/255).
Reported per workload: tensor-steps, how many took the bracket (n >= BRACKET_MIN), its hits and misses
(the fallback rate per tensor-step), and the mean candidate fraction.

Usage:  python bench/bracket_hit_rate.py [--steps 100] [--resnet-steps 4] [--train-samples 4096]
Writes (merges into) bench/results/bracket_hit_rate.csv and writes bench/results/bracket_hit_rate.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The CPU kernel's constants (csrc/cpu/select_cpu.cpp).
BRACKET_MIN = 1 << 16  # tensors below this take the direct exact path
TILE, TILES = 64, 256  # the sample: TILES tiles of TILE contiguous scores
SAMPLE = TILE * TILES
SIGMAS = 5.0
CANDIDATE_DIVISOR = 16  # candidate capacity n // 16


def sample_index(n: int) -> torch.Tensor:
    """Positions of the sampled scores: tile t starts at floor(t*n/TILES) rounded down to a multiple of TILE."""
    starts = torch.tensor([(t * n // TILES) // TILE * TILE for t in range(TILES)], dtype=torch.int64)
    return (starts[:, None] + torch.arange(TILE)[None, :]).reshape(-1)


def _sample_rank_below(rank: int, n: int) -> int:
    f = rank / n
    return math.floor(SAMPLE * f - SIGMAS * math.sqrt(SAMPLE * f * (1.0 - f))) - 1


def _sample_rank_above(rank: int, n: int) -> int:
    f = rank / n
    return math.ceil(SAMPLE * f + SIGMAS * math.sqrt(SAMPLE * f * (1.0 - f))) + 1


def bracket_keys(scores: torch.Tensor, p: float) -> tuple[int, int, int, int, int]:
    """(lo, hi, #keys < lo, #keys == lo, #keys in (lo, hi]) of the CPU kernel's bracket for one tensor of at
    least BRACKET_MIN non-NaN scores: the bracket keys are uint32 bit patterns of scores."""
    keys = _keys(scores)
    n = keys.numel()
    r0, r1 = _ranks(n, p)
    sample = torch.sort(keys[sample_index(n)]).values
    r_lo, r_hi = _sample_rank_below(r0, n), _sample_rank_above(r1, n)
    lo = int(sample[r_lo]) if r_lo >= 0 else 0
    hi = int(sample[r_hi]) if r_hi <= SAMPLE - 1 else 0xFFFFFFFF
    return lo, hi, int((keys < lo).sum()), int((keys == lo).sum()), int(((keys > lo) & (keys <= hi)).sum())


def _keys(scores: torch.Tensor) -> torch.Tensor:
    s = scores.detach().reshape(-1).float().cpu()
    return s.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # the uint32 bit patterns (scores are >= +0)


def _ranks(n: int, p: float) -> tuple[int, int]:
    k = math.floor((n - 1) * p)
    return (n - 1, n - 1) if k >= n - 1 else (k, k + 1)


def bracket_outcome(scores: torch.Tensor, p: float) -> tuple[str, float]:
    """(path, candidates / n) of one tensor's selection in the CPU kernel: path is "empty", "direct"
    (n < BRACKET_MIN), "nonfinite" (a NaN score), "bracket" (hit) or "fallback" (miss)."""
    s = scores.detach().reshape(-1).float().cpu()
    n = s.numel()
    if n == 0:
        return "empty", 0.0
    if bool(torch.isnan(s).any()):
        return "nonfinite", 0.0
    if n < BRACKET_MIN:
        return "direct", 0.0
    lo, hi, lt, eq, mid = bracket_keys(s, p)
    r0, r1 = _ranks(n, p)
    if mid > n // CANDIDATE_DIVISOR or r0 < lt or r1 >= lt + eq + mid:
        return "fallback", mid / n
    return "bracket", mid / n


class Tally:
    """Outcomes of every (step, tensor) of one workload, and the kernel's counters for the same calls."""

    def __init__(self) -> None:
        self.paths: dict[str, int] = {}
        self.candidates: list[float] = []
        self.kernel = torch.zeros(5, dtype=torch.int64)
        self.steps = 0

    def add(self, scores: list[torch.Tensor], p: float) -> None:
        for s in scores:
            path, frac = bracket_outcome(s, p)
            self.paths[path] = self.paths.get(path, 0) + 1
            if path in ("bracket", "fallback"):
                self.candidates.append(frac)

    def row(self, workload: str, p: float, note: str) -> dict:
        hits, misses = self.paths.get("bracket", 0), self.paths.get("fallback", 0)
        kernel = dict(zip(("empty", "direct", "bracket", "fallback", "nonfinite"), self.kernel.tolist()))
        return {"workload": workload, "p": p, "steps": self.steps, "tensor_steps": sum(self.paths.values()),
                "bracket_tensor_steps": hits + misses, "hits": hits, "misses": misses,
                "miss_rate": misses / max(hits + misses, 1),
                "mean_candidates_per_n": sum(self.candidates) / max(len(self.candidates), 1),
                "max_candidates_per_n": max(self.candidates, default=0.0),
                "direct_tensor_steps": self.paths.get("direct", 0), "nonfinite": self.paths.get("nonfinite", 0),
                "kernel_hits": kernel["bracket"], "kernel_misses": kernel["fallback"], "note": note}


def _counters(reset: bool = True) -> torch.Tensor:
    return torch.ops.cure.cpu_selection_counters(reset)


def run_cnn(args: argparse.Namespace) -> Tally:
    from cure.config import resolve_config
    from cure.data import DATASETS, BatchLoader, deterministic_subset, load_split
    from cure.methods import STEP_FUNCTIONS, build_step_context
    from cure.models import build_model
    from cure_kernels.reference import rgp_scores

    spec = DATASETS["fashion-mnist"]
    cfg = resolve_config({"method": "cure", "dataset": "fashion-mnist", "arch": "cnn", "device": "cpu",
                          "batch_size": args.batch_size, "attack_steps": args.attack_steps, "progress": False})
    images, labels = load_split("fashion-mnist", args.data_root, train=True)
    images, labels = deterministic_subset(images, labels, args.train_samples, seed=0)
    loader = BatchLoader(images, labels, batch_size=cfg.batch_size, shuffle=True, augment=spec.augment,
                         device=torch.device("cpu"), drop_last=True)
    module = build_model("cnn", spec)
    ctx = build_step_context(cfg, module, eps=spec.eps, step_size=spec.step_size, attack_seed=args.seed,
                             revision_seed=args.seed)
    masker = ctx.masker
    tally = Tally()
    import cure.methods

    fused = cure.methods.rgp_sgd_step_

    def recording_step_(*args, **kwargs):
        """The trainer's fused update, with the selection path of every tensor recorded."""
        scores = [rgp_scores(a, b, masker.alpha) for a, b in zip(masker.grads_nat, masker.grads_adv)]
        _counters()
        stats = fused(*args, **kwargs)
        tally.kernel += _counters()
        tally.add(scores, masker.p)
        tally.steps += 1
        return stats

    cure.methods.rgp_sgd_step_ = recording_step_
    step_fn = STEP_FUNCTIONS["cure"]
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    while tally.steps < args.steps:
        for x, y in loader.epoch(gen):
            step_fn(ctx, x, y)
            if tally.steps % 25 == 0:
                print(f"cnn step {tally.steps}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            if tally.steps >= args.steps:
                break
    cure.methods.rgp_sgd_step_ = fused
    tally.p = masker.p
    return tally


def run_resnet18(args: argparse.Namespace, p: float, alpha: float) -> Tally:
    import cure_kernels as ck
    from cure.data import DATASETS
    from cure.models import build_model
    from cure_kernels.reference import rgp_scores

    torch.manual_seed(args.seed)
    model = build_model("resnet18", DATASETS["cifar10"])
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)
    tally = Tally()
    start = time.perf_counter()
    for step in range(args.resnet_steps):
        x = torch.rand(args.resnet_batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (args.resnet_batch,), generator=gen)
        x_adv = (x + 8 / 255 * torch.sign(torch.randn(x.shape, generator=gen))).clamp(0, 1)
        grads = []
        for inp in (x, x_adv):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(inp), y).backward()
            grads.append([q.grad.detach().clone() for q in params])
        nat, adv = grads
        updates = [g.clone() for g in adv]
        _counters()
        ck.rgp_mask_(updates, nat, adv, alpha=alpha, p=p, backend="cpu")
        tally.kernel += _counters()
        tally.add([rgp_scores(a, b, alpha) for a, b in zip(nat, adv)], p)
        tally.steps += 1
        for q, u in zip(params, updates):
            q.grad = u
        opt.step()
        print(f"resnet18 step {step + 1}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return tally


def main(argv: list[str] | None = None) -> None:
    from bench.common import environment, print_table, write_csv

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="CURE steps of the cnn on Fashion-MNIST")
    parser.add_argument("--resnet-steps", type=int, default=4)
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--train-samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", default="cnn,resnet18")
    args = parser.parse_args(argv)
    env = environment(torch.device("cpu"))
    rows = []
    for workload in args.workloads.split(","):
        if workload == "cnn":
            tally = run_cnn(args)
            rows.append(tally.row("cnn / fashion-mnist (CURE steps)", tally.p,
                                  f"batch {args.batch_size}, {args.train_samples} samples, PGD-{args.attack_steps}"))
        elif workload == "resnet18":
            for p in (0.3,):
                tally = run_resnet18(args, p, 0.1)
                rows.append(tally.row("resnet18 random init / synthetic cifar", p,
                                      f"batch {args.resnet_batch}, sign-perturbed eps 8/255"))
        else:
            raise SystemExit(f"unknown workload {workload!r}; choose from cnn, resnet18")
    rows = [{**r, **env} for r in rows]
    for r in rows:
        if (r["kernel_hits"], r["kernel_misses"]) != (r["hits"], r["misses"]):
            raise SystemExit(f"the mirror disagrees with the kernel's counters: {r}")
    columns = ["workload", "p", "steps", "tensor_steps", "bracket_tensor_steps", "hits", "misses", "miss_rate",
               "mean_candidates_per_n", "max_candidates_per_n", "direct_tensor_steps"]
    print_table(rows, columns)
    path = write_csv("bracket_hit_rate.csv", rows, key=["workload", "p"])
    md = os.path.join(os.path.dirname(path), "bracket_hit_rate.md")
    with open(md, "w") as fh:
        fh.write("# Sampling-bracket miss rate per tensor-step (CPU kernel constants)\n\n")
        fh.write(f"`python bench/bracket_hit_rate.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
                 f"git {env['git_sha']}, torch {env['torch']}.\n\n")
        fh.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
        for r in rows:
            fh.write("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns)
                     + " |\n")
    print(f"wrote {path} and {md}")


if __name__ == "__main__":
    main()
