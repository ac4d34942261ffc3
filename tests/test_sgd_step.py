"""The fused step op ``rgp_sgd_step_``: conserve mask + SGD (both mask modes) + revision EMA.

The reference is checked against its definition (rgp_mask_reference, the float32 formula, and
torch.optim.SGD within float32 rounding); the Triton backend is checked against the reference bit for
bit. Without a GPU the Triton kernels run in Triton's interpreter (tests/conftest.py), on small shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from rgp_cases import DTYPES, KINDS, bitwise_equal_f32, make_case

import cure_kernels as ck
from cure_kernels import reference

TRITON_DEVICES = [d for d in ("cpu", "cuda") if (d == "cpu" or torch.cuda.is_available())
                  and "triton" in ck.available_backends(d)]
needs_triton = pytest.mark.skipif(
    not TRITON_DEVICES, reason="backend 'triton' cannot run here: needs a CUDA GPU, or TRITON_INTERPRET=1 set "
                               "before Python starts (tests/conftest.py sets it when no GPU is present)")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

BLOCK = 4096  # triton_rgp_mask.BLOCK: BLOCK + 1 puts one element in a second program
SIZES = (0, 1, 2, 13, 257, BLOCK + 1)
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3, "alpha": 0.1, "p": 0.3}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _same_bits(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    return len(xs) == len(ys) and all(torch.equal(_bits(x), _bits(y)) for x, y in zip(xs, ys))


def _state(sizes, dtype, device, seed, kind="random"):
    """params, grads, grads_nat, grads_adv, momentum buffers, revision: one tensor of each per size."""
    gen = torch.Generator().manual_seed(seed)
    nat, adv = [], []
    for n in sizes:
        a, b = make_case(kind, n, gen) if n else (torch.empty(0), torch.empty(0))
        nat.append(a)
        adv.append(b)
    rand = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(4)]
    lists = [rand[0], rand[1], nat, adv, [0.1 * r for r in rand[2]], rand[3]]
    return [[t.to(device=device, dtype=dtype) for t in ts] for ts in lists]


def _clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


def _run(backend, lists, *, mask_mode="grad", revise=True, decay=0.99, skip=None, **overrides):
    params, grads, nat, adv, bufs, rev = lists
    kw = {**HYPER, **overrides}
    return ck.rgp_sgd_step_(params, grads, nat, adv, bufs, mask_mode=mask_mode,
                            revision=rev if revise else None, decay=decay, skip=skip, backend=backend, **kw)


def _assert_backend_matches_reference(backend, lists, **kw):
    expected = _clone(lists)
    exp = _run("reference", expected, **kw)
    got = _run(backend, lists, **kw)
    assert bitwise_equal_f32(got.thresholds, exp.thresholds), (got.thresholds, exp.thresholds)
    assert torch.equal(got.kept.cpu(), exp.kept.cpu()) and torch.equal(got.nonfinite.cpu(), exp.nonfinite.cpu())
    for name, i in (("params", 0), ("grads", 1), ("momentum_buffers", 4), ("revision", 5)):
        assert _same_bits(lists[i], expected[i]), f"{name} differ"
    return got


# --- the reference against its definition ------------------------------------------------------------
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
def test_reference_is_mask_then_float32_sgd_then_ema(mask_mode):
    lists = _state([7, 300], torch.float32, "cpu", 0)
    before = _clone(lists)
    stats = _run("reference", lists, mask_mode=mask_mode, decay=0.75)
    masked = [g.clone() for g in before[1]]
    exp = reference.rgp_mask_reference(masked, before[2], before[3], HYPER["alpha"], HYPER["p"])
    assert bitwise_equal_f32(stats.thresholds, exp[0]) and torch.equal(stats.kept, exp[1])
    assert _same_bits(lists[1], masked)
    f32 = torch.float32
    for i, (w, g, v, r) in enumerate(zip(before[0], masked, before[4], before[5])):
        d = g + torch.tensor(HYPER["weight_decay"], dtype=f32) * w
        v_new = torch.tensor(HYPER["momentum"], dtype=f32) * v + d
        w_new = w - torch.tensor(HYPER["lr"], dtype=f32) * v_new
        if mask_mode == "update":
            frozen = reference.rgp_scores(before[2][i], before[3][i], HYPER["alpha"]) < exp[0][i]
            assert frozen.any() and not frozen.all()
            v_new, w_new = torch.where(frozen, v, v_new), torch.where(frozen, w, w_new)
        r_new = torch.tensor(0.75, dtype=f32) * r + torch.tensor(0.25, dtype=f32) * w_new
        assert _same_bits([lists[0][i], lists[4][i], lists[5][i]], [w_new, v_new, r_new])


def test_reference_mask_mode_update_freezes_exactly_the_conserved_entries():
    lists = _state([500], torch.float32, "cpu", 1)
    before = _clone(lists)
    stats = _run("reference", lists, mask_mode="update", revise=False)
    scores = reference.rgp_scores(before[2][0], before[3][0], HYPER["alpha"])
    conserved = scores < stats.thresholds[0]
    assert int(conserved.sum()) == 500 - int(stats.kept[0]) == 150  # h = 499 * 0.3 = 149.7: v[0..149] < thr
    for i in (0, 4):  # param and momentum buffer
        assert torch.equal(lists[i][0][conserved], before[i][0][conserved])
        assert (lists[i][0][~conserved] != before[i][0][~conserved]).all()
    assert (lists[1][0][conserved] == 0).all()
    assert torch.equal(lists[5][0], before[5][0])  # no revision list: untouched


def test_reference_mask_mode_grad_still_moves_conserved_entries_by_decay_and_momentum():
    lists = _state([500], torch.float32, "cpu", 2)
    before = _clone(lists)
    stats = _run("reference", lists, mask_mode="grad")
    conserved = reference.rgp_scores(before[2][0], before[3][0], HYPER["alpha"]) < stats.thresholds[0]
    assert conserved.sum() > 0 and (lists[1][0][conserved] == 0).all()
    assert (lists[0][0][conserved] != before[0][0][conserved]).all()
    assert (lists[4][0][conserved] != before[4][0][conserved]).all()


@pytest.mark.parametrize("foreach", [False, True])
def test_reference_with_p_zero_agrees_with_torch_sgd_within_float32_rounding(foreach):
    """p = 0 masks nothing, so the op is plain SGD. PyTorch's CPU kernels may contract a*x + y into one
    fused multiply-add, so agreement is to rounding: per step, each result within 2 ulp (2^-23 relative)
    of the magnitudes of the terms it sums."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(5,), (30, 7), (257,)]
    torch_params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    params = [q.detach().clone() for q in torch_params]
    bufs = [torch.zeros(s) for s in shapes]
    opt = torch.optim.SGD(torch_params, lr=0.1, momentum=0.9, weight_decay=5e-3, foreach=foreach)
    for q in torch_params:
        opt.state[q]["momentum_buffer"] = torch.zeros_like(q)
    eps = 2.0 ** -23
    moved = False
    for _ in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for q, g in zip(torch_params, grads):
            q.grad = g.clone()
        old = [(w.clone(), v.clone()) for w, v in zip(params, bufs)]
        opt.step()
        stats = ck.rgp_sgd_step_(params, [g.clone() for g in grads], grads, grads, bufs, lr=0.1, momentum=0.9,
                                 weight_decay=5e-3, alpha=0.5, p=0.0, backend="reference")
        assert torch.equal(stats.kept, torch.tensor([q.numel() for q in params]))
        for q, w, v, g, (w0, v0) in zip(torch_params, params, bufs, grads, old):
            tv = opt.state[q]["momentum_buffer"]
            v_bound = 2 * eps * (0.9 * v0.abs() + g.abs() + 5e-3 * w0.abs())
            w_bound = 2 * eps * (w0.abs() + 0.1 * v.abs()) + 0.1 * (tv - v).abs()
            assert ((tv - v).abs() <= v_bound).all()
            assert ((q.detach() - w).abs() <= w_bound).all()
            moved |= not torch.equal(w, w0)
            with torch.no_grad():  # continue from the same state, so differences do not accumulate
                q.copy_(w)
                tv.copy_(v)
    assert moved


