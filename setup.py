"""Builds cure_kernels._C: the C++ CPU kernels always, the CUDA kernels when a toolkit is found.

Environment switches (flash-attention style):
  CURE_SKIP_CUDA_BUILD=1   build the CPU kernels only, even when a CUDA toolkit is present.
  CUDA_HOME=/path          the CUDA toolkit to use (default: /usr/local/cuda if it exists).
  TORCH_CUDA_ARCH_LIST     GPU architectures to compile for. Default: "8.0;8.6;8.9;9.0+PTX" (A100/A30,
                           A10/A40/RTX 30xx, L4/L40/RTX 40xx, H100/H200, and PTX that newer GPUs such
                           as Blackwell JIT-compile), minus any the installed nvcc cannot target. Add
                           e.g. "10.0;12.0" for native Blackwell code (nvcc 12.8 or newer).
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

#: The oldest nvcc the CUDA kernels are built with: they pass their launch tables as one ``__grid_constant__``
#: kernel argument of about 14 KB, and kernel arguments above 4 KB need CUDA 12.1 (before it the limit is
#: 4,096 bytes); they also need C++17, cuda_bf16.h and the sm_89/sm_90 targets (older releases).
MIN_NVCC = (12, 1)
#: Default GPU architectures: data-centre and workstation GPUs from Ampere on (the kernels' dtypes
#: include bfloat16); the last one kept also gets PTX, so newer GPUs can JIT-compile it.
DEFAULT_ARCHS = ("8.0", "8.6", "8.9", "9.0")
#: The first nvcc release that can target each architecture (for when `nvcc --list-gpu-arch` is missing).
ARCH_SINCE = {"8.0": (11, 0), "8.6": (11, 1), "8.7": (11, 4), "8.9": (11, 8), "9.0": (11, 8),
              "10.0": (12, 8), "12.0": (12, 8)}


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


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from the output of `nvcc --version` ("... release 12.4, V12.4.131"), or None."""
    match = re.search(r"release (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_gpu_arch_list(text: str) -> set[str]:
    """Architectures ("8.0", "9.0", ...) from the output of `nvcc --list-gpu-arch` (compute_80, ...)."""
    archs = set()
    for major_minor in re.findall(r"compute_(\d+)", text):
        archs.add(f"{int(major_minor) // 10}.{int(major_minor) % 10}")
    return archs


def check_nvcc_version(version: tuple[int, int] | None, home: str) -> None:
    """The kernels need nvcc MIN_NVCC or newer; say which one was found and what to do."""
    if version is None:
        raise RuntimeError(f"could not read the version of {os.path.join(home, 'bin', 'nvcc')} (`nvcc --version`); "
                           f"point CUDA_HOME at a CUDA toolkit or set CURE_SKIP_CUDA_BUILD=1")
    if version < MIN_NVCC:
        need = ".".join(map(str, MIN_NVCC))
        raise RuntimeError(f"the CUDA kernels need nvcc {need} or newer (kernel arguments larger than 4 KB); "
                           f"{home} has nvcc {version[0]}.{version[1]}. Point CUDA_HOME at CUDA {need}+ or set "
                           f"CURE_SKIP_CUDA_BUILD=1 to build the CPU kernels only")


def default_arch_list(version: tuple[int, int], supported: set[str] | None = None) -> str:
    """TORCH_CUDA_ARCH_LIST default: DEFAULT_ARCHS that this nvcc can target, PTX on the newest.

    ``supported`` is what `nvcc --list-gpu-arch` reports (None when that is unavailable: then the
    release table ARCH_SINCE decides).
    """
    keep = [a for a in DEFAULT_ARCHS
            if (a in supported if supported is not None else version >= ARCH_SINCE.get(a, (99, 0)))]
    if not keep:
        raise RuntimeError(f"nvcc {version[0]}.{version[1]} can target none of {', '.join(DEFAULT_ARCHS)}; set "
                           f"TORCH_CUDA_ARCH_LIST to the architectures you need or CURE_SKIP_CUDA_BUILD=1")
    return ";".join(keep[:-1] + [keep[-1] + "+PTX"])


def _nvcc_output(home: str, *args: str) -> str:
    try:
        return subprocess.run([os.path.join(home, "bin", "nvcc"), *args], capture_output=True, text=True).stdout
    except OSError:
        return ""


def _check_cuda_versions(home: str) -> tuple[int, int]:
    """nvcc must be new enough for the kernels and match torch's CUDA major version (or the extension will
    not load). Returns nvcc's (major, minor)."""
    if torch.version.cuda is None:
        raise RuntimeError(f"a CUDA toolkit was found at {home} but this torch ({torch.__version__}) is a "
                           f"CPU-only build; install a CUDA build of torch or set CURE_SKIP_CUDA_BUILD=1")
    version = parse_nvcc_version(_nvcc_output(home, "--version"))
    check_nvcc_version(version, home)
    if str(version[0]) != torch.version.cuda.split(".")[0]:
        raise RuntimeError(f"nvcc at {home} is CUDA {version[0]}.{version[1]} but torch was built with "
                           f"CUDA {torch.version.cuda}; point CUDA_HOME at a matching toolkit or set "
                           f"CURE_SKIP_CUDA_BUILD=1 to build the CPU kernels only")
    return version


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
        version = _check_cuda_versions(home)
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            supported = parse_gpu_arch_list(_nvcc_output(home, "--list-gpu-arch")) or None
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(version, supported)
        nvcc = ["-O3", "--fmad=false", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo"]
        return [cpp_extension.CUDAExtension(
            "cure_kernels._C", cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DCURE_WITH_CUDA"], "nvcc": nvcc + ["-DCURE_WITH_CUDA"]},
            extra_link_args=["-fopenmp"], py_limited_api=False)]
    return [cpp_extension.CppExtension("cure_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx},
                                       extra_link_args=["-fopenmp"])]


if __name__ == "__main__":  # `python setup.py ...` and pip's setuptools backend; tests import the helpers
    setup(
        packages=find_packages(include=["cure_kernels", "cure_kernels.*", "cure", "cure.*"]),
        package_data={"cure": ["py.typed"], "cure_kernels": ["py.typed"]},
        ext_modules=extensions(),
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
