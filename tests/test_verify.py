"""backend="auto" verifies before it trusts (cure_kernels/verify.py).

On CUDA, the first "auto" call of an op per device and dtypes checks the picked fast backend against the torch
backend on a built-in problem. The logic is device-agnostic, so these tests turn it on for CPU tensors
(``VERIFY_DEVICE_TYPES``) with the CPU row ``("cpu", "torch")`` and inject faults into the C++ CPU backend: a
threshold one ulp off, one wrong element in a written tensor, a fault only in the fused step's apply pass, an
exception. Each must give one warning, the torch backend from then on, correct results, and no second check.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from rgp_cases import bitwise_equal_f32, make_case_lists

import cure_kernels as ck
from cure_kernels import backends, ops, reference, verify

sgd_step_module = importlib.import_module("cure_kernels.sgd_step")
select_module = importlib.import_module("cure_kernels.select")

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.skipif("cpu" not in ck.available_backends("cpu"),
                       reason="the C++ CPU backend (the backend checked here) is not built"),
]
CPU = torch.device("cpu")
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3, "alpha": 0.1, "p": 0.3}


@pytest.fixture
def verify_on_cpu(monkeypatch):
    """Checks on for CPU tensors, row ("cpu", "torch"), no decision cached; counts the checks."""
    monkeypatch.setattr(backends, "VERIFY_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("cpu", "torch"))
    monkeypatch.setattr(verify, "decisions", {})
    checks = []
    real = verify.check_backend

    def counted(backend, device, op, dtypes):
        checks.append((backend, op, dtypes))
        return real(backend, device, op, dtypes)

    monkeypatch.setattr(verify, "check_backend", counted)
    return checks


def _inject(monkeypatch, op_name, fault):
    """Make backend "cpu" run ``fault(args, real_op)`` instead of its op ``op_name`` (other ops untouched)."""
    real_backend_op = ops.backend_op

    def patched(op, name):
        real_op = real_backend_op(op, name)
        if name != "cpu" or op != op_name:
            return real_op
        return lambda *args: fault(args, real_op)

    for module in (ops, select_module, sgd_step_module):
        monkeypatch.setattr(module, "backend_op", patched)


def _threshold_one_ulp_up(args, real_op):
    out = real_op(*args)
    thresholds = out[0].clone()
    thresholds[2] = torch.nextafter(thresholds[2], torch.tensor(math.inf))  # the third tensor of the list
    return (thresholds, *out[1:])


def _raise(args, real_op):
    raise RuntimeError("boom")


def _one_revision_element_off(args, real_op):
    real_op(*args)
    rev = args[0][0].view(-1)
    rev[-1] = torch.nextafter(rev[-1], torch.tensor(math.inf, dtype=rev.dtype))


def _params_off_in_update_mode_with_given_thresholds(args, real_op):
    out = real_op(*args)
    if args[11] == "update" and len(args) > 14:  # (mask_mode, and thresholds given)
        args[0][0].view(-1)[0] += 1
    return out


def _user_lists(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = (1000, 17, 3, 250)
    nat, adv = make_case_lists("ties", sizes, dtype, gen)
    rand = [[torch.randn(n, generator=gen).to(dtype) for n in sizes] for _ in range(4)]
    return {"params": rand[0], "grads": rand[1], "grads_nat": nat, "grads_adv": adv,
            "momentum_buffers": rand[2], "revision": rand[3]}


def _clone(lists):
    return {k: [t.clone() for t in ts] for k, ts in lists.items()}


def _same(xs, ys):
    return all(bitwise_equal_f32(x, y) for x, y in zip(xs, ys))


def _call(op, lists, backend="auto"):
    """Run ``op`` on the lists; returns what to compare (tensor lists and statistics)."""
    if op == "rgp_mask":
        stats = ck.rgp_mask_(lists["grads"], lists["grads_nat"], lists["grads_adv"], alpha=0.1, p=0.3, backend=backend)
        return [*stats, *lists["grads"]]
    if op == "rgp_select":
        return list(ck.rgp_select(lists["grads_nat"], lists["grads_adv"], alpha=0.1, p=0.3, backend=backend))
    if op == "revise":
        ck.revise_(lists["revision"], lists["params"], decay=0.9, backend=backend)
        return lists["revision"]
    stats = ck.rgp_sgd_step_(lists["params"], lists["grads"], lists["grads_nat"], lists["grads_adv"],
                             lists["momentum_buffers"], revision=lists["revision"], decay=0.9, backend=backend, **HYPER)
    return [*stats, *lists["params"], *lists["momentum_buffers"], *lists["revision"]]


def _assert_correct(op, dtype=torch.float32, seed=0):
    """One "auto" call of ``op`` gives the reference's bits."""
    lists = _user_lists(dtype, seed)
    expected = _call(op, _clone(lists), backend="reference")
    assert _same(_call(op, lists), expected)


