"""Bottleneck adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al., 2020, "AdapterFusion"; Rücklé et al., 2021, "AdapterDrop").

A small residual MLP on the output h = W x + b of a frozen linear layer (d = out_features):

    h' = h + s * (W_up act(W_down h + b_down) + b_up)

W_down (m x d), b_down (m), W_up (d x m), b_up (d) train; W and b stay frozen; s = ``scaling``,
m = d // reduction_factor (or ``bottleneck_size``). Initialisation: down is nn.Linear's default
(kaiming-uniform), up is zero, so a fresh adapter changes nothing; ``init_weights=False`` leaves up
random as well. Several active adapters each see the same h and their outputs add up:
h' = h + sum_i s_i up_i(act_i(down_i(h))).

AdapterDrop: an adapter whose block index is in ``adapter_drop`` (or below ``adapter_drop_lowest``)
is skipped in training mode, eval mode or both (``adapter_drop_mode``); its tensors still exist
and are saved, so one file serves every drop setting.

The adapter is nonlinear in h, so it cannot be folded into W: ``can_merge`` is False and the
engine refuses to merge it. File keys: ``<module>.adapter_down.weight`` / ``.bias`` and
``<module>.adapter_up.weight`` / ``.bias``.

The layer also holds AdapterFusions over its adapters (``adapter_fusion``, one ``FusionAttention``
per fusion name; the math is in methods/adapter/fusion.py): an active fusion adds the attention-
weighted sum of its members' outputs, and a member cannot be deleted while a fusion uses it. A member
active beside its fusion is not added again on its own: its output reaches h' only through the
fusion, and being active makes it train there (AdapterFusion with unfrozen adapters); an active
adapter outside the fusion adds its output as usual.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.engine.layer import BASE, AdapterLayer, linear_layout, route_forward, rows_by_adapter
from peftkit.engine.targets import layer_index
from peftkit.methods.adapter.config import BottleneckConfig
from peftkit.methods.adapter.fusion import FusionAttention
from peftkit.methods.adapter.fusion_config import FusionConfig

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def bottleneck(h: torch.Tensor, down: nn.Linear, up: nn.Linear, non_linearity: str, scaling: float) -> torch.Tensor:
    """s * up(act(down(h))) in the adapter's dtype; h (..., d) -> (..., d). Shared by the sequential
    layer here and the parallel one (parallel.py)."""
    return scaling * up(ACTIVATIONS[non_linearity](down(h.to(down.weight.dtype))))


def bottleneck_tensors(down: nn.Linear, up: nn.Linear) -> dict[str, torch.Tensor]:
    """An adapter's file tensors, relative to its layer (the sequential and the parallel form alike)."""
    return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
            "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}


def make_bottleneck(d: int, m: int, zero_up: bool, device: torch.device) -> tuple[nn.Linear, nn.Linear]:
    """(down: d -> m, up: m -> d) in float32; up zero when ``zero_up`` (a fresh adapter adds nothing)."""
    down = nn.Linear(d, m, device=device, dtype=torch.float32)
    up = nn.Linear(m, d, device=device, dtype=torch.float32)
    if zero_up:
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
    return down, up


