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
    if not triton_kernels.HAS_TRITON or os.environ.get("PEFTKIT_KERNELS") == "reference":
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return all((t.is_cuda or interpret) and t.dtype != torch.float64 for t in tensors)


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of `b` cover `a` (a kernel grid's size)."""
    return (a + b - 1) // b