# --- faults are caught, once, and the torch backend takes over ------------------------------------------
@pytest.mark.parametrize(("op", "fault", "words"), [
    ("rgp_mask", _threshold_one_ulp_up, r"rgp_mask: thresholds\[ties/float32\] is "),
    ("rgp_select", _threshold_one_ulp_up, r"rgp_select: thresholds\[ties/float32\] is "),
    ("rgp_sgd_step", _threshold_one_ulp_up, r"rgp_sgd_step: thresholds\[ties/float32\] is "),
    ("revise", _one_revision_element_off, r"revise: revision\[bracket/float32\] differs at element \d+: "),
    ("revise", _raise, "revise raised RuntimeError: boom"),
    ("rgp_sgd_step", _params_off_in_update_mode_with_given_thresholds,
     r"rgp_sgd_step_given: params\[bracket/float32\] differs at element 0"),
])
def test_a_faulty_backend_is_replaced_by_the_next_of_the_row(verify_on_cpu, monkeypatch, op, fault, words):
    _inject(monkeypatch, op, fault)
    assert backends.resolved_backends(CPU)[op] == "cpu (not checked yet)"
    with pytest.warns(RuntimeWarning, match=rf"backend 'cpu' failed the check of {op} on cpu \(float32\) against "
                                            rf"the torch backend: {words}.*moves on to 'torch'") as record:
        _assert_correct(op)
    assert len([w for w in record if "failed the check" in str(w.message)]) == 1
    assert verify_on_cpu == [("cpu", op, ("float32",))]
    assert backends.resolved_backends(CPU)[op] == "torch"
    # Decided: no second check, no second warning, still correct.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_correct(op, seed=1)
    assert len(verify_on_cpu) == 1
    # Another dtype combination is checked on its own (the fault is there too).
    with pytest.warns(RuntimeWarning, match=rf"failed the check of {op} on cpu \(bfloat16\)"):
        _assert_correct(op, dtype=torch.bfloat16)
    assert verify_on_cpu[-1] == ("cpu", op, ("bfloat16",))
    assert backends.resolved_backends(CPU)[op] == "torch"


