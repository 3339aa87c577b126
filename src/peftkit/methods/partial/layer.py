"""Partial fine-tuning layers: every parameter of a module trains, as a full-size delta.

    h = f(x; theta + sum_a delta_a)        f = the frozen base module, theta its own parameters

One delta per parameter of the module (``weight`` and ``bias`` of a linear layer or LayerNorm,
``weight`` of an RMSNorm), of the same shape; deltas start at 0 (no change), or N(0, 0.02^2) with
``init_partial_weights=False``; theta stays frozen. Kept as deltas over a frozen base (rather than
unfreezing theta) so that several named adapters, disabling, switching and mixed batches work as
for any adapter; the sum theta + delta is formed in float32 and rounded once to theta's dtype, so
the unmerged output equals the merged one. Merging adds each delta into its parameter (the trained
weights written back); unmerging subtracts it. File keys: ``partial_delta.<parameter name>``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from peftkit.engine.layer import BASE, AdapterLayer, merge_into, route_forward, rows_by_adapter
from peftkit.methods.partial.config import PartialConfig

INIT_STD = 0.02  # std of a non-identity initialisation (tests)


class PartialLayer(AdapterLayer):
    """Full-size trainable deltas for every parameter of one leaf module of a chosen block."""

    file_tensors = ("partial_delta",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.partial_delta = nn.ModuleDict()  # adapter -> ParameterDict(parameter name -> delta)
        self.last_merge_error = 0.0

    # -- the contract ----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: PartialConfig, key: str) -> None:
        deltas = nn.ParameterDict()
        for pname, param in self.base_layer.named_parameters(recurse=False):
            delta = torch.zeros(param.shape, device=param.device)
            if not config.init_partial_weights:
                nn.init.normal_(delta, std=INIT_STD)
            deltas[pname] = nn.Parameter(delta)
        self.partial_delta[name] = deltas

    def delete_adapter(self, name: str) -> None:
        del self.partial_delta[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_names(self) -> list[str]:
        return list(self.partial_delta.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"partial_delta.{pname}": delta for pname, delta in self.partial_delta[name].items()}

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return route_forward(self, self.active_forward, self.mixed_forward, x, args, kwargs)

    def active_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.unmerged_active(), x, *args, **kwargs)

    def run(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The base module called with theta + the named adapters' deltas in place of theta."""
        if not names:
            return self.base_layer(x, *args, **kwargs)
        params = {pname: self.shifted(pname, param, names) for pname, param in self.base_layer.named_parameters(recurse=False)}
        return functional_call(self.base_layer, params, (x, *args), kwargs)

    def shifted(self, pname: str, param: torch.Tensor, names: list[str]) -> torch.Tensor:
        """theta + sum of deltas, summed in float32 and rounded once to theta's dtype."""
        total = param.float()
        for name in names:
            total = total + self.partial_delta[name][pname].float()
        return total.to(param.dtype)

    def mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row uses its own adapter (or none): equal to running the rows one by one."""
        out = self.base_layer(x, *args, **kwargs)
        for name, rows in rows_by_adapter(self.batch_adapter_names, x.shape[0]).items():
            if name != BASE and name in self.partial_delta:
                rows = rows.to(x.device)
                out = out.index_copy(0, rows, self.run([name], x[rows], *args, **kwargs).to(out.dtype))
        return out

    # -- merging -----------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "weight", None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """Every delta of the adapter, flattened into one float32 vector (the engine's NaN check)."""
        return torch.cat([d.detach().float().flatten() for d in self.partial_delta[name].values()])

    def merge(self, names: list[str], safe: bool = False) -> float:
        """Add each named adapter's deltas into the base parameters; return the largest rounding error."""
        error = 0.0
        for name in names:
            if name in self.partial_delta and name not in self.merged_adapters:
                for pname, param in self.base_layer.named_parameters(recurse=False):
                    error = max(error, merge_into(param, self.partial_delta[name][pname].detach(), safe, name))
                self.merged_adapters.append(name)
        self.last_merge_error = error
        return error

    def unmerge(self) -> None:
        """Subtract the merged deltas again, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for pname, param in self.base_layer.named_parameters(recurse=False):
                merge_into(param, self.partial_delta[name][pname].detach(), False, name, sign=-1.0)