def test_nan_score_gives_nan_threshold_masks_nothing_and_still_steps():
    lists = _state([64, 64], torch.float32, "cpu", 4)
    lists[2][0][5] = math.nan
    before = _clone(lists)
    stats = _run("reference", lists, mask_mode="update")
    assert math.isnan(stats.thresholds[0]) and not math.isnan(stats.thresholds[1])
    assert stats.kept[0] == 64 and stats.nonfinite.tolist() == [1, 0]
    assert torch.equal(lists[1][0], before[1][0])
    assert (lists[0][0] != before[0][0]).all()  # nothing frozen in the NaN tensor


# --- Triton against the reference, bit for bit ----------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
@pytest.mark.parametrize("revise", [False, True])
def test_triton_matches_reference(device, dtype, mask_mode, revise):
    lists = _state(SIZES, dtype, device, 10)
    before = _clone(lists)
    got = _assert_backend_matches_reference("triton", lists, mask_mode=mask_mode, revise=revise)
    assert int(got.kept.sum()) < sum(SIZES)  # something was masked
    assert not _same_bits(lists[0], before[0])  # the parameters moved
    assert _same_bits(lists[5], before[5]) != revise


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_reference_on_pathological_scores(device, kind):
    mode = "update" if KINDS.index(kind) % 2 else "grad"
    lists = _state([1, 3, 129, 1000], torch.float32, device, 11, kind)
    _assert_backend_matches_reference("triton", lists, mask_mode=mode, p=0.5, alpha=0.3)


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("hyper", [{"p": 0.0, "momentum": 0.0, "weight_decay": 0.0},
                                   {"p": 1.0, "lr": 1.0, "alpha": 1.0},
                                   {"p": 0.999, "momentum": 1.0, "alpha": 0.0, "lr": 0.0}])
