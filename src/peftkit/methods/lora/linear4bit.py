"""LoRA on a 4-bit base (QLoRA, Dettmers et al., 2023).

    h = dequant(W_q) x + b + s * B A dropout(x),    s = lora_alpha / r

W_q is a frozen ``peftkit.quant.Linear4bit`` (NF4/FP4 codes, rebuilt in its compute dtype per
matmul); A and B are ordinary fp32 LoRA factors, initialised and saved exactly as for ``nn.Linear``,
so an adapter trained here is an ordinary LoRA file (HF PEFT loads it onto the full-precision model).

Merging cannot add B A to 4-bit codes exactly. ``merge`` rebuilds W = dequant(W_q) in float32,
adds s B A and quantizes the sum again:

    W_q' = quant(dequant(W_q) + s B A),    error = max |dequant(W_q') - (dequant(W_q) + s B A)|

The error (the added rounding, up to half a code step times each block's absmax) is returned and
reported like any merge error. ``unmerge`` puts back the codes saved at the first merge, bit for bit.
For an exact merged model, load the adapter onto the full-precision base and merge there.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from peftkit.engine.layer import check_finite
from peftkit.methods.lora.layer import LoraLinear
from peftkit.quant.linear4bit import Linear4bit


def layout_4bit(base_layer: Linear4bit) -> tuple[bool, int, int]:
    return False, base_layer.in_features, base_layer.out_features


class Lora4bitLinear(LoraLinear):
    """LoRA around ``Linear4bit``.

    Where the fused LoRA node serves plain ``nn.Linear`` (one active adapter, no dropout, not
    merged), it serves this layer too, with W rebuilt from its codes inside the node
    (``kernels.lora_linear``), as long as the activations come in the layer's compute dtype and
    autocast is off or casts to that dtype; otherwise the general path runs (``Linear4bit.forward``
    plus the low-rank term).
    """

    layout = staticmethod(layout_4bit)

    def __init__(self, base_layer: Linear4bit) -> None:
        super().__init__(base_layer)
        self.plain_linear = type(base_layer) is Linear4bit  # a subclass may compute otherwise: no fusion
        self.premerge: dict[str, torch.Tensor] | None = None  # codes before the first merge

    def fused_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, Any] | None:
        base, device = self.base_layer, self.base_layer.weight.device.type
        autocast_to = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        if dtype != base.compute_dtype or autocast_to != dtype:
            return None  # Linear4bit casts the input, or autocast picks another dtype: its own forward
        return base.weight, base.quant_state()

    def init_from_weight(self, name: str, config: Any, key: str) -> None:
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight, which the 4-bit "
                         f"{key!r} cannot take without quantizing it again: initialise on the full-precision model, "
                         "then unload() it, quantize that base (peftkit.quant.quantize_model) and load the adapter "
                         "saved with init_lora_weights=True onto it")

    def merge(self, names: list[str], safe: bool = False) -> float:
        todo = [n for n in names if n in self.adapter_names() and n not in self.merged_adapters]
        if not todo:
            return self.last_merge_error
        base = self.base_layer
        exact = base.dequantize(torch.float32) + sum(self.delta_weight(n) for n in todo)  # (out, in)
        if safe:
            check_finite(todo[0], exact)
        if self.premerge is None:
            self.premerge = base.quantized_tensors()
        base.requantize(exact)
        self.merged_adapters += todo
        self.last_merge_error = (base.dequantize(torch.float32) - exact).abs().max().item()
        warnings.warn("merging into a 4-bit weight quantizes W + s B A again; the added rounding is reported in "
                      "last_merge_error. Merge onto the full-precision base for an exact merged model")
        return self.last_merge_error

    def unmerge(self) -> None:
        if self.premerge is not None:
            self.base_layer.restore(self.premerge)
        self.premerge = None
        self.merged_adapters = []
