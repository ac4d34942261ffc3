"""Check the CUDA kernels' logic on the CPU: run them in the emulation of cuda_emulation.h and compare
every result bit for bit with cure_kernels.reference (rgp_mask, rgp_select, revise) and
cure_kernels.sgd_step.rgp_sgd_step_reference (the fused step, also with the thresholds of rgp_select given).

The kernels are built twice: with the production block shape (256 threads x 32 items, 128 tensors per
launch, a 16384-score sample, the sampling bracket from 65536 elements, candidate regions of n/8) and
with a tiny one (32 threads x 8 items = 256-element chunks, 3 tensors per launch, a 1024-score sample,
the bracket from 2048 elements, candidate regions of n/4) so that small tensors already span many
chunks, many launches and both selection paths. Blocks run in shuffled orders (seeded), the threads of a
block in shuffled orders between barriers. Which path each tensor took (radix, bracket resolved by the
counts, bracket with candidates, bracket miss) is read back and asserted where the case determines it.

    python csrc/cuda/emulation/check_emulated.py            # everything (a few minutes on 2 cores)
    python csrc/cuda/emulation/check_emulated.py --quick    # a smaller sample

What it cannot check: concurrency between blocks on a real GPU, memory fences, warp scheduling,
performance. Those need a GPU run of tests/test_cuda_backend.py.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import torch
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from rgp_cases import DTYPES, KINDS, bitwise_equal_f32, make_case  # noqa: E402

from cure_kernels import reference  # noqa: E402
from cure_kernels.sgd_step import rgp_sgd_step_reference  # noqa: E402

# threads per block, items per thread, tensors per launch, sample tiles, bracket minimum n, candidate shift
CONFIGS = {"production": (256, 32, 128, 64, 65536, 3), "tiny": (32, 8, 3, 32, 2048, 2)}


def build(threads: int, items: int, max_tensors: int, sample_items: int, bracket_min: int, cand_shift: int):
    name = f"cure_cuda_emulated_{threads}_{items}_{max_tensors}_{sample_items}_{bracket_min}_{cand_shift}"
    build_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), name)
    os.makedirs(build_dir, exist_ok=True)
    flags = ["-O2", "-ffp-contract=off", "-DCURE_CUDA_EMULATION", f"-DCURE_CUDA_THREADS={threads}",
             f"-DCURE_CUDA_ITEMS={items}", f"-DCURE_CUDA_MAX_TENSORS={max_tensors}",
             f"-DCURE_CUDA_SAMPLE_ITEMS={sample_items}", f"-DCURE_CUDA_BRACKET_MIN={bracket_min}",
             f"-DCURE_CUDA_CAND_SHIFT={cand_shift}"]
    return load(name=name, sources=[os.path.join(HERE, "emulated_ops.cpp")], extra_cflags=flags,
                build_directory=build_dir, verbose=False)


class Checker:
    def __init__(self, module, label: str):
        self.m = module
        self.label = label
        self.count = 0
        self.seed = 0

    def mask(self, updates, nat, adv, alpha, p, what=""):
        """Emulated kernels vs the reference on copies of the same inputs; raise on any difference."""
        expected_updates = [u.clone() for u in updates]
        exp = reference.rgp_mask_reference(expected_updates, nat, adv, alpha, p)
        self.seed += 1
        got = self.m.rgp_mask(list(updates), list(nat), list(adv), alpha, p, self.seed)
        where = f"[{self.label}] {what} alpha={alpha!r} p={p!r} sizes={[u.numel() for u in updates]}"
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64 and got[2].dtype == torch.int64
        assert bitwise_equal_f32(got[0], exp[0]), f"{where}: thresholds {got[0]} vs {exp[0]}"
        assert torch.equal(got[1], exp[1]), f"{where}: kept {got[1]} vs {exp[1]}"
        assert torch.equal(got[2], exp[2]), f"{where}: nonfinite {got[2]} vs {exp[2]}"
        for i, (u, e) in enumerate(zip(updates, expected_updates)):
            assert torch.equal(u.isnan(), e.isnan()), f"{where}: tensor {i} NaN positions differ"
            same = torch.nan_to_num(u).reshape(-1).float() == torch.nan_to_num(e).reshape(-1).float()
            assert bool(same.all()), f"{where}: tensor {i} masked update differs"
            bits = u.contiguous().view(torch.int16 if u.element_size() == 2 else torch.int32)
            ebits = e.contiguous().view(torch.int16 if e.element_size() == 2 else torch.int32)
            assert torch.equal(bits, ebits), f"{where}: tensor {i} update bits differ"
        self.count += 1

    def step(self, lists, *, lr=0.1, momentum=0.9, weight_decay=5e-3, alpha=0.1, p=0.3, mask_mode="grad",
             decay=0.99, revise=True, skip=None, what=""):
        """Emulated rgp_sgd_step vs rgp_sgd_step_reference on copies of the same state (params, grads,
        grads_nat, grads_adv, momentum buffers, revision); every stored bit must match (any NaN equals
        any NaN: the reference's NaN payloads come from PyTorch's CPU kernels)."""
        params, grads, nat, adv, bufs, rev = lists
        expected = [[t.clone() for t in ts] for ts in (params, grads, bufs, rev)]
        exp = rgp_sgd_step_reference(expected[0], expected[1], nat, adv, expected[2], expected[3] if revise else [],
                                     lr, momentum, weight_decay, alpha, p, mask_mode, decay, skip)
        self.seed += 1
        got = self.m.rgp_sgd_step(list(params), list(grads), list(nat), list(adv), list(bufs),
                                  list(rev) if revise else [], lr, momentum, weight_decay, alpha, p, mask_mode, decay,
                                  skip, self.seed)
        where = (f"[{self.label}] step {what} mode={mask_mode} revise={revise} skip={skip} alpha={alpha!r} "
                 f"p={p!r} sizes={[g.numel() for g in grads]} dtype={grads[0].dtype if grads else None}")
        assert bitwise_equal_f32(got[0], exp[0]), f"{where}: thresholds {got[0]} vs {exp[0]}"
        assert torch.equal(got[1], exp[1]), f"{where}: kept {got[1]} vs {exp[1]}"
        assert torch.equal(got[2], exp[2]), f"{where}: nonfinite {got[2]} vs {exp[2]}"
        for name, gots, exps in (("params", params, expected[0]), ("grads", grads, expected[1]),
                                 ("momentum_buffers", bufs, expected[2]), ("revision", rev, expected[3])):
            for i, (x, y) in enumerate(zip(gots, exps)):
                assert same_bits(x, y), f"{where}: {name}[{i}] differs"
        self.count += 1
        return got

    def select(self, nat, adv, alpha, p, what=""):
        """Emulated rgp_select vs the thresholds and non-finite counts of rgp_mask_reference."""
        exp = reference.rgp_mask_reference([torch.zeros_like(g) for g in nat], nat, adv, alpha, p)
        before = [g.clone() for g in (*nat, *adv)]
        self.seed += 1
        got = self.m.rgp_select(list(nat), list(adv), alpha, p, self.seed)
        where = f"[{self.label}] select {what} alpha={alpha!r} p={p!r} sizes={[g.numel() for g in nat]}"
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
        assert bitwise_equal_f32(got[0], exp[0]), f"{where}: thresholds {got[0]} vs {exp[0]}"
        assert torch.equal(got[1], exp[2]), f"{where}: nonfinite {got[1]} vs {exp[2]}"
        assert all(same_bits(g, b) for g, b in zip((*nat, *adv), before)), f"{where}: an input changed"
        self.count += 1
        return got

    def step_given(self, lists, *, lr=0.1, momentum=0.9, weight_decay=5e-3, alpha=0.1, p=0.3, mask_mode="grad",
                   decay=0.99, revise=True, skip=None, what=""):
        """rgp_select, then rgp_sgd_step with its thresholds (the apply kernel alone), both emulated, vs the
        plain emulated step on copies of the same state: every statistic and stored bit equal."""
        params, grads, nat, adv, bufs, rev = lists
        plain = [[t.clone() for t in ts] for ts in (params, grads, bufs, rev)]
        exp = self.step([plain[0], plain[1], nat, adv, plain[2], plain[3]], lr=lr, momentum=momentum,
                        weight_decay=weight_decay, alpha=alpha, p=p, mask_mode=mask_mode, decay=decay, revise=revise,
                        skip=skip, what=what)
        thresholds, nonfinite = self.select(nat, adv, alpha, p, what=what)
        self.seed += 1
        got = self.m.rgp_sgd_step_given(list(params), list(grads), list(nat), list(adv), list(bufs),
                                        list(rev) if revise else [], lr, momentum, weight_decay, alpha, p, mask_mode,
                                        decay, skip, thresholds, nonfinite, self.seed)
        where = (f"[{self.label}] given step {what} mode={mask_mode} revise={revise} skip={skip} p={p!r} "
                 f"sizes={[g.numel() for g in grads]}")
        assert bitwise_equal_f32(got[0], exp[0]), f"{where}: thresholds {got[0]} vs {exp[0]}"
        assert torch.equal(got[1], exp[1]), f"{where}: kept {got[1]} vs {exp[1]}"
        assert torch.equal(got[2], exp[2]), f"{where}: nonfinite {got[2]} vs {exp[2]}"
        for name, gots, exps in (("params", params, plain[0]), ("grads", grads, plain[1]),
                                 ("momentum_buffers", bufs, plain[2]), ("revision", rev, plain[3])):
            for i, (x, y) in enumerate(zip(gots, exps)):
                assert same_bits(x, y), f"{where}: {name}[{i}] differs"
        self.count += 1

    def revise(self, rev, par, decay, what=""):
        expected = [r.clone() for r in rev]
        reference.revise_reference(expected, par, decay)
        self.seed += 1
        self.m.revise(list(rev), list(par), decay, self.seed)
        for i, (r, e) in enumerate(zip(rev, expected)):
            where = f"[{self.label}] {what} decay={decay}: tensor {i}"
            assert r.dtype == e.dtype and bitwise_equal_f32(r, e), where
        self.count += 1


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype and bits, except that any NaN equals any NaN."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    x, y = x.contiguous().reshape(-1), y.contiguous().reshape(-1)
    view = torch.int16 if x.element_size() == 2 else torch.int32
    return bool(((x.view(view) == y.view(view)) | (x.float().isnan() & y.float().isnan())).all())


def _case(kind, n, gen):
    return make_case(kind, n, gen) if n > 0 else (torch.empty(0), torch.empty(0))


def _lists(kind, sizes, dtype, gen):
    nat, adv = zip(*(_case(kind, n, gen) for n in sizes))
    nat = [t.to(dtype) for t in nat]
    adv = [t.to(dtype) for t in adv]
    updates = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    return updates, nat, adv


def check_pathological(c: Checker, sizes, quick: bool):
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    alphas = (0.0, 0.1, 1.0, rng.random())
    ps = (0.0, 0.3, 0.999, 1.0, rng.random())
    for kind in KINDS:
        for dtype in DTYPES:
            for alpha in alphas:
                for p in ps:
                    if quick and rng.random() < 0.75:
                        continue
                    c.mask(*_lists(kind, sizes, dtype, gen), alpha, p, what=f"{kind} {dtype}")


def _from_scores(values: torch.Tensor, gen: torch.Generator, dtype=torch.float32):
    """Inputs whose scores are exactly `values` (alpha = 1: s = |g_nat|), in a random order."""
    values = values[torch.randperm(values.numel(), generator=gen)]
    nat = values.to(dtype)
    adv = torch.randn(values.numel(), generator=gen).to(dtype)
    return [torch.randn(values.numel(), generator=gen).to(dtype)], [nat], [adv]


def check_selection_paths(c: Checker, chunk: int):
    """Ranks k and k+1 separated at level 1, at level 2, or only at level 3, or equal; multi-chunk."""
    gen = torch.Generator().manual_seed(2)
    one = 1.0
    pairs = {
        "split level 1": (one, 2.0),                # top 11 bits differ
        "split level 2": (one, one + 2.0 ** -10),   # bits 19..9 differ
        "split level 3": (one, one + 2.0 ** -23),   # bits 8..0 differ
        "zero and denormal": (0.0, 1e-45),
        "finite and inf": (3.0, math.inf),
        "equal": (0.5, 0.5),
    }
    for n in (2, 3, chunk - 1, chunk, chunk + 1, 3 * chunk + 7):
        for name, (x, y) in pairs.items():
            for m in sorted({1, n // 3, n // 2, n - 1}):
                if not 1 <= m < n:
                    continue
                values = torch.cat([torch.full((m,), x), torch.full((n - m,), y)])
                # p with k = m - 1: a is the last x, b the first y (g below, at and above one half).
                for g in (0.0, 0.25, 0.5, 0.75):
                    p = min(1.0, (m - 1 + g) / (n - 1))
                    c.mask(*_from_scores(values, gen), 1.0, p, what=f"{name} n={n} m={m}")
                for p in (0.0, 1.0, random.Random(n + m).random()):
                    c.mask(*_from_scores(values, gen), 1.0, p, what=f"{name} n={n} m={m}")
        # Many distinct values inside one level-2 bin plus outliers on both sides.
        base = torch.tensor(1.0).view(torch.int32).item()
        inner = (base + torch.randint(0, 512, (n,), generator=gen, dtype=torch.int32)).view(torch.float32)
        values = torch.cat([inner, torch.tensor([0.0, 1e-30, 7.0, 1e30])])
        for p in (0.0, 0.01, 0.3, 0.5, 0.97, 1.0):
            c.mask(*_from_scores(values, gen), 1.0, p, what=f"one level-2 bin n={n}")


def check_layouts(c: Checker, chunk: int):
    gen = torch.Generator().manual_seed(3)
    sizes = [5, chunk + 3, 2 * chunk - 1, 8, 1]
    for dtype in DTYPES:
        # Views into flat buffers: offset 0 (16-byte aligned, vector path) and offsets that break alignment.
        for offset in (0, 1, 3, 8):
            total = sum(sizes) + offset
            bufs = [torch.randn(total, generator=gen).to(dtype) for _ in range(3)]
            views = [[], [], []]
            start = offset
            for n in sizes:
                for k in range(3):
                    views[k].append(bufs[k][start:start + n])
                start += n
            for p in (0.3, 0.9):
                c.mask(views[0], views[1], views[2], 0.1, p, what=f"flat views {dtype} offset={offset}")
        # Non-contiguous operands (transposed, strided); the update must change in place.
        u = torch.randn(37, 29, generator=gen).to(dtype).t()
        a = torch.randn(29, 74, generator=gen).to(dtype)[:, ::2]
        b = torch.randn(37, 29, generator=gen).to(dtype).t().contiguous()
        ptr = u.data_ptr()
        c.mask([u], [a], [b], 0.2, 0.6, what=f"non-contiguous {dtype}")
        assert u.data_ptr() == ptr


def check_many_tensors(c: Checker, chunk: int):
    gen = torch.Generator().manual_seed(4)
    sizes = [1, 0, 2, 3, 5, 1, 1, 7, 0, 11] * 3 + [4 * chunk + 9, 0]
    for kind in ("random", "ties", "nan", "inf"):
        c.mask(*_lists(kind, sizes, torch.float32, gen), 0.1, 0.3, what=f"many tensors {kind}")
    mixed = [(0, torch.float32), (300, torch.float16), (1, torch.bfloat16), (513, torch.float32),
             (0, torch.bfloat16), (64, torch.bfloat16), (chunk + 1, torch.float16)]
    updates, nat, adv = [], [], []
    for n, dtype in mixed:
        a, b = _case("random", n, gen)
        nat.append(a.to(dtype))
        adv.append(b.to(dtype))
        updates.append(torch.randn(n, generator=gen).to(dtype))
    c.mask(updates, nat, adv, 0.2, 0.4, what="mixed dtypes")
    # Worst case for the candidate region: all scores equal across many chunks.
    n = 5 * chunk + 3
    c.mask([torch.randn(n, generator=gen)], [torch.full((n,), 0.25)], [torch.full((n,), -0.5)], 0.3, 0.42,
           what="all equal, many chunks")


def check_random(c: Checker, iterations: int, max_size: int):
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    for _ in range(iterations):
        sizes = [rng.choice([0, 1, 2, rng.randrange(max_size)]) for _ in range(rng.randrange(1, 7))]
        kind = rng.choice(KINDS)
        dtype = rng.choice(DTYPES)
        alpha = rng.choice([0.0, 1.0, rng.random()])
        p = rng.choice([0.0, 1.0, rng.random()])
        c.mask(*_lists(kind, sizes, dtype, gen), alpha, p, what=f"random {kind} {dtype}")


# --- the sampling bracket -------------------------------------------------------------------------------
RADIX, COUNTS, SELECT, MISS = 1, 2, 3, 4  # TensorWork::path
PATH_NAMES = {0: "empty", RADIX: "radix", COUNTS: "bracket counts", SELECT: "bracket select", MISS: "bracket miss"}


class Bracket:
    """The sampling geometry of a build: tile t of `tiles` covers `threads` elements from
    floor(t * n / tiles) rounded down to a multiple of `threads`."""

    def __init__(self, module):
        cfg = module.config()
        self.threads, self.chunk, self.m, self.min_n, self.shift = cfg[0], cfg[2], cfg[4], cfg[5], cfg[6]
        self.tiles = self.m // self.threads

    def sampled(self, n: int) -> torch.Tensor:
        """Boolean mask of the sampled positions of a tensor of n elements."""
        mask = torch.zeros(n, dtype=torch.bool)
        for t in range(self.tiles):
            start = (t * n // self.tiles) // self.threads * self.threads
            mask[start:start + self.threads] = True
        return mask


def _at(values: torch.Tensor, gen: torch.Generator, dtype=torch.float32):
    """Inputs whose scores are exactly `values` at their positions (alpha = 1: s = |g_nat|)."""
    n = values.numel()
    nat = values.to(dtype)
    adv = torch.randn(n, generator=gen).to(dtype)
    return [torch.randn(n, generator=gen).to(dtype)], [nat], [adv]


def _shuffled(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return values[torch.randperm(values.numel(), generator=gen)]


def _mask_path(c: Checker, inputs, p, expect, what, alpha=1.0):
    c.mask(*inputs, alpha, p, what=what)
    paths = c.m.paths()
    if expect is not None:
        assert paths[-1] in expect, f"[{c.label}] {what} p={p}: path {PATH_NAMES[paths[-1]]}, " \
                                    f"expected one of {[PATH_NAMES[e] for e in expect]}"
    return paths[-1]


def check_bracket(c: Checker):
    """Cases built to defeat the bracket: each must stay exact; where the path is certain it is asserted
    (a hit must not hide behind the fallback, a miss must really be taken)."""
    b = Bracket(c.m)
    gen = torch.Generator().manual_seed(21)
    hit = (COUNTS, SELECT)
    ps = (0.0, 0.01, 0.1, 0.29, 0.3, 0.31, 0.5, 0.79, 0.8, 0.81, 0.97, 1.0)
    sizes = (b.min_n - 1, b.min_n, b.min_n + 1, 3 * b.min_n + 7)
    for n in sizes:
        expect = hit if n >= b.min_n else (RADIX,)
        for dtype in DTYPES:
            for p in (0.0, 0.3, 0.5, 1.0):
                u, a, v = _lists("random", [n], dtype, gen)
                _mask_path(c, (u, a, v), p, expect, f"random n={n} {dtype}", alpha=0.1)
        rnd = torch.randn(n, generator=gen).abs()
        for name, values in {
            "all equal": torch.full((n,), 0.75),
            "30% zeros": torch.where(torch.rand(n, generator=gen) < 0.3, 0.0, rnd),
            "80% zeros": torch.where(torch.rand(n, generator=gen) < 0.8, 0.0, rnd),
            "two-valued": torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, 2.0),
            "run straddling k": torch.cat([rnd[: int(0.4 * n)], torch.full((n - 2 * int(0.4 * n),), 0.9),
                                           rnd[: int(0.4 * n)] + 2.0]),
            "10% +inf": torch.where(torch.rand(n, generator=gen) < 0.1, math.inf, rnd),
            "denormals": (torch.randint(0, 64, (n,), generator=gen, dtype=torch.int32)).view(torch.float32),
            "one NaN": torch.cat([rnd[:-1], torch.tensor([math.nan])]),
        }.items():
            for p in ps:
                _mask_path(c, _at(_shuffled(values, gen), gen), p, expect, f"{name} n={n}")
        # Sorted data: the evenly spread tiles still see every part of it (stratified): a hit.
        for p in (0.0, 0.3, 0.5, 1.0):
            _mask_path(c, _at(torch.sort(rnd).values, gen), p, expect, f"sorted n={n}")
            _mask_path(c, _at(torch.sort(rnd, descending=True).values, gen), p, expect, f"sorted desc n={n}")
    n = 4 * b.min_n + 13
    sampled = b.sampled(n)
    rnd = torch.rand(n, generator=gen)
    # Sample-adversarial: the tiles hold small values, the rest is large -> ranks above hi: a miss.
    values = torch.where(sampled, rnd, 10.0 + rnd)
    for p in (0.3, 0.5, 0.9):
        _mask_path(c, _at(values, gen), p, (MISS,), "tiles small, rest large")
    values = torch.where(sampled, 10.0 + rnd, rnd)
    for p in (0.1, 0.5):
        _mask_path(c, _at(values, gen), p, (MISS,), "tiles large, rest small")
    # Candidate overflow: the tiles spread over [0, 1), the rest packed into (0.49, 0.51) -> far more
    # than n >> shift keys inside (lo, hi): a miss, and the radix path over the scores.
    values = torch.where(sampled, rnd, 0.49 + 0.02 * rnd)
    for p in (0.5, 0.45):
        _mask_path(c, _at(values, gen), p, (MISS,), "candidate overflow")
    # Ties exactly at lo: the tiles' value at the bracket's lower sample rank repeated in the rest.
    values = torch.where(sampled, rnd, torch.full((n,), float(torch.quantile(rnd[sampled], 0.3))))
    for p in (0.0, 0.25, 0.3, 0.35, 0.6):
        _mask_path(c, _at(values, gen), p, None, "ties at lo")
    # Many tensors: bracket and radix tensors mixed in one launch, several launches.
    sizes = [b.min_n + 5, 3, 0, 2 * b.min_n, 100, b.min_n]
    for kind in KINDS:
        c.mask(*_lists(kind, sizes, torch.float32, gen), 0.1, 0.3, what=f"mixed bracket/radix {kind}")
        paths = c.m.paths()
        if kind != "nan":
            assert [paths[i] in hit for i in (0, 3, 5)] == [True] * 3, (kind, paths)
        assert paths[1] == RADIX and paths[4] == RADIX and paths[2] == 0, (kind, paths)


# --- the fused SGD step ---------------------------------------------------------------------------------
def _state(sizes, dtype, gen, kind="random"):
    """params, grads, grads_nat, grads_adv, momentum buffers, revision: one tensor of each per size."""
    nat, adv = [], []
    for n in sizes:
        a, v = _case(kind, n, gen)
        nat.append(a)
        adv.append(v)
    rand = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(4)]
    lists = [rand[0], rand[1], nat, adv, [0.1 * r for r in rand[2]], rand[3]]
    return [[t.to(dtype) for t in ts] for ts in lists]


def check_step(c: Checker, quick: bool):
    b = Bracket(c.m)
    rng = random.Random(31)
    gen = torch.Generator().manual_seed(31)
    sizes = (0, 1, 2, 3, 7, 8, 9, 31, 255, 256, 257, b.chunk + 1, b.min_n + 3, 2 * b.min_n + 1)
    skips = (None, torch.tensor(False), torch.tensor(True), torch.tensor(math.nan), torch.tensor([0.0]))
    for kind in KINDS:
        for dtype in DTYPES:
            for mask_mode in ("grad", "update"):
                for revise in (True, False):
                    if quick and rng.random() < 0.5:
                        continue
                    skip = rng.choice(skips)
                    p = rng.choice((0.0, 0.3, 1.0, rng.random()))
                    c.step(_state(sizes, dtype, gen, kind), mask_mode=mask_mode, revise=revise, skip=skip, p=p,
                           what=kind)
    # Every skip value on data with and without non-finite scores; hyper-parameters at their edges.
    for kind in ("random", "inf", "nan"):
        for skip in skips:
            for mask_mode in ("grad", "update"):
                c.step(_state([5, b.min_n + 1], torch.float32, gen, kind), skip=skip, mask_mode=mask_mode,
                       what=f"skip {kind}")
    for lr, momentum, wd, decay in ((0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0), (0.05, 0.9, 5e-4, 0.999)):
        for dtype in DTYPES:
            c.step(_state([300, b.min_n + 9], dtype, gen, "ties"), lr=lr, momentum=momentum, weight_decay=wd,
                   decay=decay, alpha=0.3, p=0.6, mask_mode="update", what="hyper-parameters")
    # Views into flat buffers (aligned and not) and non-contiguous tensors.
    for dtype in DTYPES:
        for offset in (0, 1, 3):
            sizes_v = [5, b.chunk + 3, 8, b.min_n + 2]
            total = sum(sizes_v) + offset
            bufs = [torch.randn(total, generator=gen).to(dtype) for _ in range(6)]
            lists = [[], [], [], [], [], []]
            start = offset
            for n in sizes_v:
                for k in range(6):
                    lists[k].append(bufs[k][start:start + n])
                start += n
            c.step(lists, what=f"flat views offset={offset}")
        t = [torch.randn(40, 30, generator=gen).to(dtype).t() for _ in range(6)]
        c.step([[x] for x in t], mask_mode="update", what="transposed")
    # Many tensors over several launches, mixed dtypes in one call.
    mixed = [(0, torch.float32), (300, torch.float16), (1, torch.bfloat16), (b.min_n + 1, torch.float32),
             (64, torch.bfloat16), (b.chunk + 1, torch.float16)] * 2
    lists = [[], [], [], [], [], []]
    for n, dtype in mixed:
        for k, t in enumerate(_state([n], dtype, gen, "zeros")):
            lists[k] += t
    c.step(lists, p=0.5, what="mixed dtypes, several launches")
    c.step(lists, p=0.5, skip=torch.tensor(1), mask_mode="update", what="mixed dtypes, skipped")



def check_select(c: Checker, quick: bool):
    """rgp_select on the pathological battery (both selection paths, several launches), and the fused step
    with its thresholds given against the plain step."""
    b = Bracket(c.m)
    rng = random.Random(51)
    gen = torch.Generator().manual_seed(51)
    sizes = (0, 1, 2, 3, 9, 257, b.chunk + 1, b.min_n - 1, b.min_n + 3, 2 * b.min_n + 1)
    for kind in KINDS:
        for dtype in DTYPES:
            if quick and rng.random() < 0.5:
                continue
            _, nat, adv = _lists(kind, sizes, dtype, gen)
            c.select(nat, adv, rng.choice((0.0, 0.1, 1.0)), rng.choice((0.0, 0.3, 1.0, rng.random())), what=kind)
    skips = (None, torch.tensor(False), torch.tensor(True), torch.tensor(math.nan))
    for kind in ("random", "ties", "inf", "nan", "zeros"):
        for dtype in DTYPES:
            for mask_mode in ("grad", "update"):
                if quick and rng.random() < 0.5:
                    continue
                c.step_given(_state(sizes, dtype, gen, kind), mask_mode=mask_mode, revise=rng.random() < 0.5,
                             skip=rng.choice(skips), p=rng.choice((0.0, 0.3, 1.0, rng.random())), what=kind)
    mixed = [(0, torch.float32), (300, torch.float16), (1, torch.bfloat16), (b.min_n + 1, torch.float32),
             (64, torch.bfloat16), (b.chunk + 1, torch.float16)] * 2
    lists = [[], [], [], [], [], []]
    for n, dtype in mixed:
        for k, t in enumerate(_state([n], dtype, gen, "random")):
            lists[k] += t
    c.step_given(lists, p=0.5, skip=torch.tensor(0), mask_mode="update", what="mixed dtypes, several launches")


def check_revise(c: Checker, chunk: int):
    gen = torch.Generator().manual_seed(6)
    sizes = [0, 1, 2, 3, 7, 8, 9, chunk - 1, chunk, chunk + 1, 2 * chunk + 5, 1]
    for dtype in DTYPES:
        for decay in (0.0, 0.5, 0.999, 1.0, 0.123456789):
            rev = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
            par = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
            c.revise(rev, par, decay, what=f"{dtype}")
        for offset in (1, 2):  # misaligned flat views
            total = sum(sizes) + offset
            rb, pb = torch.randn(total, generator=gen).to(dtype), torch.randn(total, generator=gen).to(dtype)
            rev, par, start = [], [], offset
            for n in sizes:
                rev.append(rb[start:start + n])
                par.append(pb[start:start + n])
                start += n
            c.revise(rev, par, 0.7, what=f"flat views {dtype} offset={offset}")
        def randn(*shape, dtype=dtype):
            return torch.randn(*shape, generator=gen).to(dtype)

        rev = [randn(20, 30)[:, ::3], randn(9, 4).t()]
        par = [randn(30, 20).t()[:, ::3], randn(4, 9)]
        ptrs = [r.data_ptr() for r in rev]
        c.revise(rev, par, 0.7, what=f"non-contiguous {dtype}")
        assert [r.data_ptr() for r in rev] == ptrs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sample of the cases")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the block and thread orders")
    parser.add_argument("--config", choices=sorted(CONFIGS), action="append", help="block shapes to check")
    args = parser.parse_args()
    for label in args.config or ["tiny", "production"]:
        threads, items, max_tensors = CONFIGS[label][:3]
        start = time.time()
        module = build(*CONFIGS[label])
        chunk = threads * items
        module.junk_fill(True)  # unwritten outputs or workspaces show up as NaN
        c = Checker(module, label)
        c.seed = args.seed
        shape = f"threads={threads} items={items} chunk={chunk}"
        print(f"[{label}] built in {time.time() - start:.0f} s: {shape}", flush=True)
        sizes = (0, 1, 2, 3, 7, 8, 9, 31, 127, 128, 129, 255, 256, 257, 1025)
        if label == "production":
            sizes += (chunk + 1,)
        check_pathological(c, sizes, args.quick)
        check_selection_paths(c, chunk)
        check_layouts(c, chunk)
        check_many_tensors(c, chunk)
        check_random(c, 40 if args.quick else 200, 4 * chunk)
        check_bracket(c)
        check_step(c, args.quick)
        check_select(c, args.quick)
        check_revise(c, chunk)
        elapsed = time.time() - start
        print(f"[{label}] {c.count} calls matched the reference bit for bit ({elapsed:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
