"""Diff pruning layers (Guo et al., 2021, "Parameter-Efficient Transfer Learning with Diff
Pruning"): a task-specific diff added to a frozen weight, made sparse.

    W' = W + delta,    delta = z * w        (elementwise; w and z have W's shape and layout)

w trains; z is a hard-concrete gate per entry (Louizos et al., 2018) with a trainable logit
log(alpha), gamma < 0 < 1 < zeta, temperature beta:

    training:  u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log alpha) / beta)
    otherwise: s = sigmoid(log alpha)
    z = min(1, max(0, s (zeta - gamma) + gamma))

The relaxed L0 norm of delta, the expected number of nonzero gates, is
sum sigmoid(log alpha - beta log(-gamma / zeta)) (hooks.py adds it to the loss). w starts at 0 (no
change; N(0, 0.02^2) with ``init_diff_weights=False``), log alpha at ``init_log_alpha``.

Projection (hooks.py) keeps the largest |delta| over all targets and fixes the mask m: then
w <- delta * m, the gates are spent (log alpha is reset to its initial value and no longer used)
and delta = m * w, so only the kept entries train. Merging adds delta (computed without sampling)
to W in float32 with one rounding. Files: before projection ``diff_w`` and ``diff_log_alpha`` as
they are (the diff is dense then, and this is what training continues from); after it the sparse
diff, ``diff_indices`` (int64 positions in W flattened row-major) and ``diff_values``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.engine.layer import (AdapterLayer, additive_forward, additive_merge, additive_unmerge,
                                  linear_layout, sync_fan_in_fan_out)
from peftkit.methods.diff_pruning.config import DiffPruningConfig

INIT_STD = 0.02  # std of a non-identity initialisation (tests)
U_EPS = 1e-6  # keeps u away from 0 and 1, where log u / log(1 - u) are infinite


def hard_concrete(log_alpha: torch.Tensor, config: DiffPruningConfig, sample: bool) -> torch.Tensor:
    """The gate z of the module docstring: sampled when ``sample``, else its deterministic value."""
    if sample:
        u = torch.rand_like(log_alpha).clamp(U_EPS, 1 - U_EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / config.temperature)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (config.stretch_high - config.stretch_low) + config.stretch_low).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, config: DiffPruningConfig) -> torch.Tensor:
    """P(z != 0) summed: sum sigmoid(log alpha - beta log(-gamma / zeta))."""
    shift = config.temperature * math.log(-config.stretch_low / config.stretch_high)
    return torch.sigmoid(log_alpha - shift).sum()


class DiffPruningLinear(AdapterLayer):
    """A gated dense diff on the weight of ``nn.Linear`` or GPT-2's ``Conv1D`` (weight (in, out))."""

    file_tensors = ("diff_w", "diff_log_alpha", "diff_indices", "diff_values")  # dense, or sparse once projected

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out, self.in_features, self.out_features = linear_layout(base_layer)
        self.diff_w = nn.ParameterDict()
        self.diff_log_alpha = nn.ParameterDict()
        self.configs: dict[str, DiffPruningConfig] = {}
        self.mask: dict[str, torch.Tensor] = {}  # adapter -> bool, W's shape; set once projected
        self.last_merge_error = 0.0
        self.train(base_layer.training)  # gates sample only in training mode: follow the wrapped model

    # -- the contract ----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: DiffPruningConfig, key: str) -> None:
        sync_fan_in_fan_out(config, self, key)
        self.configs[name] = config
        weight = self.base_weight()
        w = torch.zeros(weight.shape, device=weight.device)
        if not config.init_diff_weights:
            nn.init.normal_(w, std=INIT_STD)
        self.diff_w[name] = nn.Parameter(w)
        self.diff_log_alpha[name] = nn.Parameter(torch.full(weight.shape, float(config.init_log_alpha), device=weight.device))

    def delete_adapter(self, name: str) -> None:
        del self.diff_w[name]
        del self.diff_log_alpha[name]
        self.configs.pop(name)
        self.mask.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_names(self) -> list[str]:
        return list(self.diff_w.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"diff_w": self.diff_w[name], "diff_log_alpha": self.diff_log_alpha[name]}

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Dense w and log alpha before projection; the sparse diff (indices, values) after it."""
        if name not in self.mask:
            return self.adapter_tensors(name)
        indices = self.mask[name].flatten().nonzero().squeeze(1)  # (nnz,) int64
        return {"diff_indices": indices, "diff_values": self.diff_w[name].detach().flatten()[indices]}

    def from_saved(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of ``saved_tensors``; a sparse file also fixes this layer's mask to its
        indices (loading discards the adapter if the file then turns out not to fit)."""
        if "diff_indices" not in tensors:
            self.mask.pop(name, None)
            return tensors
        shape = self.diff_w[name].shape
        values = tensors.get("diff_values")
        check_sparse(tensors["diff_indices"], values, self.diff_w[name].numel())
        at = tensors["diff_indices"].long().to(self.diff_w[name].device)  # (nnz,)
        w = torch.zeros(shape.numel(), device=at.device)
        w[at] = values.to(w)
        mask = torch.zeros(shape.numel(), dtype=torch.bool, device=at.device)
        mask[at] = True
        self.mask[name] = mask.view(shape)
        return {"diff_w": w.view(shape), "diff_log_alpha": torch.full(shape, float(self.configs[name].init_log_alpha))}

    # -- the diff ----------------------------------------------------------------------------------
    def gate(self, name: str) -> torch.Tensor:
        """z (sampled in training mode), or the fixed mask once projected; W's shape."""
        if name in self.mask:
            return self.mask[name].to(self.diff_w[name].dtype)
        return hard_concrete(self.diff_log_alpha[name], self.configs[name], sample=self.training)

    def diff(self, name: str) -> torch.Tensor:
        """delta = z * w in W's layout (differentiable)."""
        return self.gate(name) * self.diff_w[name]

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self.unmerged_active()
        if self.disabled or self.batch_adapter_names is not None or not names or self.fan_in_fan_out:
            return additive_forward(self, x, *args, **kwargs)
        base = self.base_layer  # nn.Linear: one matmul with W + sum of deltas (float32 sum, one rounding)
        weight = (base.weight.float() + sum(self.diff(n).float() for n in names)).to(base.weight.dtype)
        return F.linear(x, weight, base.bias)

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """delta applied to x: x delta^T for a linear layer, x delta for Conv1D's (in, out) layout."""
        diff = self.diff(name).to(x.dtype)
        return x @ diff if self.fan_in_fan_out else F.linear(x, diff)

    # -- merging -----------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """delta with the deterministic gate (no sampling), float32, W's layout."""
        with torch.no_grad():
            if name in self.mask:
                return (self.mask[name] * self.diff_w[name]).float()
            return (hard_concrete(self.diff_log_alpha[name], self.configs[name], sample=False) * self.diff_w[name]).float()

    def merge(self, names: list[str], safe: bool = False) -> float:
        return additive_merge(self, names, safe)

    def unmerge(self) -> None:
        additive_unmerge(self)

    # -- projection --------------------------------------------------------------------------------
    def fix_mask(self, name: str, mask: torch.Tensor) -> None:
        """Keep delta where ``mask`` is True: w <- delta * mask, gates spent (log alpha reset)."""
        with torch.no_grad():
            kept = self.delta_weight(name) * mask
            self.diff_w[name].copy_(kept)
            self.diff_log_alpha[name].fill_(float(self.configs[name].init_log_alpha))
        self.mask[name] = mask.to(self.diff_w[name].device)


def check_sparse(indices: torch.Tensor, values: torch.Tensor | None, numel: int) -> None:
    """A sparse diff read from a file fits a weight of ``numel`` entries, or raise naming the problem."""
    problem = None
    if values is None:
        problem = "diff_values is missing beside diff_indices"
    elif indices.dtype.is_floating_point or indices.dim() != 1 or values.dim() != 1 or len(indices) != len(values):
        problem = (f"diff_indices ({indices.dtype}, shape {tuple(indices.shape)}) and diff_values (shape "
                   f"{tuple(values.shape)}) must be 1-D of equal length, the indices integers")
    elif len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        problem = f"diff_indices reach outside the weight's {numel} entries"
    elif len(indices.unique()) != len(indices):
        problem = "diff_indices repeat an entry"
    if problem:
        raise ValueError(f"the sparse diff in the file does not fit this layer: {problem}; "
                         "load it onto the base model it was trained on, or save the adapter again")