def test_triton_matches_reference_at_extreme_hyperparameters(device, hyper):
    lists = _state([2, 77, 500], torch.bfloat16, device, 12)
    _assert_backend_matches_reference("triton", lists, mask_mode="update", decay=0.0, **hyper)


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_mixed_dtypes_and_non_contiguous_tensors(device):
    dtypes = [torch.float32, torch.float16, torch.float32, torch.bfloat16]
    gen = torch.Generator().manual_seed(13)

    def tensor(i):  # transposed (non-contiguous) 2-D tensors of each dtype
        return torch.randn(9, 7 + i, generator=gen).to(device=device, dtype=dtypes[i]).t()

    lists = [[tensor(i) for i in range(4)] for _ in range(6)]
    assert not any(t.is_contiguous() for ts in lists for t in ts)
    originals = [list(ts) for ts in lists]
    _assert_backend_matches_reference("triton", lists, mask_mode="update")
    assert all(a is b for ts, os in zip(lists, originals) for a, b in zip(ts, os))  # modified in place


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_flat_buffer_views_are_updated_in_place(device):
    sizes = [40, 8, 300]
    flats = [torch.randn(sum(sizes), generator=torch.Generator().manual_seed(14 + j)).to(device) for j in range(6)]
    lists = [list(f.split(sizes)) for f in flats]
    _assert_backend_matches_reference("triton", lists, mask_mode="grad")


# --- the C++ CPU kernel against the reference, bit for bit (more in tests/test_cpu_backend.py) ----------
needs_cpu_kernel = pytest.mark.skipif("cpu" not in ck.available_backends("cpu"),
                                      reason="the C++ extension is not built here")
CPU_SIZES = SIZES + (65537, 200003)  # the direct path, and the sampling bracket from 2^16 elements


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
@pytest.mark.parametrize("revise", [False, True])
@pytest.mark.parametrize("skip", [None, False, True])
def test_cpu_matches_reference(dtype, mask_mode, revise, skip):
    lists = _state(CPU_SIZES, dtype, "cpu", 10)
    before = _clone(lists)
    kw = {} if skip is None else {"skip": torch.tensor(skip)}
    got = _assert_backend_matches_reference("cpu", lists, mask_mode=mask_mode, revise=revise, **kw)
    assert int(got.kept.sum()) < sum(CPU_SIZES)  # something was masked
    assert _same_bits(lists[0], before[0]) == bool(skip)  # the parameters moved unless skipped
    assert _same_bits(lists[5], before[5]) != revise


@needs_cpu_kernel
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_matches_reference_on_pathological_scores(kind):
    mode = "update" if KINDS.index(kind) % 2 else "grad"
    lists = _state([1, 3, 129, 1000, 70001], torch.float32, "cpu", 11, kind)
    _assert_backend_matches_reference("cpu", lists, mask_mode=mode, p=0.5, alpha=0.3, skip=torch.tensor(0))


@needs_cpu_kernel
def test_cpu_nan_score_skips_the_step_only_with_skip_given():
    lists = _state([64, 70001], torch.float32, "cpu", 4)
    lists[2][1][5] = math.nan
    for skip in (None, torch.tensor(False)):
        run = _clone(lists)
        stats = _assert_backend_matches_reference("cpu", run, mask_mode="update", skip=skip)
        assert stats.nonfinite.tolist() == [0, 1] and math.isnan(stats.thresholds[1])
        assert _same_bits(run[0], lists[0]) == (skip is not None)


