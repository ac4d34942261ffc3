"""CUDA backend (csrc/cuda): bit-exact against the reference, CUDA graphs, streams, opcheck, compile.

The kernels cut every tensor into chunks of CHUNK = 256 threads x 32 items = 8192 elements (one block
each), read 16-byte vectors when all pointers are 16-byte aligned (4 float32 or 8 bfloat16/float16
elements) and take up to 128 tensors per launch; the sizes below sit on and around those boundaries.
Selection: tensors of at least BRACKET_MIN = 65536 elements take the one-read sampling bracket (16384
sampled scores, counts of the keys below / at / between / at / above the bracket keys, candidates
selected exactly, a radix fallback on a miss); smaller ones a three-level radix select on the score bits
(bits 30..20, 19..9, 8..0); the "selection path" cases force each way ranks k and k+1 can separate,
the bracket cases each way the bracket can hit or miss. The fused step cure::rgp_sgd_step runs the same
selection, then one apply pass (mask, SGD, revision EMA); it is checked bit for bit against
cure_kernels.sgd_step.rgp_sgd_step_reference.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from rgp_cases import DTYPES, KINDS, bitwise_equal_f32, make_case

import cure_kernels as ck
from cure_kernels import reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ck.available_backends(),
    reason="needs a CUDA GPU and cure_kernels._C built with its CUDA kernels "
           "(CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .)",
)

CHUNK = 8192
BRACKET_MIN = 65536
SAMPLE_TILES, SAMPLE_TILE = 64, 256
SIZES = (0, 1, 2, 3, 4, 5, 7, 8, 9, 31, 32, 33, 255, 256, 257, 2047, 2048, 2049,
         7919, 8191, 8192, 8193, 16411)
ALPHAS = (0.0, 0.1, 1.0)
PS = (0.0, 0.3, 0.999, 1.0)


def _case(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return make_case(kind, n, gen) if n > 0 else (torch.empty(0), torch.empty(0))


def _inputs(kind: str, sizes, dtype: torch.dtype, gen: torch.Generator):
    nat, adv = zip(*(_case(kind, n, gen) for n in sizes))
    nat = [t.to("cuda", dtype) for t in nat]
    adv = [t.to("cuda", dtype) for t in adv]
    updates = [torch.randn(n, generator=gen).to("cuda", dtype) for n in sizes]
    return updates, nat, adv


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).cpu()


def check_exact(updates, nat, adv, alpha: float, p: float) -> ck.MaskStats:
    """The CUDA backend and the reference on copies of the same inputs agree bit for bit: thresholds
    (any NaN equals any NaN), kept, nonfinite, and every bit of every masked update."""
    expected_updates = [u.clone() for u in updates]
    exp = reference.rgp_mask_reference(expected_updates, nat, adv, alpha, p)
    got = ck.rgp_mask_(updates, nat, adv, alpha=alpha, p=p, backend="cuda")
    sizes, dtypes = [u.numel() for u in updates], [u.dtype for u in updates]
    where = f"alpha={alpha!r} p={p!r} sizes={sizes} dtypes={dtypes}"
    for name, dtype in (("thresholds", torch.float32), ("kept", torch.int64), ("nonfinite", torch.int64)):
        tensor = getattr(got, name)
        assert tensor.device.type == "cuda" and tensor.dtype == dtype, name
        assert tensor.shape == (len(updates),), name
    assert bitwise_equal_f32(got.thresholds, exp[0]), f"{where}: thresholds {got.thresholds} vs {exp[0]}"
    assert torch.equal(got.kept.cpu(), exp[1].cpu()), f"{where}: kept {got.kept} vs {exp[1]}"
    assert torch.equal(got.nonfinite.cpu(), exp[2].cpu()), f"{where}: nonfinite {got.nonfinite} vs {exp[2]}"
    for i, (u, e) in enumerate(zip(updates, expected_updates)):
        assert torch.equal(_bits(u), _bits(e)), f"{where}: tensor {i} (n={u.numel()}): masked update differs"
    return got


# --- exactness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_on_pathological_inputs(kind, dtype):
    rng = random.Random(f"{kind}-{dtype}")
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for alpha in ALPHAS + (rng.random(),):
        for p in PS + (rng.random(),):
            check_exact(*_inputs(kind, SIZES, dtype, gen), alpha, p)


def _from_scores(values: torch.Tensor, gen: torch.Generator, dtype=torch.float32):
    """Inputs whose scores are exactly `values` in a random order (alpha = 1: s = |g_nat| + 0 * |g_adv|)."""
    values = values[torch.randperm(values.numel(), generator=gen)]
    nat = values.to("cuda", dtype)
    adv = torch.randn(values.numel(), generator=gen).to("cuda", dtype)
    return [torch.randn(values.numel(), generator=gen).to("cuda", dtype)], [nat], [adv]


SEPARATIONS = {
    "level 1": (1.0, 2.0),                 # keys differ in bits 30..20
    "level 2": (1.0, 1.0 + 2.0 ** -10),    # ... in bits 19..9 only
    "level 3": (1.0, 1.0 + 2.0 ** -23),    # ... in bits 8..0 only
    "zero and denormal": (0.0, 1e-45),
    "finite and inf": (3.0, math.inf),
    "equal": (0.5, 0.5),
}


@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize("n", (2, 3, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 7))
def test_exact_whichever_level_separates_ranks_k_and_k1(separation, n):
    """m scores x and n - m scores y, with p chosen so that v[k] is the last x and v[k+1] the first y."""
    x, y = SEPARATIONS[separation]
    gen = torch.Generator().manual_seed(n)
    for m in sorted({1, n // 3, n // 2, n - 1}):
        if not 1 <= m < n:
            continue
        values = torch.cat([torch.full((m,), x), torch.full((n - m,), y)])
        for g in (0.0, 0.25, 0.5, 0.75):  # both interpolation branches
            check_exact(*_from_scores(values, gen), 1.0, min(1.0, (m - 1 + g) / (n - 1)))
        for p in (0.0, 1.0, random.Random(n * m).random()):
            check_exact(*_from_scores(values, gen), 1.0, p)


@pytest.mark.parametrize("n", (CHUNK + 1, 4 * CHUNK + 5))
def test_exact_with_many_distinct_keys_in_one_level2_bin(n):
    gen = torch.Generator().manual_seed(n)
    base = torch.tensor(1.0).view(torch.int32).item()
    inner = (base + torch.randint(0, 512, (n,), generator=gen, dtype=torch.int32)).view(torch.float32)
    values = torch.cat([inner, torch.tensor([0.0, 1e-30, 7.0, 1e30])])
    for p in (0.0, 0.01, 0.3, 0.5, 0.97, 1.0):
        check_exact(*_from_scores(values, gen), 1.0, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_when_every_score_is_a_candidate(dtype):
    """All-equal tensors put every element into the selected bin: the candidate region must hold n."""
    gen = torch.Generator().manual_seed(11)
    for n in (5 * CHUNK + 3, 1 << 20):
        nat = [torch.full((n,), 0.25, device="cuda", dtype=dtype)]
        adv = [torch.full((n,), -0.5, device="cuda", dtype=dtype)]
        stats = check_exact([torch.randn(n, generator=gen).to("cuda", dtype)], nat, adv, 0.3, 0.42)
        assert stats.kept.tolist() == [n]


def test_exact_on_many_tiny_tensors_next_to_a_large_one():
    gen = torch.Generator().manual_seed(3)
    sizes = [1, 0, 2, 3, 5, 1, 1, 7, 0, 11] * 4 + [40_009]
    for kind in ("random", "ties", "nan", "inf"):
        check_exact(*_inputs(kind, sizes, torch.float32, gen), 0.1, 0.3)


def test_exact_with_more_tensors_than_one_launch_takes():
    """300 tensors need three launches of at most 128 tensors each, with mixed dtypes and sizes."""
    rng = random.Random(4)
    gen = torch.Generator().manual_seed(4)
    updates, nat, adv = [], [], []
    for _ in range(300):
        n = rng.choice([0, 1, 2, 3, 64, 257, rng.randrange(1, 3 * CHUNK)])
        dtype = rng.choice(DTYPES)
        u, a, b = _inputs(rng.choice(KINDS), [n], dtype, gen)
        updates += u
        nat += a
        adv += b
    check_exact(updates, nat, adv, 0.1, 0.3)
    check_exact(updates, nat, adv, 0.7, 0.95)


def test_exact_on_mixed_dtypes_and_empty_tensors():
    gen = torch.Generator().manual_seed(5)
    updates, nat, adv = [], [], []
    for n, dtype in [(0, torch.float32), (300, torch.float16), (1, torch.bfloat16), (513, torch.float32),
                     (0, torch.bfloat16), (64, torch.bfloat16), (CHUNK + 1, torch.float16)]:
        u, a, b = _inputs("random", [n], dtype, gen)
        updates += u
        nat += a
        adv += b
    stats = check_exact(updates, nat, adv, 0.2, 0.4)
    assert math.isnan(stats.thresholds[0].item())
    assert stats.kept[0].item() == 0 and stats.nonfinite[0].item() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", (0, 1, 3, 8))
def test_exact_on_views_into_flat_buffers(dtype, offset):
    """Offset 0 keeps every view 16-byte aligned (vector loads); the others force the scalar path."""
    gen = torch.Generator().manual_seed(6 + offset)
    sizes = [5, CHUNK + 3, 2 * CHUNK - 1, 8, 1, 1000]
    total = sum(sizes) + offset
    buffers = [torch.randn(total, generator=gen).to("cuda", dtype) for _ in range(3)]
    views: list[list[torch.Tensor]] = [[], [], []]
    start = offset
    for n in sizes:
        for k in range(3):
            views[k].append(buffers[k][start:start + n])
        start += n
    for alpha, p in ((0.1, 0.3), (0.5, 0.9)):
        check_exact(views[0], views[1], views[2], alpha, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_on_non_contiguous_inputs_and_update_in_place(dtype):
    gen = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", dtype)

    updates = [randn(37, 290).t(), randn(64, 99)[:, ::3]]
    nat = [randn(290, 74)[:, ::2], randn(64, 33)]
    adv = [randn(37, 290).t().contiguous(), randn(33, 64).t()]
    assert not updates[0].is_contiguous() and not updates[1].is_contiguous() and not nat[0].is_contiguous()
    ptrs = [u.data_ptr() for u in updates]
    check_exact(updates, nat, adv, 0.1, 0.3)
    assert [u.data_ptr() for u in updates] == ptrs


def test_exact_on_random_mixes():
    rng = random.Random(8)
    gen = torch.Generator().manual_seed(8)
    for _ in range(60):
        sizes = [rng.choice([0, 1, 2, rng.randrange(5 * CHUNK)]) for _ in range(rng.randrange(1, 7))]
        alpha = rng.choice([0.0, 1.0, rng.random()])
        p = rng.choice([0.0, 1.0, rng.random()])
        check_exact(*_inputs(rng.choice(KINDS), sizes, rng.choice(DTYPES), gen), alpha, p)


@pytest.mark.parametrize("kind", ("random", "ties"))
def test_exact_on_a_tensor_above_2_pow_24_elements(kind):
    """Beyond torch.quantile's limit; 'ties' puts millions of elements into the selected bins."""
    gen = torch.Generator().manual_seed(9)
    n = (1 << 24) + 17
    updates, nat, adv = _inputs(kind, [n, 3], torch.float32, gen)
    check_exact(updates, nat, adv, 0.1, 0.3)


