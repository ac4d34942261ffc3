"""setup.py's CUDA build choices as pure functions: nvcc version checks and the default architecture list."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions, without running setup() (it runs only as __main__)."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_helpers")


NVCC_13_ARCHS = """compute_75
compute_80
compute_86
compute_87
compute_88
compute_89
compute_90
compute_100
compute_110
compute_103
compute_120
compute_121
"""


def test_default_arch_list_covers_ampere_to_hopper_with_ptx(setup_py):
    default = setup_py["default_arch_list"]
    supported = setup_py["parse_gpu_arch_list"](NVCC_13_ARCHS)
    assert {"7.5", "8.0", "9.0", "10.0", "12.0", "12.1"} <= supported and "1.0" not in supported
    assert default((13, 0), supported) == "8.0;8.6;8.9;9.0+PTX"
    assert default((12, 4), None) == "8.0;8.6;8.9;9.0+PTX"  # release table when --list-gpu-arch is missing
    # An nvcc that cannot target some of them: those are dropped, PTX moves to the newest kept.
    assert default((11, 8), {"8.0", "8.6"}) == "8.0;8.6+PTX"
    assert default((11, 1), None) == "8.0;8.6+PTX"
    with pytest.raises(RuntimeError, match="can target none of 8.0, 8.6, 8.9, 9.0"):
        default((10, 2), None)


def test_nvcc_version_parsing_and_minimum(setup_py):
    parse, check = setup_py["parse_nvcc_version"], setup_py["check_nvcc_version"]
    text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
    assert parse(text) == (13, 0)
    assert parse("Cuda compilation tools, release 11.8, V11.8.89") == (11, 8)
    assert parse("command not found") is None
    assert setup_py["MIN_NVCC"] == (12, 1)  # the ~14 KB __grid_constant__ launch tables (> 4 KB: CUDA 12.1)
    check((12, 1), "/usr/local/cuda")
    check((13, 0), "/usr/local/cuda")
    with pytest.raises(RuntimeError, match=r"need nvcc 12\.1 or newer.*has nvcc 12\.0.*CURE_SKIP_CUDA_BUILD=1"):
        check((12, 0), "/opt/cuda-12.0")
    with pytest.raises(RuntimeError, match="could not read the version"):
        check(None, "/opt/cuda")


def test_setup_runs_only_as_main(monkeypatch):
    import setuptools

    calls = []
    monkeypatch.setattr(setuptools, "setup", lambda **kw: calls.append(kw))
    monkeypatch.setenv("CURE_NO_BUILD", "1")  # no extension objects either way
    runpy.run_path(str(ROOT / "setup.py"), run_name="setup_helpers")
    assert calls == []
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")  # how `python setup.py` and pip run it
    assert len(calls) == 1 and calls[0]["ext_modules"] == []
