"""A linear layer whose frozen weight is stored as 4-bit codes (QLoRA's base layer).

    y = x W^T + b,    W = dequant(codes, absmax)  rebuilt in ``compute_dtype`` on every call

Only the packed codes (one uint8 per two weights) and the block constants are kept; the dequantized
W lives for one matmul. Backward rebuilds it again instead of saving it (``dx = dy W``), so training
keeps no full-size weight alive between forward and backward. W never gets a gradient; the bias is
an ordinary parameter (it may train with ``bias="all"``). The input is cast to ``compute_dtype`` and
the output back to the input's dtype, as bitsandbytes' ``Linear4bit`` does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.kernels.dequant4bit import dequantize_4bit
from peftkit.quant import nf4


class _Matmul4bit(torch.autograd.Function):
    """x W^T with W rebuilt from 4-bit codes; backward: dx = dy W (W is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, state: nf4.QuantState) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.state = state
        return F.linear(x, dequantize_4bit(packed, state, x.dtype))

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (packed,) = ctx.saved_tensors
        return dy @ dequantize_4bit(packed, ctx.state, dy.dtype), None, None


class Linear4bit(nn.Module):
    """Frozen 4-bit weight (NF4 or FP4, optionally double-quantized) plus an optional bias.

    Build one from a float layer with ``Linear4bit.from_linear``. ``weight`` is the packed uint8
    codes (a frozen parameter, so it moves with ``.to()`` and counts as 2 values per byte);
    ``absmax`` (and, when double-quantized, ``nested_absmax`` / ``nested_offset``, bitsandbytes'
    names) are buffers. ``from_quantized`` wraps codes and constants read from a file as they are.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute_dtype: torch.dtype = torch.float32,
                 quant_type: str = "nf4", double_quant: bool = False, block_size: int = 64) -> None:
        super().__init__()
        nf4.code_table(quant_type)  # validates quant_type
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.quant_type = compute_dtype, quant_type
        self.double_quant, self.block_size = double_quant, block_size
        self.nested_block_size = nf4.DQ_BLOCK
        self.weight_dtype = compute_dtype  # dtype of the weight before quantization
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.requantize(torch.zeros(out_features, in_features))

    @classmethod
    def from_linear(cls, layer: nn.Module, compute_dtype: torch.dtype = torch.float32, quant_type: str = "nf4",
                    double_quant: bool = False, block_size: int = 64) -> "Linear4bit":
        """Quantize ``nn.Linear`` (or GPT-2's ``Conv1D``, weight stored (in, out)) into a new layer."""
        weight = layer.weight.detach()
        weight = weight if isinstance(layer, nn.Linear) else weight.T  # (out, in)
        out_features, in_features = weight.shape
        new = cls(in_features, out_features, layer.bias is not None, compute_dtype, quant_type, double_quant, block_size)
        new.weight_dtype = weight.dtype
        new.requantize(weight)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return new.to(weight.device)

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, state: nf4.QuantState, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.float32) -> "Linear4bit":
        """A layer holding ``packed`` codes and ``state`` as they are (no requantization): W is (out, in)
        = ``state.shape``."""
        if len(state.shape) != 2:
            raise ValueError(f"a Linear4bit weight is 2-D (out, in), got shape {state.shape}")
        out_features, in_features = state.shape
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.compute_dtype = in_features, out_features, compute_dtype
        new.quant_type, new.block_size, new.weight_dtype = state.quant_type, state.block_size, state.dtype
        new.double_quant, new.nested_block_size = state.nested is not None, nf4.DQ_BLOCK
        new.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        new._store(packed.flatten(), state)
        return new

    # -- the quantized weight --------------------------------------------------------------------
    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the stored codes and constants by those of ``weight`` (out, in)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a Linear4bit of "
                             f"{self.in_features} -> {self.out_features} features")
        self._store(*nf4.quantize_4bit(weight, self.quant_type, self.block_size, self.double_quant))

    def _store(self, packed: torch.Tensor, state: nf4.QuantState) -> None:
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("absmax", state.absmax)
        if state.nested is not None:
            self.register_buffer("nested_absmax", state.nested.absmax)
            self.register_buffer("nested_offset", state.nested.offset)
            self.nested_block_size = state.nested.block_size

    def quant_state(self) -> nf4.QuantState:
        nested = None
        if self.double_quant:
            nested = nf4.NestedAbsmax(self.nested_absmax, self.nested_offset, self.absmax.numel(),
                                      self.nested_block_size)
        return nf4.QuantState((self.out_features, self.in_features), self.weight_dtype, self.quant_type,
                              self.block_size, self.absmax, nested)

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of everything that ``requantize`` replaces (for an exact restore)."""
        names = ("weight", "absmax") + (("nested_absmax", "nested_offset") if self.double_quant else ())
        return {name: getattr(self, name).detach().clone() for name in names}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        """Put back tensors from ``quantized_tensors``, bit for bit."""
        self.weight = nn.Parameter(saved["weight"], requires_grad=False)
        for name in ("absmax", "nested_absmax", "nested_offset"):
            if name in saved:
                setattr(self, name, saved[name])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in ``dtype`` (default ``compute_dtype``)."""
        return dequantize_4bit(self.weight, self.quant_state(), dtype or self.compute_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (default: the original dtype)."""
        dtype = dtype or self.weight_dtype
        layer = nn.Linear(self.in_features, self.out_features, self.bias is not None, self.weight.device, dtype)
        layer.weight.data.copy_(self.dequantize(dtype))
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach().to(dtype))
        return layer.requires_grad_(False)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Matmul4bit.apply(x.to(self.compute_dtype), self.weight, self.quant_state())  # (..., out)
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, double_quant={self.double_quant}, block_size={self.block_size}, "
                f"compute_dtype={self.compute_dtype}")