# --- revise ----------------------------------------------------------------------------------------
def _check_revise(rev, par, decay):
    expected = [r.clone() for r in rev]
    reference.revise_reference(expected, par, decay)
    ptrs = [r.data_ptr() for r in rev]
    ck.revise_(rev, par, decay=decay, backend="cuda")
    assert [r.data_ptr() for r in rev] == ptrs
    for i, (r, e) in enumerate(zip(rev, expected)):
        assert r.dtype == e.dtype, f"tensor {i}: dtype changed"
        assert torch.equal(_bits(r), _bits(e)), f"tensor {i} (n={r.numel()}), decay={decay}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decay", (0.0, 0.5, 0.999, 1.0, 0.123456789))
def test_revise_exact(dtype, decay):
    gen = torch.Generator().manual_seed(10)
    sizes = (0, 1, 2, 3, 7, 8, 9, 127, 128, 129, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 1)
    rev = [torch.randn(n, generator=gen).to("cuda", dtype) for n in sizes]
    par = [torch.randn(n, generator=gen).to("cuda", dtype) for n in sizes]
    _check_revise(rev, par, decay)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_revise_exact_on_views_non_contiguous_and_many_tensors(dtype):
    gen = torch.Generator().manual_seed(11)
    sizes = [3, CHUNK + 1, 5, 1000]
    for offset in (0, 1, 2):  # aligned and misaligned flat-buffer views
        total = sum(sizes) + offset
        rb, pb = (torch.randn(total, generator=gen).to("cuda", dtype) for _ in range(2))
        rev, par, start = [], [], offset
        for n in sizes:
            rev.append(rb[start:start + n])
            par.append(pb[start:start + n])
            start += n
        _check_revise(rev, par, 0.7)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", dtype)

    rev = [randn(20, 30)[:, ::3], randn(9, 4).t()]
    par = [randn(30, 20).t()[:, ::3], randn(4, 9)]
    _check_revise(rev, par, 0.7)
    many = [torch.randn(n % 37, generator=gen).to("cuda", dtype) for n in range(300)]
    _check_revise(many, [torch.randn_like(r) for r in many], 0.99)


