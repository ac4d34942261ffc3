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
