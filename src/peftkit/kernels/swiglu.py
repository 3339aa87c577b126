"""SwiGLU gate: h = silu(g) * u, one kernel each way.

    silu(g) = g * sig(g),   sig(g) = 1 / (1 + exp(-g))
    h = round(silu(g)) * u                     round: to g's dtype, as two eager ops do

Backward:
    du = dh * silu(g)
    dg = dh * u * sig(g) * (1 + g * (1 - sig(g)))

Saved: g and u. The eager pair also keeps silu(g), one more (N, ffn) tensor per layer.
"""

from __future__ import annotations

import torch

from . import triton_kernels as tk
from .backend import cdiv, use_triton

_BLOCK = 2048


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate)
        n = gate.numel()
        tk.silu_mul_fwd[(cdiv(n, _BLOCK),)](gate, up, h, n, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        tk.silu_mul_bwd[(cdiv(n, _BLOCK),)](dh, gate, up, dgate, dup, n, BLOCK=_BLOCK)
        return dgate, dup


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, fused on CUDA with Triton; the reference elsewhere."""
    if use_triton(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
        return _SiluMul.apply(gate, up)
    return silu_mul_reference(gate, up)
