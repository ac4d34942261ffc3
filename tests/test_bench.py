"""The benchmark scripts run end to end, write their CSV, and check exactness of what they time.

Small shapes and one repetition: these tests keep the scripts working, they measure nothing.
"""

from __future__ import annotations

import csv
import os
import sys

import pytest

import cure_kernels as ck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import bench_mask, bench_step, common  # noqa: E402


def _rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_mask_times_every_provider_and_each_is_exact(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    # Awkward sizes: single, prime, one past a power of two, a conv-shaped tensor. (No empty tensor: the
    # official path's numpy.percentile fails on one; models have none.)
    monkeypatch.setattr(bench_mask, "param_shapes", lambda name: [(1,), (97,), (4097,), (16, 8, 3, 3)])
    bench_mask.main(["--device", "cpu", "--models", "resnet18", "--reps", "1"])
    rows = _rows(os.path.join(tmp_path, "mask_cpu.csv"))
    mask = {r["provider"]: r for r in rows if r["bench"] == "mask"}
    expected = {"official", "torch-kthvalue", "torch-sort", "torch-quantile"}
    if "cpu" in ck.available_backends("cpu"):
        expected.add("cure-cpu")
    assert expected <= set(mask)
    for name, row in mask.items():
        assert row["exact"] == "True", f"{name} does not reproduce the reference mask"
        assert float(row["median_ms"]) > 0
    assert {r["provider"] for r in rows if r["bench"] == "revise"} >= {"torch-foreach"}
    assert rows[0]["git_sha"] and rows[0]["torch"]
    assert "official" in capsys.readouterr().out


def test_bench_step_times_the_requested_variants(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    variants = ["trades", "cure", "cure (official masking)"]
    bench_step.main(["--device", "cpu", "--steps", "1", "--batch-size", "8", "--variants", ",".join(variants)])
    rows = _rows(os.path.join(tmp_path, "step_cpu_cnn.csv"))
    assert [r["provider"] for r in rows] == variants
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert float(rows[0]["vs trades"]) == 1.0 and float(rows[1]["vs cure"]) == 1.0


def test_bench_step_rejects_an_unknown_variant(capsys):
    with pytest.raises(SystemExit):
        bench_step.main(["--variants", "trades,cure-fast"])
    assert "cure-fast" in capsys.readouterr().err


def test_write_csv_merges_rows_by_key_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    key = ["bench", "model", "provider", "device", "threads", "data"]
    base = {"bench": "mask", "device": "cpu", "threads": 2, "data": "random"}
    common.write_csv("x.csv", [{**base, "model": "a", "provider": "p", "median_ms": 1.0},
                               {**base, "model": "b", "provider": "p", "median_ms": 2.0}], key=key)
    # a re-measured row replaces its namesake; a row with another thread count is new; a new column is added
    path = common.write_csv("x.csv", [{**base, "model": "a", "provider": "p", "median_ms": 3.0, "extra": "e"},
                                      {**base, "threads": 1, "model": "a", "provider": "p", "median_ms": 4.0}],
                            key=key)
    rows = _rows(path)
    assert [(r["model"], r["threads"], r["median_ms"]) for r in rows] == [("b", "2", "2.0"), ("a", "2", "3.0"),
                                                                          ("a", "1", "4.0")]
    assert rows[0]["extra"] == "" and rows[1]["extra"] == "e"
    with pytest.raises(ValueError, match="missing"):
        common.write_csv("x.csv", [{"bench": "mask"}], key=key)
    common.write_csv("x.csv", [{**base, "model": "c", "provider": "p"}])  # no key: overwritten
    assert len(_rows(path)) == 1


def test_git_sha_marks_uncommitted_changes(tmp_path, monkeypatch):
    import subprocess

    def fake_run(cmd, **kw):
        out = {"rev-parse": "abc1234\n", "status": " M csrc/cpu/select_cpu.cpp\n"}[cmd[1]]
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    assert common.git_sha() == "abc1234-dirty"
    monkeypatch.setattr(common.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0, stdout="abc1234\n" if cmd[1] == "rev-parse" else "", stderr=""))
    assert common.git_sha() == "abc1234"


@pytest.mark.skipif("cpu" not in ck.available_backends("cpu"), reason="the C++ extension is not built here")
def test_bench_sgd_step_times_every_provider_and_the_fused_op_is_exact(tmp_path, monkeypatch):
    from bench import bench_sgd_step

    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(bench_sgd_step, "param_shapes", lambda name: [(1,), (97,), (70001,), (16, 8, 3, 3)])
    bench_sgd_step.main(["--models", "resnet18", "--data", "random,zeros30", "--reps", "1"])
    rows = _rows(os.path.join(tmp_path, "sgd_step_cpu.csv"))
    providers = {r["provider"] for r in rows}
    assert {"mask+sgd-fused", "step", "step+skip", "step+skip+revision"} <= providers
    assert {r["data"] for r in rows} == {"random", "zeros30"}
    assert all(r["exact"] == "True" for r in rows if r["provider"].startswith("step"))
    assert all(float(r["median_ms"]) > 0 for r in rows)


@pytest.mark.skipif("cpu" not in ck.available_backends("cpu"), reason="the C++ extension is not built here")
def test_bracket_mirror_agrees_with_the_kernel_counters():
    import torch

    from bench.bracket_hit_rate import BRACKET_MIN, bracket_outcome, sample_index

    gen = torch.Generator().manual_seed(0)
    n = 3 * BRACKET_MIN + 11
    nat = [torch.randn(n, generator=gen) for _ in range(3)] + [torch.randn(100, generator=gen)]
    adv = [torch.randn(t.shape, generator=gen) for t in nat]
    nat[1][sample_index(n)] = 1e-6  # an unrepresentative sample: ranks above the bracket, a miss
    adv[1][sample_index(n)] = 1e-6
    nat[2][5] = float("nan")
    predicted = [bracket_outcome(0.25 * a.abs() + 0.75 * b.abs(), 0.3)[0] for a, b in zip(nat, adv)]
    assert predicted == ["bracket", "fallback", "nonfinite", "direct"]
    torch.ops.cure.cpu_selection_counters(True)
    ck.rgp_mask_([t.clone() for t in nat], nat, adv, alpha=0.25, p=0.3, backend="cpu")
    assert torch.ops.cure.cpu_selection_counters(True).tolist() == [0, 1, 1, 1, 1]
