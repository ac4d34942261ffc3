"""Shared benchmark plumbing: timing, environment description, CSV output, table printing.

Every benchmark times all providers in one process, on the same inputs, and writes a CSV row per
(benchmark, provider, size) with the machine, versions and git SHA.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantiles(samples_ms: list[float]) -> Timing:
    samples = sorted(samples_ms)
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return Timing(statistics.median(samples), q[1], q[7])


def time_fn(fn: Callable[[], object], device: torch.device, *, reps: int, warmup: int = 2,
            setup: Callable[[], object] | None = None) -> Timing:
    """Median and 20/80 % quantiles of ``fn`` in milliseconds.

    ``setup`` (untimed) runs before every call, e.g. to restore inputs an in-place op modified.
    On CUDA each call is bracketed by events after a synchronisation.
    """
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    samples = []
    for _ in range(reps):
        if setup:
            setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def environment(device: torch.device) -> dict[str, str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        sha = "unknown"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"machine": machine, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "git_sha": sha or "unknown"}


def write_csv(name: str, rows: list[dict]) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, name)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)


__all__ = ["Timing", "time_fn", "environment", "write_csv", "print_table", "asdict"]
