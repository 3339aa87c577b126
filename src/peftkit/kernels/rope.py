"""Rotary position embedding (Llama's rotate-half form) on q and k, one kernel each way.

    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x1, x2) = (-x2, x1)

Linear in x, so the backward is the transpose applied to dy:
    dx1 = dy1 c1 + dy2 s2,   dx2 = dy2 c2 - dy1 s1
Saved: cos and sin only (shared by every layer). q, k: (B, heads, S, D) in any strides with a
unit last stride; cos, sin: (B or 1, S, D).
"""

from __future__ import annotations

import torch

from . import triton_kernels as tk
from .backend import use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb with unsqueeze_dim=1: the spec."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                  # (B, 1, S, D)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, heads, seq, dim = x.shape
    cos, sin = cos.expand(batch, seq, dim), sin.expand(batch, seq, dim)  # (B, S, D), maybe stride 0
    y = torch.empty_like(x)
    block_h = 1 << max(heads - 1, 1).bit_length()
    tk.rope_token[(batch * seq,)](
        x, cos, sin, y, heads, seq, x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2), cos.stride(0), cos.stride(1),
        HALF=dim // 2, BLOCK_H=block_h, BACKWARD=backward)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, cos, sin, False), _launch(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return _launch(dq, cos, sin, True), _launch(dk, cos, sin, True), None, None


def _fusable(q, k, cos, sin) -> bool:
    half = q.shape[-1] // 2
    return (q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and cos.stride(-1) == 1
            and sin.stride() == cos.stride() and half >= 1 and half & (half - 1) == 0
            and q.dtype == k.dtype == cos.dtype == sin.dtype and not cos.requires_grad)


def apply_rope(q, k, cos, sin):
    """(rope(q), rope(k)); fused on CUDA with Triton, the reference elsewhere."""
    if use_triton(q, k, cos, sin) and _fusable(q, k, cos, sin):
        return _Rope.apply(q, k, cos, sin)
    return rope_reference(q, k, cos, sin)