@needs_cpu_kernel
def test_cpu_flat_buffer_views_and_opcheck():
    sizes = [40, 8, 70001]
    flats = [torch.randn(sum(sizes), generator=torch.Generator().manual_seed(14 + j)) for j in range(6)]
    lists = [list(f.split(sizes)) for f in flats]
    _assert_backend_matches_reference("cpu", lists, mask_mode="grad")
    torch.library.opcheck(torch.ops.cure.rgp_sgd_step, _opcheck_args("cpu"))
# --- Triton: skip= and the sampling bracket --------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
@pytest.mark.parametrize("why", ["flag", "nan", "inf", "none", "zero_flag"])
def test_triton_skip_matches_reference(device, mask_mode, why):
    """skip= on the device: a nonzero flag, or any non-finite score anywhere in the call (here in the
    float16 group), leaves every param and momentum buffer of every group untouched, still masks the
    grads and still runs the revision EMA; bit for bit the reference."""
    lists = _state([3, 300, BLOCK + 1], torch.float32, device, 40)
    extra = _state([7, 50], torch.float16, device, 41)
    lists = [ts + es for ts, es in zip(lists, extra)]
    if why == "nan":
        lists[2][4][3] = math.nan
    if why == "inf":
        lists[3][3][0] = math.inf
    skip = torch.tensor(why == "flag", device=device)
    if why == "zero_flag":
        skip = torch.zeros(1, dtype=torch.float32, device=device)
    before = _clone(lists)
    _assert_backend_matches_reference("triton", lists, mask_mode=mask_mode, skip=skip)
    skipped = why in ("flag", "nan", "inf")
    assert _same_bits(lists[0], before[0]) == skipped and _same_bits(lists[4], before[4]) == skipped
    assert not _same_bits(lists[1], before[1])  # masked either way
    assert not _same_bits(lists[5], before[5])  # the revision EMA runs either way


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", ["random", "zeros", "ties", "nan"])
def test_triton_step_through_the_sampling_bracket(device, kind, monkeypatch):
    """Tensors above the bracket's cutoff (lowered so the interpreter can run them): exact either way,
    hit or fallback."""
    from cure_kernels import triton_rgp_mask

    monkeypatch.setattr(triton_rgp_mask, "BRACKET_MIN", 2048)
    monkeypatch.setattr(triton_rgp_mask, "SAMPLE_TILE", 16)
    monkeypatch.setattr(triton_rgp_mask, "SAMPLE_TILES", 16)
    monkeypatch.setattr(triton_rgp_mask, "CAND_FRACTION", 2)
    lists = _state([2048, 5, 2 * BLOCK + 3], torch.float32, device, 42, kind)
    _assert_backend_matches_reference("triton", lists, mask_mode="update", skip=torch.tensor(0, device=device))
    assert triton_rgp_mask.last_bracket_misses()[0] == 2


def test_triton_written_lists_layouts_and_address_tables():
    """Which written lists the fused step addresses through pointer tables (CUDA) and the table itself;
    the kernel's table path runs on CUDA only (tests above, on a GPU)."""
    from cure_kernels import triton_sgd_step

    buf = torch.zeros(30)
    flat = [buf[0:10], buf[10:30]]
    separate = [torch.zeros(10), torch.zeros(4, 5)]
    strided = [torch.zeros(10), torch.zeros(5, 4).t()]
    assert triton_sgd_step.written_layout(flat, tables=True) == "flat"
    assert triton_sgd_step.written_layout(separate, tables=True) == "table"
    assert triton_sgd_step.written_layout(separate, tables=False) == "packed"
    assert triton_sgd_step.written_layout(strided, tables=True) == "packed"
    table = triton_sgd_step.address_table([separate, None, flat, None], 2, torch.device("cpu"))
    assert table.tolist() == [separate[0].data_ptr(), separate[1].data_ptr(), 0, 0,
                              flat[0].data_ptr(), flat[1].data_ptr(), 0, 0]
    assert triton_sgd_step.address_table([separate, None, flat, None], 2, torch.device("cpu")) is table  # cached


