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
from collections.abc import Callable, Sequence
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


def git_sha() -> str:
    """The short commit SHA of this checkout, with "-dirty" when tracked files outside bench/results/ have
    uncommitted changes."""
    cwd = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=cwd).stdout.strip()
        # Measured results are not sources: rewriting bench/results/ does not make the checkout dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)bench/results"], capture_output=True, text=True, cwd=cwd).stdout.strip()
    except OSError:
        return "unknown"
    if not sha:
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def time_round_robin(fns: dict[str, Callable[[], object]], *, reps: int, warmup: int = 1,
                     setup: Callable[[], object] | None = None) -> dict[str, Timing]:
    """CPU timings of several providers, interleaved: every repetition runs each provider once, in turn, so
    a load change on a shared machine affects all of them alike. ``setup`` (untimed) runs before each call."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            if rep >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _quantiles(v) for name, v in samples.items()}


def environment(device: torch.device) -> dict[str, str]:
    sha = git_sha()
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


def write_csv(name: str, rows: list[dict], key: Sequence[str] | None = None) -> str:
    """Write ``rows`` to ``RESULTS_DIR/name``.

    With ``key`` (column names), the rows are MERGED into the existing file: an existing row whose key
    columns equal a new row's is replaced by it, every other existing row is kept, and the columns are
    the union of both (new columns appended). Without ``key`` the file is overwritten.
    """
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, name)
    fields = list(dict.fromkeys(c for r in rows for c in r))
    if key is not None and os.path.exists(path):
        missing = [k for k in key if k not in fields]
        if missing:
            raise ValueError(f"merge key columns {missing} are missing from the new rows of {name}")
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            old_fields = list(reader.fieldnames or [])
            old_rows = list(reader)

        def ident(row: dict) -> tuple[str, ...]:
            return tuple(_fmt_key(row.get(k)) for k in key)

        new_keys = {ident(r) for r in rows}
        kept = [r for r in old_rows if ident(r) not in new_keys]
        fields = list(dict.fromkeys(old_fields + fields))
        rows = kept + list(rows)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt_key(v: object) -> str:
    return "" if v is None else str(v)


# The CPU mask kernel before the one-read selection, kept buildable for side-by-side benchmarks: its
# source at BASELINE_COMMIT, compiled under the op namespace ``cure_baseline`` (torch.utils.cpp_extension).
BASELINE_COMMIT = "ef76c86"
_BASELINE_SCHEMA = ("rgp_mask(Tensor(a!)[] updates, Tensor[] grads_nat, Tensor[] grads_adv, float alpha, float p)"
                    " -> (Tensor, Tensor, Tensor)")


def load_cpu_mask_baseline(commit: str = BASELINE_COMMIT) -> Callable | None:
    """``torch.ops.cure_baseline.rgp_mask``: csrc/cpu/rgp_mask_cpu.cpp as of ``commit``, or None (with a message
    on stderr) when it cannot be built here."""
    import sys
    import tempfile

    from torch.utils import cpp_extension

    if hasattr(torch.ops, "cure_baseline") and hasattr(torch.ops.cure_baseline, "rgp_mask"):
        return torch.ops.cure_baseline.rgp_mask
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        src = subprocess.run(["git", "show", f"{commit}:csrc/cpu/rgp_mask_cpu.cpp"], capture_output=True, text=True,
                             cwd=root, check=True).stdout
        registration = 'TORCH_LIBRARY_IMPL(cure, CPU, m) { m.impl("rgp_mask", &cure::rgp_mask_cpu); }'
        if registration not in src:
            raise RuntimeError(f"unexpected registration in the {commit} kernel")
        src = src.replace(registration, "")
        src = src.replace("namespace cure {", "namespace cure_baseline {")
        src += (f'\nTORCH_LIBRARY(cure_baseline, m) {{ m.def("{_BASELINE_SCHEMA}"); }}\n'
                'TORCH_LIBRARY_IMPL(cure_baseline, CPU, m) { m.impl("rgp_mask", &cure_baseline::rgp_mask_cpu); }\n')
        folder = os.path.join(tempfile.gettempdir(), f"cure_baseline_{commit}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "rgp_mask_baseline.cpp")
        with open(path, "w") as fh:
            fh.write(src)
        cpp_extension.load(name=f"cure_mask_baseline_{commit}", sources=[path], is_python_module=False,
                           extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", "-DNDEBUG"],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"the {commit} CPU mask kernel cannot be built here: {exc}", file=sys.stderr)
        return None
    return torch.ops.cure_baseline.rgp_mask


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


__all__ = ["Timing", "time_fn", "time_round_robin", "environment", "git_sha", "write_csv", "print_table", "asdict",
           "BASELINE_COMMIT", "load_cpu_mask_baseline"]
