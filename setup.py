"""Builds cure_kernels._C: the C++ CPU kernels always, the CUDA kernels when a toolkit is found.

Environment switches (flash-attention style):
  CURE_SKIP_CUDA_BUILD=1   build the CPU kernels only, even when a CUDA toolkit is present.
  CUDA_HOME=/path          the CUDA toolkit to use (default: /usr/local/cuda if it exists).
  TORCH_CUDA_ARCH_LIST     GPU architectures to compile for (default here: "9.0", Hopper).
  MAX_JOBS=N               parallel compile jobs for ninja (default: number of cores).
  CURE_NO_BUILD=1          build nothing (the extension was already built in place with
                           `python setup.py build_ext --inplace`, whose ninja cache in build/ makes
                           rebuilds incremental); used by scripts/setup_env.sh.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch you have.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_home() -> str | None:
    if os.environ.get("CURE_SKIP_CUDA_BUILD", "0") == "1":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if not home or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return None
    return home


def _check_cuda_versions(home: str) -> None:
    """torch's CUDA major version must match nvcc's, or the extension will not load."""
    if torch.version.cuda is None:
        raise RuntimeError(f"a CUDA toolkit was found at {home} but this torch ({torch.__version__}) is a "
                           f"CPU-only build; install a CUDA build of torch or set CURE_SKIP_CUDA_BUILD=1")
    out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if match and match.group(1) != torch.version.cuda.split(".")[0]:
        raise RuntimeError(f"nvcc at {home} is CUDA {match.group(1)}.{match.group(2)} but torch was built with "
                           f"CUDA {torch.version.cuda}; point CUDA_HOME at a matching toolkit or set "
                           f"CURE_SKIP_CUDA_BUILD=1 to build the CPU kernels only")


def extensions() -> list:
    if os.environ.get("CURE_NO_BUILD", "0") == "1":
        return []
    cpu_sources = _rel([os.path.join(ROOT, "csrc", "cure_ops.cpp")]
                       + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    # -ffp-contract=off: no fused multiply-add, the scores and thresholds must be bit-exact.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-DNDEBUG"]
    home = _cuda_home()
    if home and cuda_sources:
        _check_cuda_versions(home)
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        nvcc = ["-O3", "--fmad=false", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo"]
        return [cpp_extension.CUDAExtension(
            "cure_kernels._C", cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DCURE_WITH_CUDA"], "nvcc": nvcc + ["-DCURE_WITH_CUDA"]},
            extra_link_args=["-fopenmp"], py_limited_api=False)]
    return [cpp_extension.CppExtension("cure_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx},
                                       extra_link_args=["-fopenmp"])]


setup(
    packages=find_packages(include=["cure_kernels", "cure_kernels.*", "cure", "cure.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