# --- arguments, backends, torch.library ----------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, words", [
    ({"mask_mode": "weights"}, ValueError, "mask_mode"),
    ({"lr": -0.1}, ValueError, "lr"),
    ({"weight_decay": math.inf}, ValueError, "weight_decay"),
    ({"momentum": 1.5}, ValueError, "momentum"),
    ({"p": -0.1}, ValueError, "p must"),
    ({"decay": 2.0}, ValueError, "decay"),
    ({"lr": torch.tensor(0.1)}, TypeError, "lr must be a Python float"),
    ({"backend": "cuda"}, ValueError, "runs on CUDA tensors, but the tensors are on cpu"),
    ({"backend": "fast"}, ValueError, "unknown backend"),
])
def test_bad_arguments_are_named_and_nothing_changes(kwargs, exc, words):
    lists = _state([10], torch.float32, "cpu", 20)
    before = _clone(lists)
    with pytest.raises(exc, match=words):
        _run(kwargs.pop("backend", "reference"), lists, **kwargs)
    assert all(_same_bits(a, b) for a, b in zip(lists, before))


def test_mismatched_lists_are_refused():
    lists = _state([10, 4], torch.float32, "cpu", 21)
    lists[5] = [lists[5][0], torch.zeros(5)]
    with pytest.raises(ValueError, match=r"revision\[1\] has shape \(5,\)"):
        _run("reference", lists)
    lists = _state([10, 4], torch.float32, "cpu", 21)
    lists[4] = lists[4][:1]
    with pytest.raises(ValueError, match="len\\(momentum_buffers\\)=1"):
        _run("reference", lists)


def test_auto_matches_the_reference_on_cpu_and_params_that_require_grad_are_accepted():
    lists = _state([50], torch.float32, "cpu", 22)
    lists[0] = [lists[0][0].requires_grad_()]
    expected = _clone(lists)
    _run("auto", lists)
    _run("reference", [[t.detach() for t in expected[0]]] + expected[1:])
    assert _same_bits([lists[0][0].detach()], expected[0]) and lists[0][0].requires_grad


def test_empty_list_returns_empty_stats():
    stats = ck.rgp_sgd_step_([], [], [], [], [], lr=0.1, momentum=0.9, weight_decay=0.0, alpha=0.1, p=0.3)
    assert stats.thresholds.shape == (0,) and stats.kept.dtype == torch.int64


def _opcheck_args(device):
    lists = _state([5, 12], torch.float32, device, 23)
    return (*lists, 0.1, 0.9, 5e-4, 0.1, 0.3, "update", 0.99, None)


def test_opcheck_reference():
    torch.library.opcheck(torch.ops.cure.rgp_sgd_step_reference, _opcheck_args("cpu"))
    args = list(_opcheck_args("cpu"))
    args[5] = []  # no revision
    torch.library.opcheck(torch.ops.cure.rgp_sgd_step_reference, tuple(args))


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_opcheck_triton(device):
    torch.library.opcheck(torch.ops.cure.rgp_sgd_step_triton, _opcheck_args(device))
    args = list(_opcheck_args(device))
    args[-1] = torch.tensor(0.0, device=device)  # skip flag
    torch.library.opcheck(torch.ops.cure.rgp_sgd_step_triton, tuple(args))


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON_DEVICES else []))
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    device = TRITON_DEVICES[0] if backend == "triton" else "cpu"

    def step(params, grads, nat, adv, bufs, rev):
        stats = ck.rgp_sgd_step_(params, grads, nat, adv, bufs, lr=0.05, momentum=0.9, weight_decay=1e-3,
                                 alpha=0.2, p=0.4, mask_mode="update", revision=rev, decay=0.9, backend=backend)
        return stats.thresholds * 2, stats.kept + stats.nonfinite

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    lists = _state([40, 3, 17], torch.float32, device, 24)
    expected = _clone(lists)
    exp_thr, exp_counts = step(*expected)
    got_thr, got_counts = compiled(*lists)
    assert bitwise_equal_f32(got_thr, exp_thr) and torch.equal(got_counts, exp_counts)
    assert all(_same_bits(a, b) for a, b in zip(lists, expected))


# The compiled (non-interpreted) kernel: tests/test_triton_aot.py (every flag combination through the launcher).


# --- CUDA only -----------------------------------------------------------------------------------------
@pytest.mark.skipif("cuda" not in TRITON_DEVICES, reason="needs a CUDA GPU")
def test_no_host_synchronisation_on_cuda():
    lists = _state([1000, 5, 3 * BLOCK], torch.float32, "cuda", 30)
    _run("triton", lists)  # builds and uploads the tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run("triton", lists, mask_mode="update")
    finally:
        torch.cuda.set_sync_debug_mode("default")