def test_revise_matches_the_float32_formula():
    gen = torch.Generator().manual_seed(12)
    rev = [torch.randn(10_000, generator=gen).cuda()]
    par = [torch.randn(10_000, generator=gen).cuda()]
    f32 = torch.float32
    expected = torch.tensor(0.9, dtype=f32) * rev[0].cpu() + torch.tensor(0.1, dtype=f32) * par[0].cpu()
    ck.revise_(rev, par, decay=0.9, backend="cuda")
    assert torch.equal(_bits(rev[0]), _bits(expected))


# --- no host synchronisation: graphs and streams ------------------------------------------------------
def _fill(updates, nat, adv, kind, gen):
    for u, a, b in zip(updates, nat, adv):
        x, y = _case(kind, u.numel(), gen)
        a.copy_(x.view(a.shape))
        b.copy_(y.view(b.shape))
        u.copy_(torch.randn(u.numel(), generator=gen).view(u.shape))


def test_cuda_graph_capture_and_replay_equals_eager():
    gen = torch.Generator().manual_seed(13)
    sizes = [5, CHUNK + 3, 300, 0, 1, 2 * CHUNK]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float32, torch.float32]
    updates = [torch.empty(n, device="cuda", dtype=d) for n, d in zip(sizes, dtypes)]
    nat = [torch.empty_like(u) for u in updates]
    adv = [torch.empty_like(u) for u in updates]
    _fill(updates, nat, adv, "random", gen)
    side = torch.cuda.Stream()  # warm up outside the capture, on a side stream (as torch recommends)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ck.rgp_mask_([u.clone() for u in updates], nat, adv, alpha=0.1, p=0.3, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3, backend="cuda")
    for kind in ("random", "ties", "nan", "all_equal", "inf", "random"):
        _fill(updates, nat, adv, kind, gen)
        eager_updates = [u.clone() for u in updates]
        eager = ck.rgp_mask_(eager_updates, nat, adv, alpha=0.1, p=0.3, backend="cuda")
        expected_updates = [u.clone() for u in updates]
        exp = reference.rgp_mask_reference(expected_updates, nat, adv, 0.1, 0.3)
        graph.replay()
        torch.cuda.synchronize()
        assert bitwise_equal_f32(stats.thresholds, eager.thresholds)
        assert bitwise_equal_f32(stats.thresholds, exp[0])
        assert torch.equal(stats.kept, eager.kept) and torch.equal(stats.kept.cpu(), exp[1].cpu())
        assert torch.equal(stats.nonfinite, eager.nonfinite)
        assert torch.equal(stats.nonfinite.cpu(), exp[2].cpu())
        for u, e, r in zip(updates, eager_updates, expected_updates):
            assert torch.equal(_bits(u), _bits(e)) and torch.equal(_bits(u), _bits(r)), kind


