"""GPU timing for the kernel benchmarks: CUDA events around the kernels only, L2 flushed in between.

Per repetition: ``setup()`` (untimed, e.g. restoring inputs an in-place op changed), a write of a
256 MB buffer (evicts the previous repetition's data from L2: an H100/H200 L2 holds 50-60 MB, most of
ResNet-18's gradients), then ``fn()`` bracketed by two CUDA events. Before the first event the stream is kept busy by a
spin kernel (``torch.cuda._sleep``) longer than the host needs to enqueue ``fn``'s launches, so the
kernels run back to back and the events time the kernels only, not the host's launch gaps. The
host time is the wall time the call took to return (Python, argument checks, launches; reported
separately). A call that synchronises (the official path copies to the host) is timed to its end.
Timing starts after ``warmup`` untimed calls (Triton compiles on the first). On the CPU (dry runs)
both times are the wall time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 * 2**20


@dataclass
class GpuTiming:
    median_ms: float  # GPU time between the events (wall time on the CPU)
    p20_ms: float
    p80_ms: float
    host_ms: float  # median wall time of the call itself, until it returned to Python
    reps: int


class L2Flusher:
    """Writes a buffer larger than the L2 cache (256 MB by default) on ``device``."""

    def __init__(self, device: torch.device, nbytes: int = L2_FLUSH_BYTES):
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def flush(self) -> None:
        if self.buf is not None:
            self.buf.fill_(0x5A5A5A5A)


def _quantile(sorted_samples: list[float], q: float) -> float:
    i = q * (len(sorted_samples) - 1)
    lo = int(i)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (i - lo)


def time_gpu(fn: Callable[[], object], device: torch.device, *, reps: int, warmup: int = 3,
             setup: Callable[[], object] | None = None, flusher: L2Flusher | None = None) -> GpuTiming:
    """Median, 20 % and 80 % quantiles of the GPU time of ``fn`` and the median host time (ms)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    cycles = 0
    if cuda:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        host_estimate = time.perf_counter() - t0
        torch.cuda.synchronize(device)
        # Spin for twice the host's enqueue time (at an assumed 2 GHz; a longer spin only costs time).
        cycles = int(min(max(2 * host_estimate, 1e-4), 0.2) * 2e9)
    gpu, host = [], []
    for _ in range(reps):
        if setup:
            setup()
        if flusher is not None:
            flusher.flush()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            torch.cuda._sleep(cycles)
            start.record()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            gpu.append((t1 - t0) * 1e3)
        host.append((t1 - t0) * 1e3)
    gpu.sort()
    return GpuTiming(statistics.median(gpu), _quantile(gpu, 0.2), _quantile(gpu, 0.8), statistics.median(host),
                     reps)


def gpu_name(device: torch.device) -> str:
    """The device's name as a file-name fragment, e.g. 'NVIDIA-H200' (or 'cpu')."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")


__all__ = ["GpuTiming", "L2Flusher", "time_gpu", "gpu_name", "L2_FLUSH_BYTES"]
