"""Misuse of the public ops: each must behave like PyTorch's own in-place ops.

Every backend that can run here (the C++ CPU kernels, the reference, Triton in its interpreter) bumps
the version counter of what it writes, refuses written tensors that overlap themselves or each other,
inference tensors outside inference mode, sparse, quantized and meta tensors -- and a refused call
writes nothing. Scalars may be Python or numpy numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import cure_kernels as ck
from cure_kernels import backends, reference
from cure_kernels.sgd_step import SGD_STEP_BACKENDS

BACKENDS = ck.available_backends("cpu")  # reference, and cpu/triton where they can run
STEP_BACKENDS = [b for b in SGD_STEP_BACKENDS
                 if backends.unavailable_reason(b, torch.device("cpu"), "rgp_sgd_step") is None]
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "alpha": 0.1, "p": 0.3}
STEP_LISTS = ("params", "grads", "grads_nat", "grads_adv", "momentum_buffers", "revision")
STEP_WRITTEN = ("params", "grads", "momentum_buffers", "revision")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mask(backend, updates, nat=None, adv=None, **kw):
    nat = nat if nat is not None else [_randn(u.shape, seed=i + 10) for i, u in enumerate(updates)]
    adv = adv if adv is not None else [_randn(u.shape, seed=i + 20) for i, u in enumerate(updates)]
    return ck.rgp_mask_(updates, nat, adv, **({"alpha": 0.5, "p": 0.5} | kw), backend=backend)


def _revise(backend, revision, params=None, decay=0.5):
    params = params if params is not None else [_randn(r.shape, seed=i + 30) for i, r in enumerate(revision)]
    ck.revise_(revision, params, decay=decay, backend=backend)


def _step_lists(n=6, count=2, seed=0):
    return {name: [_randn(n, seed=seed + 7 * k + i) for i in range(count)] for k, name in enumerate(STEP_LISTS)}


def _step(backend, lists, **kw):
    lists = dict(lists)
    return ck.rgp_sgd_step_(lists.pop("params"), lists.pop("grads"), lists.pop("grads_nat"), lists.pop("grads_adv"),
                            lists.pop("momentum_buffers"), revision=lists.pop("revision"), decay=0.9,
                            backend=backend, **(HYPER | kw))


def _snapshot(*tensors):
    return [t.clone() for t in tensors]


def _unchanged(tensors, snapshot):
    return all(torch.equal(t, s) for t, s in zip(tensors, snapshot, strict=True))


# --- 1. autograd sees every write ---------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_revise_bumps_the_version_so_a_stale_backward_raises(backend):
    rev = torch.ones(3)
    x = torch.ones(3, requires_grad=True)
    y = (x * rev).sum()  # saves rev for the backward
    version = rev._version
    ck.revise_([rev], [torch.zeros(3)], decay=0.5, backend=backend)
    assert rev._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()  # would otherwise silently give x.grad = [0.5, 0.5, 0.5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rgp_mask_bumps_the_version_of_every_update_and_of_nothing_else(backend):
    updates = [torch.ones(4), torch.ones(5)]
    nat, adv = [_randn(4), _randn(5, seed=1)], [_randn(4, seed=2), _randn(5, seed=3)]
    x = torch.ones(5, requires_grad=True)
    y = (x * updates[1]).sum()
    before = [t._version for t in updates + nat + adv]
    ck.rgp_mask_(updates, nat, adv, alpha=0.3, p=0.5, backend=backend)
    after = [t._version for t in updates + nat + adv]
    assert [a > b for a, b in zip(after, before)] == [True, True, False, False, False, False]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("name", STEP_LISTS)
def test_rgp_sgd_step_bumps_the_version_of_every_written_list(backend, name):
    lists = _step_lists()
    saved = lists[name][1]
    x = torch.ones(6, requires_grad=True)
    y = (x * saved).sum()
    before = saved._version
    _step(backend, lists)
    if name in STEP_WRITTEN:
        assert saved._version > before
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
    else:  # read only: untouched, and the backward is valid
        assert saved._version == before
        y.backward()
        assert torch.equal(x.grad, saved)


@pytest.mark.skipif(backends.PROBE.extension_error is not None, reason="the C++ extension is not built")
@pytest.mark.parametrize("op", backends.CXX_OPS)
def test_every_cxx_op_bumps_exactly_its_written_arguments(op):
    """The mechanism reads the schema, so it covers a C++ op whose CPU kernel is not built yet: its
    fake (meta) kernel runs below the version bump."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cure::{op}", "ADInplaceOrView") == (op != "rgp_select")
    schema = getattr(torch.ops.cure, op).default._schema
    meta = [[torch.empty(3, device="meta")] for _ in range(6)]
    args = {"rgp_mask": (*meta[:3], 0.1, 0.3), "revise": (*meta[:2], 0.9),
            "rgp_sgd_step": (*meta, 0.1, 0.9, 0.0, 0.1, 0.3, "grad", 0.9, None),
            "rgp_select": (*meta[:2], 0.1, 0.3)}[op]
    before = [t[0]._version for t in meta]
    getattr(torch.ops.cure, op)(*args)
    tensor_args = [a for a in schema.arguments if str(a.type) == "List[Tensor]"]
    written = [a.alias_info is not None and a.alias_info.is_write for a in tensor_args]
    bumped = [t[0]._version > v for t, v in zip(meta, before)][:len(tensor_args)]
    assert bumped == written and any(written) == (op != "rgp_select")  # rgp_select only reads


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_mask_still_bumps_the_version(backend):
    torch._dynamo.reset()
    step = torch.compile(lambda u, n, a: ck.rgp_mask_(u, n, a, alpha=0.2, p=0.4, backend=backend).kept,
                         fullgraph=True, backend="aot_eager")
    updates = [_randn(8)]
    before = updates[0]._version
    step(updates, [_randn(8, seed=1)], [_randn(8, seed=2)])
    assert updates[0]._version > before


