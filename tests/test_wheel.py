"""The package builds as a wheel against the installed torch (`pip wheel --no-build-isolation`, CPU
kernels only) and the wheel holds what an install needs: both packages, the compiled ops, the type
markers, the licence and the command-line entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_builds_without_build_isolation_and_holds_the_package(tmp_path):
    env = {**os.environ, "CURE_SKIP_CUDA_BUILD": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    env.pop("CURE_NO_BUILD", None)
    # A copy of the sources, so that the build leaves the checkout's build/ and in-place extension alone.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "runs", "results", "data", "*.so", "__pycache__", "*.egg-info", ".*_cache"))
    out = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("cure_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("cure/__init__.py", "cure/train.py", "cure/py.typed", "cure_kernels/__init__.py",
                     "cure_kernels/torch_backend.py", "cure_kernels/py.typed"):
        assert expected in names, expected
    assert any(n.startswith("cure_kernels/_C") and n.endswith(".so") for n in names), names
    dist_info = [n for n in names if ".dist-info/" in n]
    assert any(n.endswith("LICENSE") for n in dist_info), dist_info
    entry_points = next(n for n in dist_info if n.endswith("entry_points.txt"))
    assert "cure = cure.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith(("tests/", "bench/", "scripts/")) for n in names)