def test_cuda_graph_capture_of_revise():
    gen = torch.Generator().manual_seed(14)
    rev = [torch.randn(n, generator=gen).cuda() for n in (7, CHUNK + 1, 0)]
    par = [torch.randn_like(r) for r in rev]
    graph = torch.cuda.CUDAGraph()
    start = [r.clone() for r in rev]
    with torch.cuda.graph(graph):
        ck.revise_(rev, par, decay=0.9, backend="cuda")
    for r, s in zip(rev, start):
        r.copy_(s)
    expected = [r.clone() for r in rev]
    for _ in range(3):
        graph.replay()
        reference.revise_reference(expected, par, 0.9)
    torch.cuda.synchronize()
    assert all(torch.equal(_bits(r), _bits(e)) for r, e in zip(rev, expected))


def test_runs_on_the_current_stream_without_waiting_for_others():
    """Launched on a side stream while the default stream sleeps, the ops and copies of their results
    (ordered on the side stream only) finish before the sleep ends: the ops run on the current stream and
    never synchronise the device."""
    gen = torch.Generator().manual_seed(15)
    updates, nat, adv = _inputs("random", [CHUNK * 3 + 1, 100, 0], torch.float32, gen)
    expected_updates = [u.clone() for u in updates]
    exp = reference.rgp_mask_reference(expected_updates, nat, adv, 0.1, 0.3)
    rev, par = [torch.ones(1000, device="cuda")], [torch.zeros(1000, device="cuda")]
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):  # warm-up: the caching allocator then holds blocks for this stream
        ck.rgp_mask_([u.clone() for u in updates], nat, adv, alpha=0.1, p=0.3, backend="cuda")
        ck.revise_([r.clone() for r in rev], par, decay=0.5, backend="cuda")
    torch.cuda.synchronize()
    default = torch.cuda.current_stream()
    torch.cuda._sleep(2_000_000_000)  # about a second of spinning on the default stream
    with torch.cuda.stream(side):
        stats = ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3, backend="cuda")
        ck.revise_(rev, par, decay=0.5, backend="cuda")
        thresholds, kept = stats.thresholds.cpu(), stats.kept.cpu()
        masked = [u.cpu() for u in updates]
        revised = rev[0].cpu()
    still_sleeping = not default.query()
    torch.cuda.synchronize()
    assert still_sleeping, "the results were only ready after the default stream's sleep ended"
    assert bitwise_equal_f32(thresholds, exp[0]) and torch.equal(kept, exp[1].cpu())
    assert all(torch.equal(m, e.cpu()) for m, e in zip(masked, expected_updates))
    assert torch.equal(revised, torch.full((1000,), 0.5))


