"""bench/gpu_check.sh: its dry run goes through every step on the CPU and writes the three CSVs.

The GPU run itself (CUDA build, tests on the device, GPU timings) needs a GPU; the dry run checks the
same script and driver with tiny shapes, Triton in its interpreter, and no CUDA build.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import gpu_timing  # noqa: E402


def _rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_time_gpu_on_the_cpu_reports_wall_and_host_time():
    calls = []
    t = gpu_timing.time_gpu(lambda: calls.append(1), torch.device("cpu"), reps=3, warmup=2,
                            setup=lambda: calls.append(0), flusher=gpu_timing.L2Flusher(torch.device("cpu")))
    assert calls == [0, 1] * 5
    assert t.reps == 3 and 0 <= t.p20_ms <= t.median_ms <= t.p80_ms and t.host_ms >= 0
    assert gpu_timing.gpu_name(torch.device("cpu")) == "cpu"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "GPU_CHECK_BUDGET": "1500"}  # a loaded test machine: the budget is the GPU run's
    env.pop("TRITON_INTERPRET", None)  # the script sets it for the dry run itself
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all steps passed" in proc.stdout
    mask = _rows(os.path.join(tmp_path, "gpu_check_mask_cpu.csv"))
    providers = {r["provider"] for r in mask}
    assert {"official", "torch-kthvalue", "torch-sort", "torch-quantile", "torch-best", "cure-triton"} <= providers
    assert {r["zeros"] for r in mask} == {"0.0", "0.3"} and {r["model"] for r in mask} == {"resnet18", "large"}
    assert all(r["exact"] == "True" for r in mask if r["provider"] != "-")
    step = _rows(os.path.join(tmp_path, "gpu_check_step_cpu.csv"))
    assert all(r["exact"] == "True" for r in step if r["provider"] == "cure-triton") and len(step) >= 8
    train = _rows(os.path.join(tmp_path, "gpu_check_train_cpu.csv"))
    assert [r["provider"] for r in train] == ["trades", "cure"] and float(train[1]["vs trades"]) > 0
    assert os.path.exists(os.path.join(tmp_path, "gpu_check.log"))


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_a_failing_provider_leaves_the_other_rows_and_fails_the_run(tmp_path):
    """GPU_CHECK_FAIL_PROVIDER=triton makes every Triton call of bench/gpu_check.py raise: its rows say so, every
    other provider's rows are still written, and the exit status counts the two failed steps."""
    env = {**os.environ, "GPU_CHECK_FAIL_PROVIDER": "triton", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run", "--out", str(tmp_path),
                           "--only", "correctness,bench-mask"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FAILED steps: correctness bench-mask" in proc.stdout
    rows = _rows(os.path.join(tmp_path, "gpu_check_correctness_cpu.csv"))
    by_provider = {p: [r for r in rows if r["provider"] == p] for p in ("triton", "torch")}
    assert len(by_provider["triton"]) == len(by_provider["torch"]) == 2 * 2 * 2 * 6  # models, dtypes, data, ops
    assert all(r["ok"] == "False" and "injected failure" in r["detail"] for r in by_provider["triton"])
    assert all(r["ok"] == "True" and r["detail"] == "" for r in by_provider["torch"])
    mask = _rows(os.path.join(tmp_path, "gpu_check_mask_cpu.csv"))
    failed = [r for r in mask if r["provider"] == "cure-triton"]
    assert len(failed) == 4 and all(r["exact"] == "False" and "injected" in r["note"] for r in failed)
    assert {"official", "torch-kthvalue", "torch-sort", "torch-best"} <= {r["provider"] for r in mask}
    assert all(r["exact"] == "True" and float(r["gpu_ms"]) > 0 for r in mask if r["provider"] == "official")
