"""The CUDA kernels' logic, checked on the CPU: csrc/cuda/emulation builds the real kernel sources
against a CPU emulation of the CUDA features they use and compares every result with the reference.
This is what a machine without a GPU can say about the CUDA backend; tests/test_cuda_backend.py runs
the same kernels on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cuda_kernels_exact_in_cpu_emulation():
    script = os.path.join(ROOT, "csrc", "cuda", "emulation", "check_emulated.py")
    done = subprocess.run([sys.executable, script, "--quick", "--config", "tiny"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
