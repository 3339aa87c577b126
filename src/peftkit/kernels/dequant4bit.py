"""Dequantize packed 4-bit weights (NF4/FP4, see ``peftkit.quant.nf4``): a Triton kernel and its twin.

    w_i = q[c_i] * absmax[i // block_size]        in float32, rounded once to the output dtype

The reference is ``peftkit.quant.nf4.dequantize_4bit``. Both paths undo double quantization of the
absmax constants the same way in PyTorch first (n / 64 values), so the kernel does one product per
value and matches the reference bit for bit.
"""

from __future__ import annotations

import torch

from peftkit.quant import nf4

from . import triton_kernels as tk
from .backend import cdiv, use_triton

_BYTES = 2048  # packed bytes per program (4096 values)
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}  # code tables already on a device


def _table(quant_type: str, device: torch.device) -> torch.Tensor:
    key = (quant_type, device)
    if key not in _TABLES:
        _TABLES[key] = nf4.code_table(quant_type).to(device)
    return _TABLES[key]


def dequantize_4bit_triton(packed: torch.Tensor, state: nf4.QuantState, dtype: torch.dtype,
                           absmax: torch.Tensor | None = None) -> torch.Tensor:
    n = state.numel
    out = torch.empty(n, dtype=dtype, device=packed.device)  # (n,)
    absmax = (nf4.absmax_of(state) if absmax is None else absmax).contiguous()  # (n_blocks,) fp32
    tk.dequant_4bit[(cdiv(cdiv(n, 2), _BYTES),)](packed.contiguous(), _table(state.quant_type, packed.device), absmax,
                                                 out, n, QBLOCK=state.block_size, BYTES=_BYTES, num_warps=8)
    return out.view(state.shape)


def dequantize_4bit(packed: torch.Tensor, state: nf4.QuantState, dtype: torch.dtype | None = None,
                    absmax: torch.Tensor | None = None) -> torch.Tensor:
    """The weight in ``dtype`` (default: the original dtype): Triton on CUDA, the reference elsewhere.

    ``absmax``: the block constants already decoded (``nf4.absmax_of(state)``), for callers that
    rebuild the same weight twice (forward and backward) and undo double quantization once.
    """
    dtype = dtype or state.dtype
    if dtype != torch.float64 and use_triton(packed, state.absmax):
        return dequantize_4bit_triton(packed, state, dtype, absmax)
    return nf4.dequantize_4bit(packed, state, dtype, absmax)
