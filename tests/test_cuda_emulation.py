"""The CUDA kernels' logic, checked on the CPU: csrc/cuda/emulation builds the real kernel sources
against a CPU emulation of the CUDA features they use (blocks in shuffled orders, the threads of a block
as coroutines switched at barriers and warp reductions) and compares every result with the reference
bit for bit. This is what a machine without a GPU can say about the CUDA backend;
tests/test_cuda_backend.py runs the same kernels on a GPU.

The build is the tiny block shape of check_emulated.py (32 threads x 8 items = 256-element chunks,
3 tensors per launch, a 1024-score sample, the sampling bracket from 2048 elements, candidate regions of
n/4), so that small tensors already span many chunks, launches and both selection paths.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc", "cuda", "emulation"))

import check_emulated as emu  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture(scope="module")
def checker():
    module = emu.build(*emu.CONFIGS["tiny"])
    module.junk_fill(True)  # unwritten outputs or workspaces show up as NaN
    try:
        yield emu.Checker(module, "tiny")
    finally:
        module.junk_fill(False)


@pytest.fixture(scope="module")
def chunk(checker):
    return checker.m.config()[2]


def test_mask_exact_on_the_pathological_battery(checker):
    start = checker.count
    sizes = (0, 1, 2, 3, 7, 8, 9, 31, 127, 128, 129, 255, 256, 257, 1025, 2048, 2051)
    emu.check_pathological(checker, sizes, quick=True)
    assert checker.count - start > 100


def test_mask_exact_whichever_level_separates_ranks(checker, chunk):
    emu.check_selection_paths(checker, chunk)


def test_mask_exact_on_layouts_and_many_tensors(checker, chunk):
    emu.check_layouts(checker, chunk)
    emu.check_many_tensors(checker, chunk)
    emu.check_random(checker, 40, 12 * chunk)


def test_bracket_exact_and_taken_on_cases_built_to_defeat_it(checker):
    emu.check_bracket(checker)


def test_bracket_hit_counts_and_miss_paths(checker):
    """The paths themselves: random data hits with candidates, all-equal data is resolved by the counts,
    sample-adversarial data misses, and the result is exact each time (asserted by Checker.mask)."""
    b = emu.Bracket(checker.m)
    gen = torch.Generator().manual_seed(41)
    n = 3 * b.min_n
    random_scores = torch.rand(n, generator=gen)
    assert emu._mask_path(checker, emu._at(random_scores, gen), 0.5, (emu.SELECT,), "random") == emu.SELECT
    equal = torch.full((n,), 0.5)
    assert emu._mask_path(checker, emu._at(equal, gen), 0.3, (emu.COUNTS,), "all equal") == emu.COUNTS
    nan = random_scores.clone()
    nan[7] = math.nan
    assert emu._mask_path(checker, emu._at(nan, gen), 0.3, (emu.COUNTS,), "NaN") == emu.COUNTS
    adversarial = torch.where(b.sampled(n), random_scores, 5.0 + random_scores)
    assert emu._mask_path(checker, emu._at(adversarial, gen), 0.5, (emu.MISS,), "adversarial") == emu.MISS


def test_sgd_step_exact(checker):
    start = checker.count
    emu.check_step(checker, quick=True)
    assert checker.count - start > 50


def test_select_exact_and_given_thresholds_step_equals_the_plain_step(checker):
    start = checker.count
    emu.check_select(checker, quick=True)
    assert checker.count - start > 20


def test_revise_exact(checker, chunk):
    emu.check_revise(checker, chunk)
