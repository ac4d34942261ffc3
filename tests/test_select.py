"""The selection alone (``rgp_select``), the fused step with given thresholds (``rgp_sgd_step_(...,
thresholds=, nonfinite=)``) and the trainer's overlap of the selection with the last backward pass.

Contracts checked bit for bit: ``rgp_select`` returns the thresholds and non-finite counts of
``rgp_mask_reference`` on the awkward-shape battery (tests/rgp_cases.py), on every backend that runs here;
``rgp_sgd_step_`` given what ``rgp_select`` returned writes the same bits and returns the same statistics
as without. Without a GPU the Triton kernels run in Triton's interpreter (small shapes) and the CUDA
kernels in the emulation harness (tests/test_cuda_emulation.py); the tests that need a GPU are skipped.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from rgp_cases import DTYPES, KINDS, bitwise_equal_f32, make_case_lists

import cure.methods as methods
import cure_kernels as ck
from cure.config import TrainConfig
from cure.data import DATASETS
from cure.methods import build_step_context, overlaps_selection
from cure.models import build_model
from cure_kernels import backends, reference

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
SELECT_BACKENDS_CPU = [b for b in ck.BACKENDS if backends.unavailable_reason(b, CPU, "rgp_select") is None]
STEP_BACKENDS_CPU = [b for b in ck.BACKENDS if backends.unavailable_reason(b, CPU, "rgp_sgd_step") is None]
BLOCK = 4096  # triton_rgp_mask.BLOCK
# Per backend, sizes it can afford (Triton's interpreter is slow): empty, 1, 2, a prime, one past a block;
# the CPU kernels also a tensor above their bracket cutoff (65536).
SIZES = {"reference": (0, 1, 2, 13, 257, BLOCK + 1), "cpu": (0, 1, 2, 13, 257, BLOCK + 1, 70001),
         "torch": (0, 1, 2, 13, 257, BLOCK + 1, 70001),
         "triton": (0, 1, 2, 13, BLOCK + 1)}
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3, "alpha": 0.1, "p": 0.3}


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().reshape(-1)
    if not t.is_floating_point():  # (integer buffers, e.g. BatchNorm's step count: their values are their bits)
        return t
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _same_bits(xs, ys) -> bool:
    return len(xs) == len(ys) and all(torch.equal(_bits(x), _bits(y)) for x, y in zip(xs, ys))


def _grads(kind, sizes, dtype, seed, device="cpu"):
    return make_case_lists(kind, sizes, dtype, torch.Generator().manual_seed(seed), device)


def _assert_select_matches_mask_reference(backend, nat, adv, alpha, p):
    updates = [torch.zeros_like(g) for g in nat]
    exp_thr, _, exp_nonfinite = reference.rgp_mask_reference(updates, nat, adv, alpha, p)
    before = [(_bits(g).clone(), g._version) for g in (*nat, *adv)]
    thresholds, nonfinite = ck.rgp_select(nat, adv, alpha=alpha, p=p, backend=backend)
    assert thresholds.dtype == torch.float32 and nonfinite.dtype == torch.int64
    assert thresholds.shape == nonfinite.shape == (len(nat),)
    assert thresholds.device == nonfinite.device == (nat[0].device if nat else CPU)
    assert bitwise_equal_f32(thresholds, exp_thr), (backend, thresholds, exp_thr)
    assert torch.equal(nonfinite.cpu(), exp_nonfinite.cpu()), (backend, nonfinite, exp_nonfinite)
    # Reads its inputs only: same bits, no version bump.
    assert all(torch.equal(_bits(g), b) and g._version == v for g, (b, v) in zip((*nat, *adv), before))
    return thresholds, nonfinite


# --- rgp_select against the reference's thresholds ------------------------------------------------------
@pytest.mark.parametrize("backend", SELECT_BACKENDS_CPU)
@pytest.mark.parametrize("kind", KINDS)
def test_select_equals_the_mask_reference_on_the_battery(backend, kind):
    for k, dtype in enumerate(DTYPES):
        nat, adv = _grads(kind, SIZES[backend], dtype, seed=10 * k + KINDS.index(kind))
        for alpha, p in ((0.1, 0.3), (0.0, 0.999), (1.0, 0.0), (0.37, 1.0)):
            _assert_select_matches_mask_reference(backend, nat, adv, alpha, p)


@pytest.mark.parametrize("backend", SELECT_BACKENDS_CPU)
def test_select_on_views_non_contiguous_and_mixed_dtypes(backend):
    gen = torch.Generator().manual_seed(3)
    flat = torch.randn(2 * 600 + 7, generator=gen)
    views = [flat[1:301], flat[301:601].view(20, 15), flat[601:1201:2]]
    nat = views + [torch.randn(9, 7, generator=gen).t(), torch.randn(33, generator=gen).to(torch.bfloat16),
                   torch.randn(5, generator=gen).half()]
    adv = [torch.randn(v.shape, generator=gen).to(v.dtype) for v in nat]
    _assert_select_matches_mask_reference(backend, nat, adv, 0.2, 0.45)


def test_select_triton_through_the_sampling_bracket(monkeypatch):
    """Tensors above the Triton bracket's cutoff (lowered so the interpreter can run them): the selection
    alone leaves the bracket statistics of its call, as rgp_mask_ does."""
    if "triton" not in SELECT_BACKENDS_CPU:
        pytest.skip("Triton cannot run here")
    from cure_kernels import triton_rgp_mask

    monkeypatch.setattr(triton_rgp_mask, "BRACKET_MIN", 2048)
    monkeypatch.setattr(triton_rgp_mask, "SAMPLE_TILE", 16)
    monkeypatch.setattr(triton_rgp_mask, "SAMPLE_TILES", 16)
    monkeypatch.setattr(triton_rgp_mask, "CAND_FRACTION", 2)
    for kind in ("random", "ties", "nan"):
        nat, adv = _grads(kind, [2048, 5, 2 * BLOCK + 3], torch.float32, seed=4)
        _assert_select_matches_mask_reference("triton", nat, adv, 0.1, 0.3)
        assert triton_rgp_mask.last_bracket_misses()[0] == 2


def test_select_of_empty_lists_and_backend_resolution():
    thresholds, nonfinite = ck.rgp_select([], [], alpha=0.1, p=0.3)
    assert thresholds.shape == nonfinite.shape == (0,) and nonfinite.dtype == torch.int64
    nat, adv = _grads("random", [10], torch.float32, 0)
    with pytest.raises(ValueError, match="runs on CUDA tensors, but the tensors are on cpu"):
        ck.rgp_select(nat, adv, alpha=0.1, p=0.3, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ck.rgp_select(nat, adv, alpha=0.1, p=0.3, backend="fast")
    with pytest.raises(ValueError, match="p must be a finite number in"):
        ck.rgp_select(nat, adv, alpha=0.1, p=1.5)
    with pytest.raises(TypeError, match="alpha must be a Python float"):
        ck.rgp_select(nat, adv, alpha=torch.tensor(0.1), p=0.3)
    with pytest.raises(ValueError, match=r"len\(grads_nat\)=1, len\(grads_adv\)=2"):
        ck.rgp_select(nat, adv + adv, alpha=0.1, p=0.3)
    with pytest.raises(ValueError, match=r"grads_adv\[0\] has shape \(3,\)"):
        ck.rgp_select(nat, [torch.zeros(3)], alpha=0.1, p=0.3)
    with pytest.raises(TypeError, match="supported dtypes"):
        ck.rgp_select([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3, dtype=torch.float64)], alpha=0.1, p=0.3)


def test_select_accepts_inputs_that_require_grad_and_leaves_autograd_alone():
    """Read-only: a gradient that requires grad (an intermediate of a graph) is selected on, and a backward
    through it afterwards is still valid."""
    x = torch.randn(50, requires_grad=True)
    y = x * 2
    adv = torch.randn(50)
    exp, _ = reference.rgp_select_reference([y.detach()], [adv], 0.5, 0.4)
    for backend in SELECT_BACKENDS_CPU:
        thresholds, nonfinite = ck.rgp_select([y], [adv], alpha=0.5, p=0.4, backend=backend)
        assert bitwise_equal_f32(thresholds, exp)
        assert not thresholds.requires_grad and not nonfinite.requires_grad  # statistics, not differentiable
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((50,), 2.0))


# --- torch.library -------------------------------------------------------------------------------------
def _select_args():
    nat, adv = _grads("random", [5, 12], torch.float32, 23)
    return (nat, adv, 0.1, 0.3)


@pytest.mark.parametrize("op", ["rgp_select_reference", "rgp_select_triton", "rgp_select"])
def test_opcheck_select(op):
    backend = {"rgp_select_reference": "reference", "rgp_select_triton": "triton", "rgp_select": "cpu"}[op]
    if backend not in SELECT_BACKENDS_CPU:
        pytest.skip(f"backend {backend!r} cannot run here")
    torch.library.opcheck(getattr(torch.ops.cure, op), _select_args())


@pytest.mark.parametrize("backend", [b for b in SELECT_BACKENDS_CPU if b != "triton"])
def test_torch_compile_fullgraph_select_then_step(backend):
    torch._dynamo.reset()

    def step(params, grads, nat, adv, bufs):
        thresholds, nonfinite = ck.rgp_select(nat, adv, alpha=0.2, p=0.4, backend=backend)
        stats = ck.rgp_sgd_step_(params, grads, nat, adv, bufs, lr=0.05, momentum=0.9, weight_decay=1e-3,
                                 alpha=0.2, p=0.4, mask_mode="update", thresholds=thresholds, nonfinite=nonfinite,
                                 backend=backend)
        return stats.thresholds * 2, stats.kept + stats.nonfinite

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    lists = _state([40, 3, 17], torch.float32, 24)[:5]
    expected = _clone(lists)
    exp_thr, exp_counts = step(*expected)
    got_thr, got_counts = compiled(*lists)
    assert bitwise_equal_f32(got_thr, exp_thr) and torch.equal(got_counts, exp_counts)
    assert all(_same_bits(a, b) for a, b in zip(lists, expected))


# --- rgp_sgd_step_ with given thresholds ---------------------------------------------------------------
def _state(sizes, dtype, seed, kind="random", device="cpu"):
    """params, grads, grads_nat, grads_adv, momentum buffers, revision: one tensor of each per size."""
    gen = torch.Generator().manual_seed(seed)
    nat, adv = _grads(kind, sizes, dtype, seed + 1000, device)
    rand = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(4)]
    lists = [rand[0], rand[1], nat, adv, [0.1 * r for r in rand[2]], rand[3]]
    return [[t.to(device=device, dtype=dtype) for t in ts] for ts in lists]


def _clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


def _step(backend, lists, *, mask_mode="grad", revise=True, skip=None, thresholds=None, nonfinite=None, **kw):
    params, grads, nat, adv, bufs, rev = lists
    return ck.rgp_sgd_step_(params, grads, nat, adv, bufs, mask_mode=mask_mode, revision=rev if revise else None,
                            decay=0.99, skip=skip, thresholds=thresholds, nonfinite=nonfinite, backend=backend,
                            **(HYPER | kw))


def _assert_given_equals_plain(backend, lists, select_backend=None, **kw):
    """The plain call and select-then-apply on copies of the same state: every bit and statistic equal."""
    plain = _clone(lists)
    exp = _step(backend, plain, **kw)
    alpha, p = kw.get("alpha", HYPER["alpha"]), kw.get("p", HYPER["p"])
    thresholds, nonfinite = ck.rgp_select(lists[2], lists[3], alpha=alpha, p=p, backend=select_backend or backend)
    given_before = (thresholds.clone(), nonfinite.clone())
    got = _step(backend, lists, thresholds=thresholds, nonfinite=nonfinite, **kw)
    assert bitwise_equal_f32(got.thresholds, exp.thresholds), (got.thresholds, exp.thresholds)
    assert torch.equal(got.kept, exp.kept), (got.kept, exp.kept)
    assert torch.equal(got.nonfinite, exp.nonfinite)
    for name, i in (("params", 0), ("grads", 1), ("momentum_buffers", 4), ("revision", 5)):
        assert _same_bits(lists[i], plain[i]), f"{backend}: {name} differ"
    # The statistics are the op's own tensors, and the given ones are left as they were.
    assert got.thresholds.data_ptr() != thresholds.data_ptr() and got.nonfinite.data_ptr() != nonfinite.data_ptr()
    assert bitwise_equal_f32(thresholds, given_before[0]) and torch.equal(nonfinite, given_before[1])
    return got


@pytest.mark.parametrize("backend", STEP_BACKENDS_CPU)
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
@pytest.mark.parametrize("skip", [None, False, True])
def test_given_thresholds_equal_the_plain_step(backend, mask_mode, skip):
    sizes = SIZES[backend]
    for k, dtype in enumerate(DTYPES):
        for revise in (True, False):
            flag = None if skip is None else torch.tensor(skip)
            _assert_given_equals_plain(backend, _state(sizes, dtype, 7 * k + revise), mask_mode=mask_mode,
                                       revise=revise, skip=flag)


@pytest.mark.parametrize("backend", STEP_BACKENDS_CPU)
@pytest.mark.parametrize("kind", KINDS)
def test_given_thresholds_equal_the_plain_step_on_pathological_scores(backend, kind):
    """NaN and inf scores included: with skip given, the given non-finite counts decide the skip."""
    for skip in (None, torch.tensor(0.0)):
        _assert_given_equals_plain(backend, _state(SIZES[backend], torch.float32, 3, kind), skip=skip,
                                   mask_mode="update", p=0.6, alpha=0.3)


def test_given_thresholds_skip_follows_the_given_nonfinite_counts():
    """The skip decision reads nonfinite: a nonzero count skips the SGD update like a non-finite score."""
    for backend in STEP_BACKENDS_CPU:
        lists = _state([50, 7], torch.float32, 11)
        before = _clone(lists)
        thresholds, nonfinite = ck.rgp_select(lists[2], lists[3], alpha=0.1, p=0.3, backend=backend)
        _step(backend, lists, skip=torch.tensor(False), thresholds=thresholds, nonfinite=nonfinite + 1)
        assert _same_bits(lists[0], before[0]) and _same_bits(lists[4], before[4]), backend  # skipped
        assert not _same_bits(lists[1], before[1]) and not _same_bits(lists[5], before[5])  # masked, revised
        lists = _clone(before)
        _step(backend, lists, skip=None, thresholds=thresholds, nonfinite=nonfinite + 1)  # no skip tensor
        assert not _same_bits(lists[0], before[0]), backend


@pytest.mark.parametrize("pair", [("cpu", "reference"), ("reference", "cpu"), ("triton", "cpu"),
                                  ("cpu", "triton")])
def test_thresholds_of_one_backend_drive_another(pair):
    select_backend, step_backend = pair
    if select_backend not in SELECT_BACKENDS_CPU or step_backend not in STEP_BACKENDS_CPU:
        pytest.skip(f"{pair} cannot run here")
    _assert_given_equals_plain(step_backend, _state([0, 3, 300, 4097], torch.bfloat16, 5), select_backend,
                               mask_mode="update", skip=torch.tensor(0))


def test_cpu_given_thresholds_on_views_and_non_contiguous_tensors():
    if "cpu" not in STEP_BACKENDS_CPU:
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(8)
    flats = [torch.randn(2 * 300 + 40, generator=gen) for _ in range(6)]
    lists = [[f[:300], f[300:600].view(20, 15), f[600:640].view(8, 5).t()] for f in flats]
    _assert_given_equals_plain("cpu", lists, mask_mode="update", skip=torch.tensor(0))


@pytest.mark.parametrize("backend", STEP_BACKENDS_CPU)
@pytest.mark.parametrize("change, exc, words", [
    ("only_thresholds", ValueError, "thresholds was given without nonfinite"),
    ("only_nonfinite", ValueError, "nonfinite was given without thresholds"),
    ("short", ValueError, r"thresholds must be a 1-D tensor of 2 elements .* got shape \(1,\)"),
    ("two_dim", ValueError, r"thresholds must be a 1-D tensor of 2 elements .* got shape \(2, 1\)"),
    ("float64", TypeError, "thresholds must have dtype torch.float32, got torch.float64"),
    ("nonfinite_int32", TypeError, "nonfinite must have dtype torch.int64, got torch.int32"),
    ("strided", ValueError, "thresholds must be contiguous"),
    ("meta", ValueError, "thresholds is on meta but the tensors are on cpu"),
    ("list", TypeError, "thresholds must be a tensor"),
])
def test_bad_given_thresholds_are_named_and_nothing_changes(backend, change, exc, words):
    lists = _state([10, 4], torch.float32, 20)
    thresholds, nonfinite = ck.rgp_select(lists[2], lists[3], alpha=0.1, p=0.3, backend="reference")
    kw = {"thresholds": thresholds, "nonfinite": nonfinite}
    if change == "only_thresholds":
        kw["nonfinite"] = None
    elif change == "only_nonfinite":
        kw["thresholds"] = None
    elif change == "short":
        kw["thresholds"] = thresholds[:1]
    elif change == "two_dim":
        kw["thresholds"] = thresholds.view(2, 1)
    elif change == "float64":
        kw["thresholds"] = thresholds.double()
    elif change == "nonfinite_int32":
        kw["nonfinite"] = nonfinite.int()
    elif change == "strided":
        kw["thresholds"] = torch.stack([thresholds, thresholds], 1)[:, 0]
    elif change == "meta":
        kw["thresholds"] = thresholds.to("meta")
    elif change == "list":
        kw["thresholds"] = thresholds.tolist()
    before = _clone(lists)
    with pytest.raises(exc, match=words):
        _step(backend, lists, **kw)
    assert all(_same_bits(a, b) for a, b in zip(lists, before))


def test_the_cpu_kernel_checks_given_thresholds_itself():
    """Direct calls of torch.ops.cure.rgp_sgd_step (no Python validation) are refused by the kernel."""
    if "cpu" not in STEP_BACKENDS_CPU:
        pytest.skip("the C++ extension is not built")
    lists = _state([10, 4], torch.float32, 21)
    thr, nonfinite = ck.rgp_select(lists[2], lists[3], alpha=0.1, p=0.3)
    args = (lists[0], lists[1], lists[2], lists[3], lists[4], lists[5], 0.1, 0.9, 0.0, 0.1, 0.3, "grad", 0.9, None)
    with pytest.raises(RuntimeError, match="thresholds and nonfinite are given together"):
        torch.ops.cure.rgp_sgd_step(*args, thr, None)
    with pytest.raises(RuntimeError, match="nonfinite must be a contiguous 1-D Long CPU tensor of 2 elements"):
        torch.ops.cure.rgp_sgd_step(*args, thr, nonfinite[:1])


def test_opcheck_step_with_given_thresholds():
    lists = _state([5, 12], torch.float32, 23)
    thr, nonfinite = reference.rgp_select_reference(lists[2], lists[3], 0.1, 0.3)
    args = (*lists, 0.1, 0.9, 5e-4, 0.1, 0.3, "update", 0.99, torch.tensor(0.0), thr, nonfinite)
    torch.library.opcheck(torch.ops.cure.rgp_sgd_step_reference, args)
    if "triton" in STEP_BACKENDS_CPU:
        torch.library.opcheck(torch.ops.cure.rgp_sgd_step_triton, args)


# --- a GPU: the C++ CUDA kernels and Triton on CUDA tensors --------------------------------------------
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_select_and_given_step_on_cuda(backend):
    dev = torch.device("cuda")
    if backends.unavailable_reason(backend, dev, "rgp_select") is not None:
        pytest.skip(backends.unavailable_reason(backend, dev, "rgp_select"))
    sizes = (0, 1, 2, 13, 257, BLOCK + 1, 70001, 300007)
    for kind in KINDS:
        for dtype in DTYPES:
            nat, adv = _grads(kind, sizes, dtype, 31, "cuda")
            _assert_select_matches_mask_reference(backend, nat, adv, 0.1, 0.3)
            for skip in (None, torch.tensor(0.0, device=dev)):
                _assert_given_equals_plain(backend, _state(sizes, dtype, 32, kind, "cuda"), skip=skip,
                                           mask_mode="update")


# --- the trainer ---------------------------------------------------------------------------------------
def test_overlap_is_chosen_only_on_cuda_single_process_with_a_fast_backend(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not overlaps_selection(cpu, "auto", False)
    assert not overlaps_selection(cpu, "cpu", False)
    assert not overlaps_selection(cuda, "reference", False)
    assert not overlaps_selection(cuda, "triton", True)  # data-parallel: the all-reduce comes after backward
    assert not overlaps_selection(cuda, "cpu", False)  # cannot run there: no overlap (and no error here)
    # "auto" and explicit names, whatever this machine has: decided by what rgp_select resolves to.
    for triton_error, cuda_kernels, expected in ((None, True, True), (None, False, True),
                                                 ("no Triton", True, True), ("no Triton", False, False)):
        kernels = {(op, "CPU") for op in backends.CXX_OPS} | (
            {(op, "CUDA") for op in backends.CXX_OPS} if cuda_kernels else set())
        probe = backends._Probe(None, True, cuda_kernels, frozenset(kernels), triton_error, False, True)
        monkeypatch.setattr(backends, "PROBE", probe)
        assert overlaps_selection(cuda, "auto", False) is expected
        assert overlaps_selection(cuda, "cuda", False) is cuda_kernels
        assert overlaps_selection(cuda, "triton", False) is (triton_error is None)
        assert not overlaps_selection(cuda, "auto", True)


SPEC = DATASETS["fashion-mnist"]


def _cure_context(seed=0, device="cpu", **kw):
    cfg = TrainConfig(**(dict(method="cure", dataset="fashion-mnist", arch="cnn", lr=0.05, weight_decay=5e-4,
                              attack_steps=1, eps=0.1, step_size=0.05, alpha=0.1, p=0.3, gamma=1.0, beta=1.0,
                              momentum=0.9, revision_rate=0.6, kernel_backend="auto") | kw)).validate()
    torch.manual_seed(seed)
    module = build_model(cfg.arch, SPEC)
    return build_step_context(cfg, module.to(device), eps=cfg.eps, step_size=cfg.step_size, attack_seed=1,
                              revision_seed=2)


def _batch(seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((16,) + tuple(SPEC.shape), generator=g)
    y = torch.randint(0, SPEC.num_classes, (16,), generator=g)
    return x.to(device), y.to(device)


def _recording(real, calls):
    """A stand-in for rgp_sgd_step_ that records copies of its inputs and outputs, for :func:`_assert_replays`."""
    def step(params, grads, nat, adv, bufs, **kw):
        inputs = [[t.clone() for t in ts] for ts in (params, grads, nat, adv, bufs, kw["revision"] or [])]
        stats = real(params, grads, nat, adv, bufs, **kw)
        outputs = [[t.clone() for t in ts] for ts in (params, grads, bufs, kw["revision"] or [])]
        calls.append((kw["thresholds"] is not None, inputs, dict(kw), stats, outputs))
        return stats

    return step


def _assert_replays(real, calls):
    """Each recorded call given thresholds, replayed as the one call (it selects itself) on copies of its
    inputs: the same statistics and bits. The thresholds were thus selected on the final captured gradients."""
    replayed = 0
    for given, inputs, kw, stats, outputs in calls:
        if not given:
            continue
        params, grads, nat, adv, bufs, rev = inputs
        kw = kw | {"thresholds": None, "nonfinite": None, "revision": rev if kw["revision"] is not None else None}
        again = real(params, grads, nat, adv, bufs, **kw)
        assert bitwise_equal_f32(again.thresholds, stats.thresholds)
        assert torch.equal(again.kept, stats.kept) and torch.equal(again.nonfinite, stats.nonfinite)
        assert all(_same_bits(a, b) for a, b in zip((params, grads, bufs, rev), outputs))
        replayed += 1
    return replayed


class _FakeStream:
    """Stands in for torch.cuda.Stream on a CPU run: records what the step asks of the streams."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


