"""Check the CUDA kernels' logic on the CPU: run them in the emulation of cuda_emulation.h and compare
every result bit for bit with cure_kernels.reference.

The kernels are built twice: with the production block shape (256 threads x 32 items, 128 tensors per
launch) and with a tiny one (32 threads x 8 items = 256-element chunks, 3 tensors per launch) so that
small tensors already span many chunks and many launches. Blocks run in shuffled orders (seeded), the
threads of a block in shuffled orders between barriers.

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

CONFIGS = {"production": (256, 32, 128), "tiny": (32, 8, 3)}


def build(threads: int, items: int, max_tensors: int):
    name = f"cure_cuda_emulated_{threads}_{items}_{max_tensors}"
    build_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), name)
    os.makedirs(build_dir, exist_ok=True)
    flags = ["-O2", "-ffp-contract=off", "-DCURE_CUDA_EMULATION", f"-DCURE_CUDA_THREADS={threads}",
             f"-DCURE_CUDA_ITEMS={items}", f"-DCURE_CUDA_MAX_TENSORS={max_tensors}"]
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

    def revise(self, rev, par, decay, what=""):
        expected = [r.clone() for r in rev]
        reference.revise_reference(expected, par, decay)
        self.seed += 1
        self.m.revise(list(rev), list(par), decay, self.seed)
        for i, (r, e) in enumerate(zip(rev, expected)):
            where = f"[{self.label}] {what} decay={decay}: tensor {i}"
            assert r.dtype == e.dtype and bitwise_equal_f32(r, e), where
        self.count += 1


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
        threads, items, max_tensors = CONFIGS[label]
        start = time.time()
        module = build(threads, items, max_tensors)
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
        check_revise(c, chunk)
        elapsed = time.time() - start
        print(f"[{label}] {c.count} calls matched the reference bit for bit ({elapsed:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
