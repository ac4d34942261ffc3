#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv with PyTorch and the
# project's dependencies, the Fashion-MNIST files, and the compiled extension (C++ CPU kernels,
# plus the CUDA kernels when a CUDA toolkit is found). Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP="$VENV/bin/pip --disable-pip-version-check -q"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch 2.14.1 and torchvision 0.29.1 (a few minutes)"
  $PIP install torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] installing Python dependencies"
$PIP install 'numpy>=2.4.1' scipy tqdm tensorboard matplotlib pyautoattack pytest hypothesis ruff ninja setuptools wheel

if ! ls /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] Fashion-MNIST not found; run: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  # No GPU on this machine: the CUDA sources are compiled only to check that they build, so one
  # architecture is enough (setup.py's default list is four plus PTX, several times the compile time).
  export TORCH_CUDA_ARCH_LIST=9.0
fi
echo "[setup] building the extension (CUDA kernels too when CUDA_HOME is set: ${CUDA_HOME:-none}; archs ${TORCH_CUDA_ARCH_LIST:-default})"
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" setup.py -q build_ext --inplace
CURE_NO_BUILD=1 $PIP install --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import cure_kernels as ck; print('[setup] backends available here:', ck.available_backends())"