def _fake_streams(monkeypatch, log: list) -> list:
    """Replace torch.cuda's streams by recorded stand-ins and force the overlap path (CPU tensors); return
    the stack of current streams (its last entry is the current one)."""
    current = [_FakeStream("main", log)]

    @contextlib.contextmanager
    def stream(s):
        log.append(("enter", s.name))
        current.append(s)
        try:
            yield
        finally:
            current.pop()
            log.append(("exit", s.name))

    def record_stream(self, s):
        log.append(("record", s.name, self.data_ptr()))

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    monkeypatch.setattr(methods, "overlaps_selection", lambda device, backend, distributed: not distributed)
    return current


def test_cure_step_overlap_path_orders_streams_and_gives_the_same_bits(monkeypatch):
    """The side-stream path, run on CPU with recorded streams: the side stream waits for the current one
    before the selection, the selection runs inside the side stream's context, its outputs are recorded on
    the current stream and the captured buffers on the side stream, the last backward pass is queued
    after the selection, the current stream waits for the side stream before the apply pass, and the
    result is bit for bit the one-call step."""
    log: list = []
    current = _fake_streams(monkeypatch, log)
    real_select, real_step = methods.rgp_select, methods.rgp_sgd_step_

    def select(*args, **kw):
        out = real_select(*args, **kw)
        log.append(("select", current[-1].name, out[0].data_ptr(), out[1].data_ptr()))
        return out

    calls = []
    recording = _recording(real_step, calls)

    def step(*args, **kw):
        log.append(("step", current[-1].name, kw["thresholds"] is not None))
        return recording(*args, **kw)

    monkeypatch.setattr(methods, "rgp_select", select)
    monkeypatch.setattr(methods, "rgp_sgd_step_", step)
    real_backward = torch.Tensor.backward

    def backward(self, *args, **kw):
        log.append(("backward", kw.get("retain_graph", False)))
        return real_backward(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "backward", backward)

    overlapped, plain = _cure_context(), _cure_context()
    plain.overlap_selection = False
    for k in range(3):
        log.clear()
        x, y = _batch(k)
        got = methods.cure_step(overlapped, x, y)
        exp = methods.cure_step(plain, x, y)
        assert bitwise_equal_f32(got.mask_stats.thresholds, exp.mask_stats.thresholds)
        assert torch.equal(got.mask_stats.kept, exp.mask_stats.kept)
        assert torch.equal(got.loss, exp.loss) and got.revised == exp.revised
        for name, a, b in (("params", overlapped.module.parameters(), plain.module.parameters()),
                           ("buffers", overlapped.module.buffers(), plain.module.buffers()),
                           ("grads", *([q.grad for q in c.masker.params] for c in (overlapped, plain))),
                           ("momentum", *([c.optimizer.state[q]["momentum_buffer"] for q in c.masker.params]
                                          for c in (overlapped, plain)))):
            assert _same_bits(list(a), list(b)), f"step {k}: {name} differ"
        if overlapped.revision is not None:
            assert _same_bits(list(overlapped.revision.module.state_dict().values()),
                              list(plain.revision.module.state_dict().values()))
        # The overlapped step's events: everything up to its step call (the plain step's follow).
        mine = log[:next(i for i, e in enumerate(log) if e[0] == "step") + 1]
        kinds = [e[0] for e in mine]
        i_wait_side = mine.index(("wait", "side", "main"))
        i_enter, i_select, i_exit = kinds.index("enter"), kinds.index("select"), kinds.index("exit")
        i_last_backward = max(i for i, e in enumerate(mine) if e == ("backward", False))
        i_wait_main = mine.index(("wait", "main", "side"))
        i_step = kinds.index("step")
        assert i_wait_side < i_enter < i_select < i_exit < i_last_backward < i_wait_main < i_step, mine
        assert mine[i_select][1] == "side" and mine[i_step][1:] == ("main", True)
        _, _, thr_ptr, nonfinite_ptr = mine[i_select]
        records = {(e[1], e[2]) for e in mine if e[0] == "record"}
        assert {("main", thr_ptr), ("main", nonfinite_ptr)} <= records
        captured = {("side", b.data_ptr()) for kind in ("nat", "adv") for b in overlapped.masker.buffers[kind].values()}
        assert captured <= records
        assert sum(1 for e in mine if e[0] == "backward") == 3  # nat, adv (retained), then the last one
        assert [e for e in log[len(mine):] if e[0] in ("wait", "enter", "select", "record")] == []  # plain: none
    assert overlapped._selection_stream is not None and overlapped._selection_stream.name == "side"
    assert [c[0] for c in calls] == [True, False] * 3
    assert _assert_replays(real_step, calls) == 3


