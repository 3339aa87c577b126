"""One place that decides, per call, whether a Triton kernel or its PyTorch reference runs."""

from __future__ import annotations

import os

import torch

from . import triton_kernels


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton when it is installed and every tensor is on CUDA and not float64 (the kernels
    compute in float32); the reference otherwise.

    `PEFTKIT_KERNELS=reference` forces the reference everywhere. With `TRITON_INTERPRET=1`,
    Triton's CPU interpreter runs the kernels on CPU tensors (how the tests check them
    without a GPU).
    """
    if not triton_kernels.HAS_TRITON or any(t.dtype == torch.float64 for t in tensors):
        return False
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return os.environ.get("PEFTKIT_KERNELS") != "reference"  # asked last: the nodes call this per product


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of `b` cover `a` (a kernel grid's size)."""
    return (a + b - 1) // b
