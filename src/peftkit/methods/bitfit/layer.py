"""BitFit layers (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"): train only bias terms.

    h = f(x) + b_delta        f = the frozen base layer (its own bias b included, if it has one)

so the layer computes W x + (b + b_delta) (linear) or LayerNorm(x) * gamma + (beta + b_delta).
b_delta has one entry per output feature and starts at 0 (no change); with
``init_bitfit_weights=False`` it is N(0, 0.1^2). Everything of the base stays frozen. Written as a
delta rather than by unfreezing b, so several named BitFit adapters can coexist, be disabled,
switched and mixed per row like any other adapter. Several active adapters add their deltas.

Merging adds b_delta into the base bias in float32 with one rounding. A base layer without a bias
(Llama's linears, ``nn.LayerNorm(bias=False)``) gets a zero bias created first and removed again by
the last unmerge; a model from ``merge_and_unload`` keeps it, so its architecture config must allow
biases for a transformers reload to keep them (the merge warns). File key: ``bitfit_bias`` (out,).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from peftkit.engine.layer import AdapterLayer, additive_forward, additive_merge, additive_unmerge, linear_layout
from peftkit.methods.bitfit.config import BitFitConfig

INIT_STD = 0.1  # std of a non-identity initialisation (tests)


def out_features(base_layer: nn.Module) -> int:
    """Entries of the bias: output features of a linear layer, normalised size of a LayerNorm."""
    if isinstance(base_layer, nn.LayerNorm):
        shape = base_layer.normalized_shape
        if len(shape) != 1:
            raise ValueError(f"BitFit handles LayerNorm over one dimension, found normalized_shape={shape}; "
                             "exclude this module (exclude_modules)")
        return shape[0]
    return linear_layout(base_layer)[2]


class BitFitLayer(AdapterLayer):
    """A trainable bias delta around ``nn.Linear``, GPT-2's ``Conv1D`` or ``nn.LayerNorm``."""

    file_tensors = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.out_features = out_features(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.created_bias = False  # merge gave the base layer a bias it did not have
        self.last_merge_error = 0.0

    # -- the contract ----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: BitFitConfig, key: str) -> None:
        delta = torch.zeros(self.out_features, device=getattr(self.reference(), "device", None))
        if not config.init_bitfit_weights:
            nn.init.normal_(delta, std=INIT_STD)
        self.bitfit_bias[name] = nn.Parameter(delta)

    def delete_adapter(self, name: str) -> None:
        del self.bitfit_bias[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_names(self) -> list[str]:
        return list(self.bitfit_bias.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"bitfit_bias": self.bitfit_bias[name]}

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return additive_forward(self, x, *args, **kwargs)

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """b_delta broadcast to the output's shape (..., out) in the activations' dtype."""
        return self.bitfit_bias[name].to(x.dtype).expand(*x.shape[:-1], self.out_features)

    # -- merging -----------------------------------------------------------------------------------
    def reference(self) -> torch.Tensor:
        """A base tensor giving the device and dtype (LayerNorm may have no weight either)."""
        return next(self.base_layer.parameters(), None) if self.base_layer.bias is None else self.base_layer.bias

    def base_weight(self) -> torch.Tensor | None:
        """What merging changes: the base bias (None until a merge creates a missing one)."""
        return self.base_layer.bias

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.bitfit_bias[name].detach().float()

    def merge(self, names: list[str], safe: bool = False) -> float:
        """Add each named adapter's delta into the base bias, creating a zero bias if there is none."""
        if self.base_layer.bias is None and any(n in self.bitfit_bias for n in names):
            self.create_bias()
        return additive_merge(self, names, safe)

    def create_bias(self) -> None:
        ref = self.reference()
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else self.bitfit_bias[self.adapter_names()[0]].device
        self.base_layer.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device),
                                            requires_grad=False)
        self.created_bias = True
        warnings.warn(f"{type(self.base_layer).__name__} had no bias: BitFit merge created one; a model saved "
                      "after merge_and_unload keeps it only if its architecture config enables biases")

    def unmerge(self) -> None:
        """Subtract the merged deltas again; drop a bias that merging created."""
        additive_unmerge(self)
        if self.created_bias:
            self.base_layer.bias = None
            self.created_bias = False