def test_main_stream_waits_for_the_selection_also_when_the_last_backward_pass_raises(monkeypatch):
    log: list = []
    _fake_streams(monkeypatch, log)
    real_backward = torch.Tensor.backward

    def backward(self, *args, **kw):
        if not kw.get("retain_graph", False):
            log.append(("backward raises",))
            raise RuntimeError("out of memory (simulated)")
        return real_backward(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    with pytest.raises(RuntimeError, match="simulated"):
        methods.cure_step(_cure_context(), *_batch(0))
    kinds = [e[0] for e in log]
    assert kinds.index("wait") < kinds.index("backward raises") < len(log) - 1
    assert log[-1] == ("wait", "main", "side")


def test_cure_step_on_cpu_makes_one_call():
    ctx = _cure_context()
    assert ctx.overlap_selection and ctx._selection_stream is None
    calls = []
    real = methods.rgp_sgd_step_
    try:
        methods.rgp_sgd_step_ = lambda *a, **kw: calls.append(kw["thresholds"]) or real(*a, **kw)
        methods.cure_step(ctx, *_batch(0))
    finally:
        methods.rgp_sgd_step_ = real
    assert calls == [None] and ctx._selection_stream is None


@needs_cuda
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
def test_cure_step_with_overlap_is_bit_identical_on_cuda(mask_mode, monkeypatch):
    """On a GPU. (1) Every overlapped step's update, replayed as the one call on copies of its inputs (the
    final captured gradients), gives the same bits and statistics: the side stream selected on the final
    gradients. (2) Seeded CURE steps with and without the overlap, from the same state, give identical
    bits (cuDNN made deterministic, so that the backward passes themselves agree)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    overlapped, plain = (_cure_context(device="cuda", mask_mode=mask_mode),
                         _cure_context(device="cuda", mask_mode=mask_mode))
    plain.overlap_selection = False
    if not overlaps_selection(torch.device("cuda"), overlapped.masker.backend, False):
        pytest.skip("no fast backend for CUDA tensors here")
    real = methods.rgp_sgd_step_
    calls = []
    monkeypatch.setattr(methods, "rgp_sgd_step_", _recording(real, calls))
    for k in range(3):
        x, y = _batch(k, "cuda")
        got = methods.cure_step(overlapped, x, y)
        exp = methods.cure_step(plain, x, y)
        assert bitwise_equal_f32(got.mask_stats.thresholds, exp.mask_stats.thresholds)
        assert torch.equal(got.mask_stats.kept, exp.mask_stats.kept)
        assert torch.equal(got.mask_stats.nonfinite, exp.mask_stats.nonfinite)
        assert _same_bits(list(overlapped.module.parameters()), list(plain.module.parameters()))
        assert _same_bits([q.grad for q in overlapped.masker.params], [q.grad for q in plain.masker.params])
    assert [c[0] for c in calls] == [True, False] * 3 and overlapped._selection_stream is not None
    assert _assert_replays(real, calls) == 3
    torch.cuda.synchronize()
