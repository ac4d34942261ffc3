"""How often would last step's threshold bracket this step's? Data for a single-pass selection mode.

The idea: instead of the radix levels, bracket each tensor's threshold by [lo, hi] = [(1 - w) t_prev,
(1 + w) t_prev] around the previous step's threshold t_prev, count in the first pass the elements with
s < lo and with lo <= s <= hi (keeping the latter as candidates), and when ranks k and k + 1 fall inside
the bracket, i.e.

    below = #{s < lo} <= k   and   below + inside = #{s <= hi} >= k + 2      (0-based ranks k, k + 1),

select v[k] and v[k + 1] exactly among the candidates; otherwise fall back to the radix levels.

This script trains the ``cnn`` on a Fashion-MNIST subset with CURE steps exactly as ``cure train`` takes
them (cure.methods.build_step_context and STEP_FUNCTIONS["cure"], CPU), records every tensor's exact
threshold (MaskStats.thresholds) and scores each step, and reports per bracket width w the fraction of
(step, tensor) pairs where the bracket holds, and the mean number of candidates it holds (as a fraction
of n) over the hits and over all pairs. When t_prev = 0 (over a fraction p of the gradient exactly zero,
common in layers behind dead ReLUs) the bracket is [0, 0]: it holds when zeros still cover ranks k and
k + 1. A non-finite t_prev counts as a miss.

Usage:  python bench/bracket_hit_rate.py [--steps 300] [--train-samples 4096] [--batch-size 128]
Writes bench/results/bracket_hit_rate.csv and prints the table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, print_table, write_csv  # noqa: E402
from cure.config import resolve_config  # noqa: E402
from cure.data import DATASETS, BatchLoader, deterministic_subset, load_split  # noqa: E402
from cure.methods import STEP_FUNCTIONS, build_step_context  # noqa: E402
from cure.models import build_model  # noqa: E402
from cure_kernels.reference import rgp_scores  # noqa: E402

WIDTHS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def _ranks(n: int, p: float) -> tuple[int, int]:
    k = math.floor((n - 1) * p)
    return (n - 1, n - 1) if k >= n - 1 else (k, k + 1)


def bracket_counts(scores: torch.Tensor, t_prev: float, width: float, p: float) -> tuple[bool, int]:
    """(hit, candidates): whether ranks k and k+1 of ``scores`` lie in [(1-w) t_prev, (1+w) t_prev],
    and how many scores lie in that bracket."""
    n = scores.numel()
    if not math.isfinite(t_prev):
        return False, 0
    lo = torch.tensor(t_prev * (1.0 - width), dtype=torch.float32)
    hi = torch.tensor(t_prev * (1.0 + width), dtype=torch.float32)
    below = int((scores < lo).sum())
    inside = int(((scores >= lo) & (scores <= hi)).sum())
    k, k1 = _ranks(n, p)
    return below <= k and below + inside >= k1 + 1, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    spec = DATASETS["fashion-mnist"]
    cfg = resolve_config({"method": "cure", "dataset": "fashion-mnist", "arch": "cnn", "device": "cpu",
                          "batch_size": args.batch_size, "attack_steps": args.attack_steps, "progress": False})
    images, labels = load_split("fashion-mnist", args.data_root, train=True)
    images, labels = deterministic_subset(images, labels, args.train_samples, seed=0)
    loader = BatchLoader(images, labels, batch_size=cfg.batch_size, shuffle=True, augment=spec.augment,
                         device=device, drop_last=True)
    module = build_model("cnn", spec).to(device)
    ctx = build_step_context(cfg, module, eps=spec.eps, step_size=spec.step_size, attack_seed=args.seed,
                             revision_seed=args.seed)
    masker = ctx.masker
    names = [name for name, q in module.named_parameters() if q.requires_grad]
    sizes = [q.numel() for q in masker.params]
    assert len(names) == len(sizes)

    # Online: at each mask call, compare this step's scores with the previous step's thresholds.
    hits = {w: [0] * len(sizes) for w in WIDTHS}
    cand_hit = {w: [0.0] * len(sizes) for w in WIDTHS}  # sum over hits of candidates / n
    cand_all = {w: [0.0] * len(sizes) for w in WIDTHS}  # sum over all pairs of candidates / n
    rel_change: list[list[float]] = [[] for _ in sizes]  # |t / t_prev - 1| per tensor
    zero_thr = [0] * len(sizes)  # steps whose threshold was exactly 0
    previous: list[float] | None = None
    pairs = 0
    mask_ = masker.mask_

    def recording_mask_():
        nonlocal previous, pairs
        scores = [rgp_scores(a, b, masker.alpha).reshape(-1) for a, b in zip(masker.grads_nat, masker.grads_adv)]
        stats = mask_()
        thresholds = stats.thresholds.tolist()
        if previous is not None:
            pairs += 1
            for i, (s, t_prev, t) in enumerate(zip(scores, previous, thresholds)):
                if t_prev > 0 and math.isfinite(t_prev) and math.isfinite(t):
                    rel_change[i].append(abs(t / t_prev - 1.0))
                for w in WIDTHS:
                    hit, inside = bracket_counts(s, t_prev, w, masker.p)
                    cand_all[w][i] += inside / s.numel()
                    if hit:
                        hits[w][i] += 1
                        cand_hit[w][i] += inside / s.numel()
        previous = thresholds
        for i, t in enumerate(thresholds):
            zero_thr[i] += t == 0.0
        return stats

    masker.mask_ = recording_mask_
    step_fn = STEP_FUNCTIONS["cure"]
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    taken = 0
    while taken < args.steps:
        for x, y in loader.epoch(gen):
            step_fn(ctx, x, y)
            taken += 1
            if taken % 25 == 0:
                print(f"step {taken}: {time.perf_counter() - start:.0f} s", flush=True)
            if taken == args.steps:
                break
    elapsed = time.perf_counter() - start
    total = sum(sizes)
    print(f"{taken} CURE steps (cnn, Fashion-MNIST subset of {len(images)}, batch {cfg.batch_size}, "
          f"lr {cfg.lr}, p {masker.p}, alpha {masker.alpha}) in {elapsed:.0f} s; {len(sizes)} tensors, "
          f"{total} parameters; {pairs} consecutive-step pairs per tensor")
    env = environment(device)
    rows = []
    for w in WIDTHS:
        n_hits = sum(hits[w])
        all_pairs = pairs * len(sizes)
        weighted_hits = sum(h * n for h, n in zip(hits[w], sizes)) / (pairs * total)
        rows.append({
            "width": f"+-{100 * w:g} %",
            "hit_rate": n_hits / all_pairs,
            "hit_rate_by_elements": weighted_hits,
            "candidates_per_n_on_hits": sum(cand_hit[w]) / max(n_hits, 1),
            "candidates_per_n_all": sum(cand_all[w]) / all_pairs,
            "worst_tensor_hit_rate": min(hits[w]) / pairs,
            "steps": taken,
            "tensors": len(sizes),
            **env,
        })
    print_table(rows, ["width", "hit_rate", "hit_rate_by_elements", "candidates_per_n_on_hits",
                       "candidates_per_n_all", "worst_tensor_hit_rate"])
    print("\nper tensor: n, zero thresholds, median and 90th percentile of |t / t_prev - 1| over t_prev > 0, "
          "hit rate at +-5 % and +-20 %")
    for i, name in enumerate(names):
        changes = sorted(rel_change[i])
        med = changes[(len(changes) - 1) // 2] if changes else float("nan")
        p90 = changes[max(math.ceil(0.9 * len(changes)) - 1, 0)] if changes else float("nan")
        print(f"  {name:28s} n={sizes[i]:7d}  zero {zero_thr[i]:3d}  changes {len(changes):3d}  median {med:.4f}  "
              f"p90 {p90:.4f}  "
              f"hit5 {hits[0.05][i] / pairs:.2f}  hit20 {hits[0.2][i] / pairs:.2f}")
    path = write_csv("bracket_hit_rate.csv", rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
