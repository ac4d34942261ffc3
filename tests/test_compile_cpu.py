"""``torch.compile`` on the CPU under a forced ATen capability (``cure.device.pin_inductor_cpu_isa``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cure.device import pin_inductor_cpu_isa

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def inductor_config():
    from torch._inductor import config

    saved = config.cpp.simdlen
    config.cpp.simdlen = None
    yield config
    config.cpp.simdlen = saved


def test_pins_the_width_inductor_would_pick_only_under_a_forced_capability(inductor_config, monkeypatch):
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert pin_inductor_cpu_isa(torch.device("cpu")) is None and inductor_config.cpp.simdlen is None

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # no vector ISA: width 0, not None
    assert pin_inductor_cpu_isa(torch.device("cpu")) == 0 == inductor_config.cpp.simdlen
    inductor_config.cpp.simdlen = None

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    want = pick_vec_isa().bit_width()  # what Inductor picks with simdlen unset
    assert pin_inductor_cpu_isa(torch.device("cpu")) == want == inductor_config.cpp.simdlen
    assert pick_vec_isa().bit_width() == want  # the same ISA once pinned: no generated code changes

    inductor_config.cpp.simdlen = 128  # a user's own setting is left alone
    assert pin_inductor_cpu_isa(torch.device("cpu")) is None and inductor_config.cpp.simdlen == 128
    inductor_config.cpp.simdlen = None
    assert pin_inductor_cpu_isa(torch.device("cuda")) is None and inductor_config.cpp.simdlen is None


@pytest.mark.slow
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512" or "ATEN_CPU_CAPABILITY" in os.environ,
                    reason="mixing vector widths in one Inductor cache needs an AVX-512 CPU at its own capability")
def test_the_workaround_keeps_avx512_and_avx2_graphs_apart_in_one_cache():
    """Two processes share one Inductor cache, the second under ATEN_CPU_CAPABILITY=avx2: with the width
    pinned, both compiled models equal eager mode (without it the second is garbage on torch 2.14.1)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "repro_inductor_isa_cache.py"), "--pin"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "AVX512: max" in done.stdout and "AVX2: max" in done.stdout