# --- 2. the whole call is checked before anything is written ---------------------------------------
def _expanded():
    return torch.arange(1.0, 11.0).view(1, 10).expand(3, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_overlapping_update_is_refused_before_any_write(backend):
    good = _randn(3, 10)
    snap = _snapshot(good)
    with pytest.raises(ValueError, match=r"updates\[1\] has internal overlap"):
        _mask(backend, [good, _expanded()])
    assert _unchanged([good], snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_overlapping_revision_is_refused(backend):
    good = _randn(3, 10)
    snap = _snapshot(good)
    with pytest.raises(ValueError, match=r"revision\[1\] has internal overlap"):
        _revise(backend, [good, _expanded()])
    assert _unchanged([good], snap)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("name", STEP_WRITTEN)
def test_self_overlapping_step_tensor_is_refused(backend, name):
    lists = _step_lists(n=10)
    lists = {k: [t.view(1, 10).expand(3, 10).clone() for t in v] for k, v in lists.items()}
    lists[name][1] = _expanded()
    snap = _snapshot(*[t for v in lists.values() for t in v])
    with pytest.raises(ValueError, match=rf"{name}\[1\] has internal overlap"):
        _step(backend, lists)
    assert _unchanged([t for v in lists.values() for t in v], snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_update_twice_is_refused(backend):
    u = _randn(7)
    snap = _snapshot(u)
    with pytest.raises(ValueError, match=r"updates\[0\] and updates\[1\] share memory"):
        _mask(backend, [u, u])
    with pytest.raises(ValueError, match=r"revision\[1\] and revision\[2\] share memory"):
        _revise(backend, [_randn(7, seed=1), u, u])
    assert _unchanged([u], snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partly_overlapping_views_are_refused(backend):
    base = _randn(20)
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=r"updates\[0\] and updates\[2\] share memory"):
        _mask(backend, [base[0:8], _randn(4), base[6:10]])
    # 2-D views: a column block and a row block of one matrix share their corner.
    mat = _randn(6, 6)
    with pytest.raises(ValueError, match=r"revision\[0\] and revision\[1\] share memory"):
        _revise(backend, [mat[:, :2], mat[5:, :2]])
    assert _unchanged([base], snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_of_one_buffer_are_accepted(backend):
    """Adjacent slices (a flat gradient buffer) and interleaved strided views share no element."""
    base = _randn(24)
    flat_views = [base[0:5], base[5:12], base[12:12], base[12:24]]
    expected = [t.clone() for t in flat_views]
    nat = [_randn(t.shape, seed=40 + i) for i, t in enumerate(flat_views)]
    adv = [_randn(t.shape, seed=50 + i) for i, t in enumerate(flat_views)]
    reference.rgp_mask_reference(expected, nat, adv, 0.5, 0.5)
    _mask(backend, flat_views, nat, adv)
    assert all(torch.equal(t, e) for t, e in zip(flat_views, expected))
    even, odd = base[0::2], base[1::2]
    mat = _randn(4, 6)
    left, right = mat[:, :3], mat[:, 3:]  # byte ranges interleave, elements do not
    for pair in ((even, odd), (left, right)):
        expected = [t.clone() for t in pair]
        params = [_randn(t.shape, seed=60) for t in pair]
        reference.revise_reference(expected, params, 0.25)
        _revise(backend, list(pair), params, decay=0.25)
        assert all(torch.equal(t, e) for t, e in zip(pair, expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_sharing_an_element_are_refused(backend):
    base = _randn(24)
    with pytest.raises(ValueError, match=r"updates\[0\] and updates\[1\] share memory"):
        _mask(backend, [base[0:12:2], base[10:22:2]])  # both hold base[10]
    with pytest.raises(ValueError, match=r"updates\[0\] and updates\[1\] share memory"):
        _mask(backend, [base[0::3][:6], base[0::2][2:8]])  # base[6] and base[12]


@pytest.mark.parametrize("backend", BACKENDS)
def test_as_strided_layouts_pytorch_cannot_decide(backend):
    base = _randn(16)
    no_overlap = base.as_strided((3, 2), (2, 3))  # offsets 0 3 2 5 4 7: all distinct
    assert torch._debug_has_internal_overlap(no_overlap) == 2
    expected = no_overlap.clone()
    nat, adv = [_randn(3, 2, seed=1)], [_randn(3, 2, seed=2)]
    reference.rgp_mask_reference([expected], nat, adv, 0.5, 0.5)
    _mask(backend, [no_overlap], nat, adv)
    assert torch.equal(no_overlap, expected)
    overlap = base.as_strided((2, 2), (1, 1))  # offsets 0 1 1 2: offset 1 twice
    assert torch._debug_has_internal_overlap(overlap) == 2
    with pytest.raises(ValueError, match=r"updates\[0\] has internal overlap"):
        _mask(backend, [overlap])


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_step_tensors_sharing_memory_across_lists_are_refused(backend):
    for written, index, other, other_index, words in [
            ("momentum_buffers", 1, "params", 1, r"params\[1\] and momentum_buffers\[1\] share memory"),
            ("revision", 0, "grads", 1, r"grads\[1\] and revision\[0\] share memory")]:
        lists = _step_lists()
        lists[written][index] = lists[other][other_index]
        tensors = [t for v in lists.values() for t in v]
        snap = _snapshot(*tensors)
        with pytest.raises(ValueError, match=words):
            _step(backend, lists)
        assert _unchanged(tensors, snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_written_tensor_may_alias_a_read_only_input(backend):
    a, b = _randn(300), _randn(300, seed=1)
    expected = a.clone()
    ref = reference.rgp_mask_reference([expected], [a.clone()], [b], 0.3, 0.4)
    got = ck.rgp_mask_([a], [a], [b], alpha=0.3, p=0.4, backend=backend)
    assert torch.equal(a, expected) and torch.equal(got.kept, ref[1])
    rev = _randn(50, seed=2)
    expected = rev.clone()
    reference.revise_reference([expected], [rev.clone()], 0.7)
    ck.revise_([rev], [rev], decay=0.7, backend=backend)
    assert torch.equal(rev, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_tensor_written_outside_inference_mode_is_refused(backend):
    with torch.inference_mode():
        inference = _randn(6)
    good = _randn(6, seed=1)
    snap = _snapshot(good, inference)
    with pytest.raises(RuntimeError, match=r"updates\[1\] is an inference tensor .*Inplace update to inference "
                                           r"tensor outside InferenceMode is not allowed"):
        _mask(backend, [good, inference])
    with pytest.raises(RuntimeError, match=r"revision\[0\] is an inference tensor"):
        _revise(backend, [inference])
    assert _unchanged([good, inference], snap)
    # Reading an inference tensor is fine, and inside inference mode it may be written (as in PyTorch).
    _mask(backend, [good], [inference], [inference])
    with torch.inference_mode():
        expected = inference.clone()
        reference.revise_reference([expected], [good], 0.5)
        _revise(backend, [inference], [good])
        assert torch.equal(inference, expected)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_step_refuses_an_inference_momentum_buffer(backend):
    lists = _step_lists()
    with torch.inference_mode():
        lists["momentum_buffers"][1] = _randn(6)
    snap = _snapshot(*lists["params"])
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[1\] is an inference tensor"):
        _step(backend, lists)
    assert _unchanged(lists["params"], snap)


# PyTorch warns that sparse CSR is in beta and that quantized tensors are deprecated: the inputs of
# this test, not what it checks.
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize(("make", "words"), [
    (lambda: _randn(6).to_sparse(), r"updates\[1\] has layout torch.sparse_coo; only dense"),
    (lambda: _randn(2, 3).to_sparse_csr(), r"updates\[1\] has layout torch.sparse_csr; only dense"),
    (lambda: torch.quantize_per_tensor(_randn(6), 0.1, 0, torch.qint8), r"updates\[1\] is a quantized tensor"),
])
def test_sparse_and_quantized_tensors_are_refused(make, words):
    bad = make()
    good = _randn(*bad.shape)
    snap = _snapshot(good)
    for backend in BACKENDS:
        with pytest.raises(TypeError, match=words):
            ck.rgp_mask_([good, bad], [good.clone(), good.clone()], [good.clone(), good.clone()], alpha=0.5, p=0.5,
                         backend=backend)
    with pytest.raises(TypeError, match=words.replace("updates", "grads_nat")):
        ck.rgp_mask_([good, good.clone()], [good.clone(), bad], [good.clone(), good.clone()], alpha=0.5, p=0.5)
    assert _unchanged([good], snap)


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_meta_tensors_are_refused(backend):
    meta = torch.empty(5, device="meta")
    with pytest.raises(ValueError, match=r"updates\[0\] is on the meta device, which holds shapes but no data"):
        ck.rgp_mask_([meta], [meta], [meta], alpha=0.1, p=0.3, backend=backend)
    with pytest.raises(ValueError, match=r"revision\[0\] is on the meta device"):
        ck.revise_([meta], [meta], decay=0.5, backend=backend)


def test_a_backend_for_another_device_names_one_that_can_run_there():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    reason = backends.unavailable_reason("cpu", cuda)
    named = reason.split("; use ")[1].replace("'", "").split(" or ")
    assert reason.startswith("backend 'cpu' runs on CPU tensors, but the tensors are on cuda")
    assert named and all(backends.unavailable_reason(b, cuda) is None for b in named)
    reason = backends.unavailable_reason("cuda", cpu)
    assert "'reference'" in reason and all(backends.unavailable_reason(b, cpu) is None
                                           for b in reason.split("; use ")[1].replace("'", "").split(" or "))
    with pytest.raises(ValueError, match="backend='cuda' cannot run here: backend 'cuda' runs on CUDA tensors"):
        ck.rgp_mask_([_randn(3)], [_randn(3)], [_randn(3)], alpha=0.1, p=0.3, backend="cuda")


# --- 4. numpy scalars ----------------------------------------------------------------------------
@pytest.mark.parametrize("scalar", [np.float32, np.float64, np.float16])
def test_numpy_scalars_are_accepted_as_their_exact_value(scalar):
    for backend in BACKENDS:
        u1, u2 = [_randn(40)], [_randn(40)]
        nat, adv = [_randn(40, seed=1)], [_randn(40, seed=2)]
        s1 = ck.rgp_mask_(u1, nat, adv, alpha=scalar(0.1), p=scalar(0.3), backend=backend)
        s2 = ck.rgp_mask_(u2, nat, adv, alpha=float(scalar(0.1)), p=float(scalar(0.3)), backend=backend)
        assert torch.equal(u1[0], u2[0]) and torch.equal(s1.thresholds, s2.thresholds)
        r1, r2 = [_randn(9)], [_randn(9)]
        _revise(backend, r1, [_randn(9, seed=3)], decay=scalar(0.9))
        _revise(backend, r2, [_randn(9, seed=3)], decay=float(scalar(0.9)))
        assert torch.equal(r1[0], r2[0])
    for backend in STEP_BACKENDS:
        a, b = _step_lists(), _step_lists()
        _step(backend, a, lr=scalar(0.1), momentum=scalar(0.9), weight_decay=np.int64(0), alpha=scalar(0.1),
              p=scalar(0.3))
        _step(backend, b, lr=float(scalar(0.1)), momentum=float(scalar(0.9)), weight_decay=0.0,
              alpha=float(scalar(0.1)), p=float(scalar(0.3)))
        assert all(torch.equal(x, y) for k in STEP_LISTS for x, y in zip(a[k], b[k]))


@pytest.mark.parametrize("value", [True, np.bool_(True), "0.3", None, np.array([0.3])])
def test_non_numbers_are_refused_as_scalars(value):
    with pytest.raises(TypeError, match="p must be a float in"):
        _mask("reference", [_randn(3)], p=value)
    with pytest.raises(TypeError, match="lr must be a non-negative float"):
        _step("reference", _step_lists(), lr=value)


def test_numpy_nan_and_out_of_range_are_refused():
    with pytest.raises(ValueError, match="p must be a finite number in"):
        _mask("reference", [_randn(3)], p=np.float32("nan"))
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        _step("reference", _step_lists(), lr=np.float64(-1))


# --- 6. what auto picks ----------------------------------------------------------------------------
@pytest.mark.parametrize(("triton", "cuda_kernels", "expected"), [
    (True, True, "triton"), (True, False, "triton"), (False, True, "cuda"), (False, False, "torch")])
def test_auto_on_cuda_is_triton_then_the_cuda_kernels_then_torch(monkeypatch, triton, cuda_kernels, expected):
    kernels = {(op, "CPU") for op in backends.CXX_OPS} | ({(op, "CUDA") for op in backends.CXX_OPS}
                                                         if cuda_kernels else set())
    probe = dataclasses.replace(backends.PROBE, extension_error=None, cxx_kernels=frozenset(kernels),
                                triton_error=None if triton else "Triton is not installed")
    monkeypatch.setattr(backends, "PROBE", probe)
    assert backends.auto_backend(torch.device("cuda")) == expected
    assert backends.auto_backend(torch.device("cuda", 1), "rgp_sgd_step") == expected
    assert backends.auto_backend(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(backends, "PROBE", dataclasses.replace(probe, extension_error="not built"))
    assert backends.auto_backend(torch.device("cpu")) == "reference"


def test_a_missing_momentum_buffer_says_how_to_create_it():
    """optimizer.state has no buffer before torch's SGD first steps; passing its None says what to do."""
    q = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    g = torch.randn(5)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] is None .*torch.zeros_like"):
        ck.rgp_sgd_step_([q.detach()], [g], [g.clone()], [g.clone()], [opt.state[q].get("momentum_buffer")],
                         lr=0.1, momentum=0.9, weight_decay=0.0, alpha=0.1, p=0.3)
