"""Parallel bottleneck adapters beside a feed-forward block (He et al., 2022, "Towards a Unified View
of Parameter-Efficient Transfer Learning"; ``BottleneckConfig(placement="parallel")``).

The adapter reads the block's INPUT x (batch, n, d), not its output, and adds beside it:

    FFN'(x) = FFN(x) + s * (W_up act(W_down x + b_down) + b_up)

W_down (m x d), b_down, W_up (d x m), b_up train; the block stays frozen; s = ``scaling`` (the paper's
scaled parallel adapter uses s = 4), m = d // reduction_factor or ``bottleneck_size``. d is the
output width of the block's last linear layer (its output projection), which equals its input
width because a residual connection adds the two. Init as the sequential adapter: up = 0, so a
fresh adapter changes nothing. Nonlinear in x: cannot be merged.

Two block shapes are wrapped (targets per architecture in config.py):

- ``forward(x)`` returning FFN(x) (Llama's and GPT-2's ``mlp``): the output above, as it stands.
- ``forward(hidden_states, input_tensor)`` computing LN(dropout(dense(hidden_states)) + input_tensor)
  (BERT's ``BertOutput``, the second half of the FFN, which adds the residual and normalises
  inside). There the FFN input x is ``input_tensor``, and the layer passes input_tensor + s ad(x):
  LN(dense(h) + x + s ad(x)), which is FFN(x) + s ad(x) taken before the residual sum and the
  LayerNorm, as in the paper.

File keys are the sequential adapter's: ``<block>.adapter_down.weight`` / ``.bias`` and
``<block>.adapter_up.weight`` / ``.bias``.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from peftkit.engine.layer import BASE, AdapterLayer, linear_layout, rows_by_adapter
from peftkit.engine.targets import is_linear
from peftkit.methods.adapter.config import BottleneckConfig
from peftkit.methods.adapter.layer import bottleneck, bottleneck_tensors, make_bottleneck


def block_width(block: nn.Module) -> int:
    """d of a feed-forward block: the output width of its last linear layer."""
    linears = [m for m in block.modules() if is_linear(m)]
    if is_linear(block) or not linears:
        raise ValueError(f"placement='parallel' wraps a feed-forward BLOCK that holds linear layers (e.g. 'mlp', "
                         f"or BERT's 'layer.N.output'), got a {type(block).__name__}; target the block, not a "
                         "single layer, or use placement='pfeiffer' for an adapter on a linear's output")
    return linear_layout(linears[-1])[2]


class ParallelAdapterLayer(AdapterLayer):
    """Parallel bottleneck adapters around one feed-forward block (the math above)."""

    can_merge = False
    file_tensors = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.width = block_width(base_layer)
        # True: BERT-style block taking (hidden_states, input_tensor); the FFN input is input_tensor.
        self.residual_inside = "input_tensor" in inspect.signature(base_layer.forward).parameters
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}

    # -- the contract ----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: BottleneckConfig, key: str) -> None:
        m = config.bottleneck_for(self.width)
        self.adapter_down[name], self.adapter_up[name] = make_bottleneck(self.width, m, config.init_weights,
                                                                         self.base_weight().device)
        self.scaling[name] = float(config.scaling)
        self.non_linearity[name] = config.non_linearity

    def delete_adapter(self, name: str) -> None:
        del self.adapter_down[name], self.adapter_up[name]
        self.scaling.pop(name), self.non_linearity.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return bottleneck_tensors(self.adapter_down[name], self.adapter_up[name])

    def merge(self, names: list[str], safe: bool = False) -> float:
        raise ValueError("parallel adapters are nonlinear and cannot be merged into the base weights; "
                         "keep the adapter model, or use unload() to drop the adapters")

    # -- forward ---------------------------------------------------------------------------------
    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s * up(act(down(x))) in x's dtype; x (..., d) -> (..., d)."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        return bottleneck(x, down, up, self.non_linearity[name], self.scaling[name]).to(x.dtype)

    def added(self, x: torch.Tensor) -> torch.Tensor | None:
        """Sum of the active adapters' outputs for the block input x (per row in a mixed batch)."""
        if self.disabled:
            return None
        if self.batch_adapter_names is None:
            outputs = [self.adapter_output(x, name) for name in self.unmerged_active()]
            return sum(outputs) if outputs else None
        total = torch.zeros_like(x)
        for name, rows in rows_by_adapter(self.batch_adapter_names, x.shape[0]).items():
            if name != BASE and name in self.adapter_names():
                rows = rows.to(x.device)
                total = total.index_add(0, rows, self.adapter_output(x[rows], name))
        return total

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.residual_inside:
            out = self.base_layer(x, *args, **kwargs)
            delta = self.added(x)
            return out if delta is None else out + delta
        args, kwargs, ffn_input = self.split_input_tensor(args, kwargs)
        delta = self.added(ffn_input)
        return self.base_layer(x, ffn_input if delta is None else ffn_input + delta, *args, **kwargs)

    @staticmethod
    def split_input_tensor(args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor]:
        """(other args, other kwargs, input_tensor) of a BERT-style block's call."""
        if "input_tensor" in kwargs:
            kwargs = dict(kwargs)
            return args, kwargs, kwargs.pop("input_tensor")
        return args[1:], kwargs, args[0]