def test_a_healthy_backend_is_checked_once_per_op_and_dtypes_and_kept(verify_on_cpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for op in verify.OPS:
            _assert_correct(op)
            _assert_correct(op, seed=1)
        _assert_correct("rgp_mask", dtype=torch.float16)
    assert sorted(verify_on_cpu) == sorted([("cpu", op, ("float32",)) for op in verify.OPS]
                                           + [("cpu", "rgp_mask", ("float16",))])
    assert backends.resolved_backends(CPU) == {op: "cpu" for op in backends.CXX_OPS}


def test_decisions_per_dtype_are_reported_when_they_differ(verify_on_cpu, monkeypatch):
    _inject(monkeypatch, "rgp_select",
            lambda args, real_op: _threshold_one_ulp_up(args, real_op) if args[0][0].dtype == torch.float16
            else real_op(*args))
    _assert_correct("rgp_select")
    with pytest.warns(RuntimeWarning, match=r"failed the check of rgp_select on cpu \(float16\)"):
        _assert_correct("rgp_select", dtype=torch.float16)
    assert backends.resolved_backends(CPU)["rgp_select"] == "torch (float16); cpu (float32)"


def test_when_every_candidate_fails_the_verifier_runs(verify_on_cpu, monkeypatch):
    _inject(monkeypatch, "rgp_mask", _raise)
    with pytest.warns(RuntimeWarning, match="rgp_mask raised RuntimeError: boom.*moves on to 'torch'"):
        assert verify.verified_backend(CPU, "rgp_mask", ("float32",), order=("cpu",)) == "torch"


def test_the_switch_turns_the_check_off(verify_on_cpu, monkeypatch):
    """Without the check, "auto" trusts the faulty backend: its wrong threshold comes through."""
    monkeypatch.setattr(backends, "VERIFY_DEVICE_TYPES", frozenset())
    _inject(monkeypatch, "rgp_select", _threshold_one_ulp_up)
    lists = _user_lists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _call("rgp_select", lists)
    expected = _call("rgp_select", lists, backend="reference")
    assert not bitwise_equal_f32(got[0], expected[0])
    assert verify_on_cpu == [] and verify.decisions == {}
    assert backends.resolved_backends(CPU)["rgp_select"] == "cpu"


def test_the_environment_variable():
    assert backends._verify_device_types(None) == {"cuda"}
    assert backends._verify_device_types("1") == {"cuda"}
    assert backends._verify_device_types("0") == frozenset()
    assert backends._verify_device_types("cuda, cpu") == {"cuda", "cpu"}
    for bad in ("false", "cuda:0", "gpu"):
        with pytest.raises(ValueError, match=f"CURE_KERNELS_VERIFY='{bad}': expected 0 .*, 1 "):
            backends._verify_device_types(bad)
    code = "from cure_kernels import backends; print(','.join(sorted(backends.VERIFY_DEVICE_TYPES)))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for value, expected in (("0", ""), ("cpu,cuda", "cpu,cuda")):
        env = {**os.environ, "CURE_KERNELS_VERIFY": value, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == expected


def test_under_torch_compile_the_check_runs_while_tracing(verify_on_cpu, monkeypatch):
    _inject(monkeypatch, "rgp_mask", _threshold_one_ulp_up)
    torch._dynamo.reset()

    def step(updates, nat, adv):
        stats = ck.rgp_mask_(updates, nat, adv, alpha=0.1, p=0.3)
        return stats.thresholds * 1, stats.kept

    lists = _user_lists()
    expected = _clone(lists)
    exp_thr, exp_kept, _ = reference.rgp_mask_reference(expected["grads"], expected["grads_nat"],
                                                        expected["grads_adv"], 0.1, 0.3)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning, match="backend 'cpu' failed the check of rgp_mask"):
        thr, kept = compiled(lists["grads"], lists["grads_nat"], lists["grads_adv"])
    assert bitwise_equal_f32(thr, exp_thr) and torch.equal(kept, exp_kept) and _same(lists["grads"], expected["grads"])
    assert backends.resolved_backends(CPU)["rgp_mask"] == "torch" and len(verify_on_cpu) == 1


# --- the check itself --------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", verify.OPS)
def test_the_backends_that_run_here_pass_the_check(op):
    for dtypes in (("float32",), ("bfloat16", "float16")):
        for backend in ("cpu", "reference"):
            assert verify.check_backend(backend, CPU, op, dtypes) is None


def test_the_check_problem_takes_the_bracket_and_the_radix_paths():
    """On the C++ CPU kernels (their path counters): three tensors through the sampling bracket, the small ones
    through the direct (radix/nth_element) selection, the NaN tensor settled as non-finite."""
    names, lists = verify.check_problem(CPU, ("float32",))
    torch.ops.cure.cpu_selection_counters(True)
    ck.rgp_select(lists["grads_nat"], lists["grads_adv"], alpha=verify.ALPHA, p=verify.P, backend="cpu")
    counts = dict(zip(("empty", "direct", "bracket", "fallback", "nonfinite"),
                      torch.ops.cure.cpu_selection_counters(True).tolist()))
    assert counts["bracket"] == 3 and counts["direct"] >= 2 and counts["nonfinite"] == 1, counts
    scores = [reference.rgp_scores(a, b, verify.ALPHA) for a, b in zip(lists["grads_nat"], lists["grads_adv"])]
    by_name = dict(zip(names, scores))
    assert (by_name["zeros/float32"] == 0).float().mean() > 0.7
    assert by_name["ties/float32"].unique().numel() < 20
    assert int(by_name["nan/float32"].isnan().sum()) == 1 and int(by_name["radix+inf/float32"].isinf().sum()) > 1
    assert min(by_name[f"{k}/float32"].numel() for k in ("bracket", "zeros", "ties")) >= verify.BRACKET_MIN
