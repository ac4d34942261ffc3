"""Test configuration. On a machine without a GPU, Triton kernels run in Triton's interpreter on CPU
tensors; the variable must be set before triton is imported anywhere."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