class BottleneckLayer(AdapterLayer):
    """Bottleneck adapters on the output of ``nn.Linear`` or GPT-2's ``Conv1D``."""

    can_merge = False
    file_tensors = ("adapter_down", "adapter_up", "adapter_fusion")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        _, _, self.out_features = linear_layout(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}
        self.drop_mode: dict[str, str | None] = {}  # None: never dropped here
        self.adapter_fusion = nn.ModuleDict()  # fusion name -> FusionAttention over adapters of this layer

    # -- the contract ----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: BottleneckConfig | FusionConfig, key: str) -> None:
        if isinstance(config, FusionConfig):  # the fusion method's targets are layers holding every member
            self.adapter_fusion[name] = FusionAttention(self.out_features, config, self.base_weight().device)
            return
        d = self.out_features
        m = config.bottleneck_for(d)
        self.adapter_down[name], self.adapter_up[name] = make_bottleneck(d, m, config.init_weights, self.base_weight().device)
        self.scaling[name] = float(config.scaling)
        self.non_linearity[name] = config.non_linearity
        block = layer_index(key, config.layers_pattern)
        self.drop_mode[name] = config.adapter_drop_mode if block in config.dropped_blocks() else None

    def check_delete(self, name: str) -> None:
        users = [f for f, fusion in self.adapter_fusion.items() if name in fusion.members]
        if users:
            raise ValueError(f"adapter {name!r} is a member of fusion {users[0]!r}, which needs it; "
                             f"delete_adapter({users[0]!r}) first (nothing was changed)")

    def delete_adapter(self, name: str) -> None:
        self.check_delete(name)
        if name in self.adapter_fusion:
            del self.adapter_fusion[name]
        else:
            del self.adapter_down[name], self.adapter_up[name]
            for table in (self.scaling, self.non_linearity, self.drop_mode):
                table.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down.keys()) + list(self.adapter_fusion.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name in self.adapter_fusion:
            return {f"adapter_fusion.{k}": t for k, t in self.adapter_fusion[name].tensors().items()}
        return bottleneck_tensors(self.adapter_down[name], self.adapter_up[name])

    def merge(self, names: list[str], safe: bool = False) -> float:
        raise ValueError("bottleneck adapters are nonlinear and cannot be merged into the base weights; "
                         "keep the adapter model, or use unload() to drop the adapters")

    # -- forward -----------------------------------------------------------------------------------
    def skipped(self, name: str) -> bool:
        """AdapterDrop: is this adapter dropped in this layer in the current (train/eval) mode?"""
        mode = self.drop_mode[name]
        return mode == "both" or (mode == "train" and self.training) or (mode == "inference" and not self.training)

    def adapter_output(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """s * up(act(down(h))) in the adapter's dtype; h is (..., d), so is the result."""
        return bottleneck(h, self.adapter_down[name], self.adapter_up[name], self.non_linearity[name], self.scaling[name])

    def fused_output(self, h: torch.Tensor, name: str) -> torch.Tensor | None:
        """sum_i w_i v_i of fusion ``name`` over its members kept here (None if AdapterDrop skips all)."""
        fusion = self.adapter_fusion[name]
        kept = [m for m in fusion.members if not self.skipped(m)]
        if not kept:
            return None
        outputs = torch.stack([self.adapter_output(h, m) for m in kept], dim=-2)  # (..., N, d)
        return fusion(h, outputs)  # (..., d)

    def contribution(self, h: torch.Tensor, name: str) -> torch.Tensor | None:
        """What adapter or fusion ``name`` adds to h here, in h's dtype; None when it is skipped."""
        if name in self.adapter_fusion:
            out = self.fused_output(h, name)
        else:
            out = None if self.skipped(name) else self.adapter_output(h, name)
        return None if out is None else out.to(h.dtype)

    def plain_active(self) -> list[str]:
        """The active adapters and fusions whose outputs add up here: a member of an active fusion
        counts only through the fusion (active beside it, it trains inside it)."""
        active = self.unmerged_active()
        fused = {m for f in active if f in self.adapter_fusion for m in self.adapter_fusion[f].members}
        return [n for n in active if n not in fused]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return route_forward(self, self.active_forward, self.mixed_forward, x, args, kwargs)

    def active_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        result = h
        for name in self.plain_active():
            delta = self.contribution(h, name)
            if delta is not None:
                result = result + delta
        return result

    def mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row of h = base(x) (batch, ..., d) gets its own adapter or fusion (or none), as if run alone."""
        h = self.base_layer(x, *args, **kwargs)
        result = h
        for name, rows in rows_by_adapter(self.batch_adapter_names, h.shape[0]).items():
            if name == BASE or name not in self.adapter_names():
                continue
            rows = rows.to(h.device)
            delta = self.contribution(h[rows], name)
            if delta is not None:
                result = result.index_add(0, rows, delta)
        return result