# --- torch.library contract ---------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", ([5, 1, 33], [2, CHUNK + 17], [300, 7]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_rgp_mask(sizes, dtype):
    # No empty tensor and no NaN: a NaN threshold compares unequal to itself in opcheck.
    gen = torch.Generator().manual_seed(len(sizes))
    updates, nat, adv = _inputs("random", sizes, dtype, gen)
    torch.library.opcheck(torch.ops.cure.rgp_mask, (updates, nat, adv, 0.1, 0.3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_revise(dtype):
    gen = torch.Generator().manual_seed(16)
    rev = [torch.randn(n, generator=gen).to("cuda", dtype) for n in (3, 8, CHUNK + 1)]
    par = [torch.randn(n, generator=gen).to("cuda", dtype) for n in (3, 8, CHUNK + 1)]
    torch.library.opcheck(torch.ops.cure.revise, (rev, par, 0.9))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def step(updates, nat, adv):
        stats = ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3, backend="cuda")
        return stats.thresholds * 2, stats.kept

    compiled = torch.compile(step, fullgraph=True)
    gen = torch.Generator().manual_seed(17)
    updates, nat, adv = _inputs("random", [40, 3, CHUNK + 9], torch.float32, gen)
    expected_updates = [u.clone() for u in updates]
    exp_thr, exp_kept = step(expected_updates, nat, adv)
    got_thr, got_kept = compiled(updates, nat, adv)
    assert bitwise_equal_f32(got_thr, exp_thr) and torch.equal(got_kept, exp_kept)
    assert all(torch.equal(u, e) for u, e in zip(updates, expected_updates))


def test_direct_op_calls_name_bad_arguments():
    gen = torch.Generator().manual_seed(18)
    updates, nat, adv = _inputs("random", [5], torch.float32, gen)
    with pytest.raises(RuntimeError, match=r"p must be a finite number in \[0, 1\], got 2"):
        torch.ops.cure.rgp_mask(updates, nat, adv, 0.1, 2.0)
    shape_message = r"grads_adv\[0\] has shape \[4\] but updates\[0\] has shape \[5\]"
    with pytest.raises(RuntimeError, match=shape_message):
        torch.ops.cure.rgp_mask(updates, nat, [adv[0][:4]], 0.1, 0.3)
    with pytest.raises(RuntimeError, match=r"decay must be a finite number in \[0, 1\]"):
        torch.ops.cure.revise(updates, nat, -0.5)


# --- the sampling bracket (tensors of at least BRACKET_MIN elements) --------------------------------------
def _sampled(n: int) -> torch.Tensor:
    """Positions the bracket samples: tile t covers SAMPLE_TILE elements from floor(t * n / SAMPLE_TILES)
    rounded down to a multiple of SAMPLE_TILE (csrc/cuda/plan.h)."""
    mask = torch.zeros(n, dtype=torch.bool)
    for t in range(SAMPLE_TILES):
        start = (t * n // SAMPLE_TILES) // SAMPLE_TILE * SAMPLE_TILE
        mask[start:start + SAMPLE_TILE] = True
    return mask


def _scores_at(values: torch.Tensor, gen: torch.Generator, dtype=torch.float32):
    """Inputs whose scores (alpha = 1) are exactly `values`, at their positions."""
    nat = values.to("cuda", dtype)
    adv = torch.randn(values.numel(), generator=gen).to("cuda", dtype)
    return [torch.randn(values.numel(), generator=gen).to("cuda", dtype)], [nat], [adv]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bracket_exact_on_pathological_inputs(kind, dtype):
    gen = torch.Generator().manual_seed(101)
    sizes = (BRACKET_MIN - 1, BRACKET_MIN, BRACKET_MIN + 1, 3 * BRACKET_MIN + 7, 1 << 20)
    for alpha in (0.0, 0.1, 1.0):
        for p in (0.0, 0.01, 0.3, 0.5, 0.999, 1.0):
            check_exact(*_inputs(kind, sizes, dtype, gen), alpha, p)


@pytest.mark.parametrize("n", (BRACKET_MIN, BRACKET_MIN + 1, 2_359_296))
def test_bracket_exact_on_cases_built_to_defeat_it(n):
    gen = torch.Generator().manual_seed(n)
    rnd = torch.randn(n, generator=gen).abs()
    perm = torch.randperm(n, generator=gen)
    cases = {
        "all equal": torch.full((n,), 0.75),
        "30% zeros": torch.where(torch.rand(n, generator=gen) < 0.3, 0.0, rnd),
        "80% zeros": torch.where(torch.rand(n, generator=gen) < 0.8, 0.0, rnd),
        "two-valued": torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, 2.0),
        "run straddling k": torch.cat([rnd[: int(0.4 * n)], torch.full((n - 2 * int(0.4 * n),), 0.9),
                                       rnd[: int(0.4 * n)] + 2.0])[perm],
        "10% +inf": torch.where(torch.rand(n, generator=gen) < 0.1, math.inf, rnd),
        "denormals": torch.randint(0, 64, (n,), generator=gen, dtype=torch.int32).view(torch.float32),
        "one NaN": torch.cat([rnd[:-1], torch.tensor([math.nan])])[perm],
        "sorted": torch.sort(rnd).values,
        "sorted descending": torch.sort(rnd, descending=True).values,
    }
    sampled = _sampled(n)
    u = torch.rand(n, generator=gen)
    cases["tiles small, rest large"] = torch.where(sampled, u, 10.0 + u)
    cases["tiles large, rest small"] = torch.where(sampled, 10.0 + u, u)
    cases["candidate overflow"] = torch.where(sampled, u, 0.49 + 0.02 * u)
    cases["ties at lo"] = torch.where(sampled, u, torch.full((n,), float(torch.quantile(u[sampled], 0.3))))
    for values in cases.values():
        for p in (0.0, 0.1, 0.29, 0.3, 0.31, 0.45, 0.5, 0.8, 0.97, 1.0):
            check_exact(*_scores_at(values, gen), 1.0, p)


# --- the fused step cure::rgp_sgd_step ---------------------------------------------------------------------
def _step_state(sizes, dtype, gen, kind="random"):
    """params, grads, grads_nat, grads_adv, momentum buffers, revision on the GPU, one tensor of each per size."""
    nat, adv = zip(*(_case(kind, n, gen) for n in sizes))
    rand = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(4)]
    lists = [rand[0], rand[1], list(nat), list(adv), [0.1 * r for r in rand[2]], rand[3]]
    return [[t.to("cuda", dtype) for t in ts] for ts in lists]


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same bits, any NaN equal to any NaN (the reference's NaN payloads come from PyTorch's kernels)."""
    a, b = _bits(x), _bits(y)
    return bool(((a == b) | (x.detach().float().cpu().reshape(-1).isnan()
                             & y.detach().float().cpu().reshape(-1).isnan())).all())


def check_step(lists, *, lr=0.1, momentum=0.9, weight_decay=5e-3, alpha=0.1, p=0.3, mask_mode="grad",
               decay=0.99, revise=True, skip=None):
    params, grads, nat, adv, bufs, rev = lists
    expected = [[t.clone() for t in ts] for ts in (params, grads, bufs, rev)]
    kw = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "alpha": alpha, "p": p,
          "mask_mode": mask_mode, "decay": decay, "skip": skip}
    exp = ck.rgp_sgd_step_(expected[0], expected[1], nat, adv, expected[2], revision=expected[3] if revise else None,
                           backend="reference", **kw)
    got = ck.rgp_sgd_step_(params, grads, nat, adv, bufs, revision=rev if revise else None, backend="cuda", **kw)
    where = f"mode={mask_mode} revise={revise} skip={skip} p={p} sizes={[g.numel() for g in grads]}"
    assert bitwise_equal_f32(got.thresholds, exp.thresholds), f"{where}: {got.thresholds} vs {exp.thresholds}"
    assert torch.equal(got.kept.cpu(), exp.kept.cpu()), where
    assert torch.equal(got.nonfinite.cpu(), exp.nonfinite.cpu()), where
    for name, gots, exps in (("params", params, expected[0]), ("grads", grads, expected[1]),
                             ("momentum_buffers", bufs, expected[2]), ("revision", rev, expected[3])):
        for i, (x, y) in enumerate(zip(gots, exps)):
            assert _same(x, y), f"{where}: {name}[{i}] (n={x.numel()}) differs"
    return got


STEP_SIZES = (0, 1, 3, 8, 257, CHUNK + 1, BRACKET_MIN + 3, 300_001)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_mode", ("grad", "update"))
def test_sgd_step_exact(kind, dtype, mask_mode):
    gen = torch.Generator().manual_seed(201)
    for revise in (True, False):
        for p in (0.0, 0.3, 1.0):
            check_step(_step_state(STEP_SIZES, dtype, gen, kind), mask_mode=mask_mode, revise=revise, p=p)


@pytest.mark.parametrize("kind", ("random", "inf", "nan"))
def test_sgd_step_skip_flag(kind):
    """skip nonzero (or NaN), or any score of the call not finite: params and buffers keep their bits;
    grads are still masked and the revision still moves towards the unchanged params."""
    gen = torch.Generator().manual_seed(202)
    for skip in (torch.tensor(False), torch.tensor(True), torch.tensor(math.nan), torch.tensor([0.0]),
                 torch.tensor(3, dtype=torch.int32)):
        for mask_mode in ("grad", "update"):
            lists = _step_state([5, CHUNK + 1, BRACKET_MIN + 1], torch.float32, gen, kind)
            before = [[t.clone() for t in ts] for ts in lists]
            check_step(lists, skip=skip.cuda(), mask_mode=mask_mode)
            skipped = bool(skip.reshape(()) != 0) or kind != "random"
            unchanged = all(torch.equal(_bits(x), _bits(y)) for i in (0, 4) for x, y in zip(lists[i], before[i]))
            assert unchanged == skipped, (kind, skip)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_step_on_views_and_non_contiguous_tensors(dtype):
    gen = torch.Generator().manual_seed(203)
    sizes = [5, CHUNK + 3, 8, BRACKET_MIN + 2]
    for offset in (0, 1, 3):
        total = sum(sizes) + offset
        flat = [torch.randn(total, generator=gen).to("cuda", dtype) for _ in range(6)]
        lists: list[list[torch.Tensor]] = [[] for _ in range(6)]
        start = offset
        for n in sizes:
            for k in range(6):
                lists[k].append(flat[k][start:start + n])
            start += n
        check_step(lists, mask_mode="update")
    lists = [[torch.randn(300, 700, generator=gen).to("cuda", dtype).t()] for _ in range(6)]
    ptrs = [ts[0].data_ptr() for ts in lists]
    check_step(lists)
    assert [ts[0].data_ptr() for ts in lists] == ptrs


def test_sgd_step_with_more_tensors_than_one_launch_takes():
    rng = random.Random(204)
    gen = torch.Generator().manual_seed(204)
    lists: list[list[torch.Tensor]] = [[] for _ in range(6)]
    for _ in range(300):
        n = rng.choice([0, 1, 64, 257, rng.randrange(1, 3 * CHUNK), BRACKET_MIN + rng.randrange(1000)])
        for k, ts in enumerate(_step_state([n], rng.choice(DTYPES), gen, rng.choice(KINDS[:-1]))):
            lists[k] += ts
    check_step(lists, p=0.4)
    check_step(lists, p=0.4, skip=torch.tensor(False, device="cuda"), mask_mode="update")


def test_no_host_synchronisation():
    """Under sync debug mode "error", any host synchronisation inside the ops raises."""
    gen = torch.Generator().manual_seed(205)
    lists = _step_state([7, CHUNK + 1, BRACKET_MIN + 5], torch.float32, gen)
    skip = torch.zeros((), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        params, grads, nat, adv, bufs, rev = lists
        torch.ops.cure.rgp_sgd_step(params, grads, nat, adv, bufs, rev, 0.1, 0.9, 5e-3, 0.1, 0.3, "update", 0.99, skip)
        torch.ops.cure.rgp_sgd_step(params, grads, nat, adv, bufs, [], 0.1, 0.9, 5e-3, 0.1, 0.3, "grad", 0.0, None)
        torch.ops.cure.rgp_mask(grads, nat, adv, 0.1, 0.3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_graph_capture_of_one_step():
    gen = torch.Generator().manual_seed(206)
    sizes = [5, CHUNK + 3, 0, BRACKET_MIN + 7, 2 * CHUNK]
    lists = _step_state(sizes, torch.float32, gen)
    skip = torch.zeros((), device="cuda")
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3, "alpha": 0.1, "p": 0.3, "mask_mode": "update",
             "decay": 0.99}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        warm = [[t.clone() for t in ts] for ts in lists]
        ck.rgp_sgd_step_(warm[0], warm[1], warm[2], warm[3], warm[4], revision=warm[5], skip=skip,
                         backend="cuda", **hyper)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    params, grads, nat, adv, bufs, rev = lists
    with torch.cuda.graph(graph):
        stats = ck.rgp_sgd_step_(params, grads, nat, adv, bufs, revision=rev, skip=skip, backend="cuda", **hyper)
    for kind, flag in (("random", 0.0), ("ties", 0.0), ("zeros", 1.0), ("inf", 0.0), ("random", 0.0)):
        fresh = _step_state(sizes, torch.float32, gen, kind)
        for ts, new in zip(lists, fresh):
            for t, x in zip(ts, new):
                t.copy_(x)
        skip.fill_(flag)
        expected = [[t.clone() for t in ts] for ts in (params, grads, bufs, rev)]
        exp = ck.rgp_sgd_step_(expected[0], expected[1], nat, adv, expected[2], revision=expected[3],
                               skip=skip.clone(), backend="reference", **hyper)
        graph.replay()
        torch.cuda.synchronize()
        assert bitwise_equal_f32(stats.thresholds, exp.thresholds), kind
        assert torch.equal(stats.kept.cpu(), exp.kept.cpu()) and torch.equal(stats.nonfinite.cpu(), exp.nonfinite.cpu())
        for gots, exps in zip((params, grads, bufs, rev), expected):
            assert all(_same(x, y) for x, y in zip(gots, exps)), kind


def test_opcheck_rgp_sgd_step():
    gen = torch.Generator().manual_seed(207)
    params, grads, nat, adv, bufs, rev = _step_state([5, 33, CHUNK + 17], torch.float32, gen)
    torch.library.opcheck(torch.ops.cure.rgp_sgd_step,
                          (params, grads, nat, adv, bufs, rev, 0.1, 0.9, 5e-3, 0.1, 0.3, "grad", 0.99,
                           torch.zeros((), device="cuda")))


def test_rgp_sgd_step_direct_calls_name_bad_arguments():
    gen = torch.Generator().manual_seed(208)
    params, grads, nat, adv, bufs, rev = _step_state([5], torch.float32, gen)
    op = torch.ops.cure.rgp_sgd_step
    with pytest.raises(RuntimeError, match="mask_mode must be 'grad' or 'update', got 'both'"):
        op(params, grads, nat, adv, bufs, rev, 0.1, 0.9, 0.0, 0.1, 0.3, "both", 0.9, None)
    with pytest.raises(RuntimeError, match=r"lr must be a finite number >= 0, got -1"):
        op(params, grads, nat, adv, bufs, rev, -1.0, 0.9, 0.0, 0.1, 0.3, "grad", 0.9, None)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] has shape \[4\]"):
        op(params, grads, nat, adv, [bufs[0][:4]], rev, 0.1, 0.9, 0.0, 0.1, 0.3, "grad", 0.9, None)
    with pytest.raises(RuntimeError, match="skip must be None or a one-element real tensor"):
        op(params, grads, nat, adv, bufs, rev, 0.1, 0.9, 0.0, 0.1, 0.3, "grad", 0.9, torch.zeros(2, device="cuda"))
