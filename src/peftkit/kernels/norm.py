"""RMSNorm as in Llama, one fused kernel each way.

    rstd = 1 / sqrt(mean(x^2) + eps)          per row, float32
    y    = w * round(x * rstd)                 round: to x's dtype, as transformers does

Backward, with g = dy * w and xhat = x * rstd (the rounding is treated as identity):
    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * round(xhat)    (only formed when w needs a gradient)

Saved: x and rstd (N floats). The reference keeps transformers' float32 copies of x instead.
"""

from __future__ import annotations

import torch

from . import triton_kernels as tk
from .backend import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward (float64 stays float64 instead of going to float32)."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()                 # (N, H)
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)  # (N, H)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = triton_block(x2.shape[1])
        tk.rms_norm_fwd[(x2.shape[0],)](x2, weight, y, rstd, x2.shape[1], eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()                      # (N, H)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x2)
            block = triton_block(x2.shape[1])
            tk.rms_norm_bwd[(x2.shape[0],)](dy2, x2, weight, rstd, dx, x2.shape[1], BLOCK=block)
            dx = dx.view(dy.shape)
        if ctx.needs_input_grad[1]:
            xhat = (x2.float() * rstd[:, None]).to(x2.dtype)        # (N, H)
            dw = (dy2.float() * xhat.float()).sum(0).to(weight.dtype)
        return dx, dw, None


def triton_block(n_cols: int) -> int:
    """A power of two that holds one whole row."""
    return 1 << max(n_cols - 1, 1).bit_length()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm on CUDA with Triton; the reference elsewhere."""
    if use_triton(x, weight):
        return _RMSNorm.apply(x, weight, float(eps))
    return rms_norm_reference(x, weight, eps)
