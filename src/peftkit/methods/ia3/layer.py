"""(IA)^3 layers (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning").

    attention targets:     h = l * (W x + b)      l has out_features entries (bias scaled too)
    feed-forward targets:  h = W (l * x) + b      l has in_features entries

W and b stay frozen; only l trains. l = 1 at initialisation (no change); with
``init_ia3_weights=False`` l ~ N(0, 1). Several active adapters multiply their l. Merging
multiplies W's rows and b (output scaling) or W's columns (input scaling) by l; unmerging divides
them again, which needs every |l| >= MIN_UNMERGE. The semantics, the tensor shapes and the file
key ``ia3_l`` are HF PEFT's:

    nn.Linear, GPT-2 Conv1D:  l is (out, 1) for attention targets, (1, in) for feed-forward ones
    nn.Conv2d / nn.Conv3d:    l is (1, channels, 1, 1[, 1]) (output or input channels)
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from peftkit.engine.layer import (BASE, AdapterLayer, check_finite, linear_layout, route_forward,
                                  rows_by_adapter, sync_fan_in_fan_out)
from peftkit.methods.ia3.config import IA3Config

MIN_UNMERGE = 1e-6  # below this |l|, dividing a merged weight by l cannot give the base back


class IA3Layer(AdapterLayer):
    """Bookkeeping and forward shared by the (IA)^3 wrappers; subclasses give l's shape and layout."""

    file_tensors = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.last_merge_error = 0.0

    # -- the contract ----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: IA3Config, key: str) -> None:
        feedforward = self.is_feedforward[name] = config.is_feedforward(key)
        l = torch.ones(self.l_shape(feedforward), device=self.base_weight().device)
        if not config.init_ia3_weights:
            nn.init.normal_(l)
        self.ia3_l[name] = nn.Parameter(l)

    def delete_adapter(self, name: str) -> None:
        del self.ia3_l[name]
        del self.is_feedforward[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return route_forward(self, self.active_forward, self.mixed_forward, x, args, kwargs)

    def active_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self.unmerged_active()
        inputs = self.product([n for n in names if self.is_feedforward[n]])
        outputs = self.product([n for n in names if not self.is_feedforward[n]])
        if inputs is not None:
            x = (x.to(inputs.dtype) * self.on_activations(inputs)).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if outputs is not None:
            result = (result * self.on_activations(outputs)).to(result.dtype)
        return result

    def product(self, names: list[str]) -> torch.Tensor | None:
        """The combined scaling of several adapters, l_1 * l_2 * ... (None when there are none)."""
        if not names:
            return None
        scale = self.ia3_l[names[0]]
        for name in names[1:]:
            scale = scale * self.ia3_l[name]
        return scale

    def mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row uses its own adapter (or none): equal to running the rows one by one."""
        groups = [(n, rows.to(x.device)) for n, rows in rows_by_adapter(self.batch_adapter_names, x.shape[0]).items()
                  if n != BASE and n in self.ia3_l]
        scaled = x
        for name, rows in groups:
            if self.is_feedforward[name]:
                l = self.ia3_l[name]
                scaled = scaled.index_copy(0, rows, (x[rows].to(l.dtype) * self.on_activations(l)).to(x.dtype))
        result = self.base_layer(scaled, *args, **kwargs)
        out = result
        for name, rows in groups:
            if not self.is_feedforward[name]:
                part = (result[rows] * self.on_activations(self.ia3_l[name])).to(result.dtype)
                out = out.index_copy(0, rows, part)
        return out

    # -- merging -----------------------------------------------------------------------------------
    def merge(self, names: list[str], safe: bool = False) -> float:
        """Scale the base weight (and bias) by each named adapter's l; return the rounding error."""
        error = 0.0
        for name in names:
            if name in self.ia3_l and name not in self.merged_adapters:
                if self.ia3_l[name].detach().abs().min() < MIN_UNMERGE:
                    warnings.warn(f"adapter {name!r} has entries of l near 0: once merged it cannot be unmerged")
                error = max(error, self.rescale(name, safe, inverse=False))
                self.merged_adapters.append(name)
        self.last_merge_error = error
        return error

    def check_unmerge(self) -> None:
        """Refuse when some merged l is about 0: dividing by it cannot give the base weights back."""
        for name in self.merged_adapters:
            small = (self.ia3_l[name].detach().abs() < MIN_UNMERGE).sum().item()
            if small:
                raise ValueError(f"cannot unmerge adapter {name!r}: {small} entries of its l are below "
                                 f"{MIN_UNMERGE} in magnitude, so the base weights cannot be recovered by "
                                 "division; reload the base model instead (no weights were changed)")

    def unmerge(self) -> None:
        """Divide the merged scalings out again, last merged first; refuse if some l is about 0."""
        self.check_unmerge()
        while self.merged_adapters:
            self.rescale(self.merged_adapters.pop(), False, inverse=True)

    def rescale(self, name: str, safe: bool, inverse: bool) -> float:
        """W <- W * l (or W / l) in float32 with one rounding; the bias too for output scaling."""
        pairs = [(self.base_weight(), self.on_weight(name))]
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None and not self.is_feedforward[name]:
            pairs.append((bias, self.ia3_l[name].detach().float().flatten()))
        exact = [p.detach().float() / s if inverse else p.detach().float() * s for p, s in pairs]
        if safe:
            check_finite(name, *exact)
        error = 0.0
        for (param, _), value in zip(pairs, exact):
            rounded = value.to(param.dtype)
            param.data.copy_(rounded)
            error = max(error, (rounded.float() - value).abs().max().item() if value.numel() else 0.0)
        return error

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change merging makes to the base weight, W * l - W, in float32 and W's layout."""
        weight = self.base_weight().detach().float()
        return weight * self.on_weight(name) - weight

    # -- per layer type ----------------------------------------------------------------------------
    def l_shape(self, feedforward: bool) -> tuple[int, ...]:
        raise NotImplementedError

    def on_activations(self, l: torch.Tensor) -> torch.Tensor:
        """l shaped to broadcast against the layer's input or output activations."""
        raise NotImplementedError

    def on_weight(self, name: str) -> torch.Tensor:
        """l (float32) shaped to broadcast against the base weight: scales its rows or columns."""
        raise NotImplementedError


class IA3Linear(IA3Layer):
    """(IA)^3 around ``nn.Linear`` (weight (out, in)) or GPT-2's ``Conv1D`` (weight (in, out))."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out, self.in_features, self.out_features = linear_layout(base_layer)

    def add_adapter(self, name: str, config: IA3Config, key: str) -> None:
        sync_fan_in_fan_out(config, self, key)
        super().add_adapter(name, config, key)

    def l_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features) if feedforward else (self.out_features, 1)

    def on_activations(self, l: torch.Tensor) -> torch.Tensor:
        return l.flatten()  # (features,) against (..., features)

    def on_weight(self, name: str) -> torch.Tensor:
        l = self.ia3_l[name].detach().float()  # (out, 1) or (1, in)
        return l.T if self.fan_in_fan_out else l  # Conv1D weight is (in, out)


class IA3Conv(IA3Layer):
    """(IA)^3 around ``nn.Conv2d``/``nn.Conv3d`` (grouped convolutions included, as in HF PEFT)."""

    def l_shape(self, feedforward: bool) -> tuple[int, ...]:
        base = self.base_layer
        channels = base.in_channels if feedforward else base.out_channels
        return (1, channels) + (1,) * (base.weight.dim() - 2)

    def on_activations(self, l: torch.Tensor) -> torch.Tensor:
        return l  # (1, channels, 1, ...) against (batch, channels, *spatial)

    def on_weight(self, name: str) -> torch.Tensor:
        l = self.ia3_l[name].detach().float()  # (1, channels, 1, ...)
        if not self.is_feedforward[name]:
            return l.transpose(0, 1)  # (out, 1, 1, ...): scales each output channel's kernel
        base = self.base_layer
        per_group = base.in_channels // base.groups
        l = l.reshape(base.groups, per_group, *l.shape[2:])  # (groups, in/groups, 1, ...)
        return l.repeat_interleave(base.out_channels // base.groups, dim=0)  # (out, in/groups, 1, ...)
