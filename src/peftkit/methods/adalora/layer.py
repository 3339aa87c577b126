"""AdaLoRA layers (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning").

    h = W0 x + b + s * B diag(E) A dropout(x),    s = lora_alpha / (init_r + 1e-5)

W0 (out x in) and b stay frozen. A (r x in, "right singular vectors"), E (r x 1, "singular
values") and B (out x r, "left singular vectors") train; row i of A, E[i] and column i of B form
triplet i. Initialisation (HF PEFT's): E = 0 and A, B ~ N(0, 0.02^2), so a fresh adapter changes
nothing; with ``init_lora_weights=False`` all three are N(0, 1). The rank allocator
(allocator.py) prunes a triplet by setting its E entry to 0; the scale keeps ``init_r`` (HF's
``ranknum``), so pruning never rescales the kept triplets. A saved adapter holds only the kept
triplets (``rank_pattern`` in the config says which, one entry per initial triplet, also when a
reloaded pruned adapter is pruned again, as HF PEFT's loader needs), and reloads with those ranks.
One trainable AdaLoRA adapter per model (as HF PEFT); others may be added in inference mode.

Merging adds s * B diag(E) A to W0, transposed where the base stores its weight as (in, out)
(GPT-2's Conv1D, ``fan_in_fan_out``). File keys are HF PEFT's: ``lora_A``, ``lora_E``, ``lora_B``
(plain parameters, no ``.weight``); ``ranknum`` is not saved (HF does not save it either).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.engine.layer import (AdapterLayer, additive_forward, additive_merge, additive_unmerge,
                                  linear_layout, sync_fan_in_fan_out)
from peftkit.methods.adalora.config import AdaLoraConfig

FACTORS = ("lora_A", "lora_E", "lora_B")


class AdaLoraLinear(AdapterLayer):
    """AdaLoRA around ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored (in, out))."""

    file_tensors = FACTORS

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out, self.in_features, self.out_features = linear_layout(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        # Rank-allocator state, never saved: which triplets the last allocation kept (bool, (r,)),
        # and per factor the EMAs of sensitivity and uncertainty (see allocator.py).
        self.kept: dict[str, torch.Tensor] = {}
        self.importance: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        # Row i of A, E, B is triplet slots[i] of the initial ones (a pruned adapter trained on keeps
        # fewer rows); initial is how many there were. They turn masks into rank_pattern entries.
        self.slots: dict[str, list[int]] = {}
        self.initial: dict[str, int] = {}
        self.configs: dict[str, AdaLoraConfig] = {}
        self.last_merge_error = 0.0

    # -- the contract ----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: AdaLoraConfig, key: str) -> None:
        sync_fan_in_fan_out(config, self, key)
        r = self.r[name] = config.rank_for(key)
        pattern = (config.rank_pattern or {}).get(f"{key}.lora_E")
        self.initial[name] = config.init_r if pattern is None else len(pattern)
        self.slots[name] = list(range(r)) if pattern is None else [i for i, kept in enumerate(pattern) if kept]
        self.configs[name] = config
        self.scaling[name] = config.scaling
        p = config.lora_dropout
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        device = self.base_weight().device
        shapes = {"lora_A": (r, self.in_features), "lora_E": (r, 1), "lora_B": (self.out_features, r)}
        for factor, shape in shapes.items():
            getattr(self, factor)[name] = nn.Parameter(torch.randn(shape, device=device))
        if config.init_lora_weights:
            nn.init.zeros_(self.lora_E[name])
            nn.init.normal_(self.lora_A[name], std=0.02)
            nn.init.normal_(self.lora_B[name], std=0.02)

    def delete_adapter(self, name: str) -> None:
        for factor in FACTORS:
            del getattr(self, factor)[name]
        del self.lora_dropout[name]
        for table in (self.r, self.scaling, self.kept, self.importance, self.slots, self.initial, self.configs):
            table.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {factor: getattr(self, factor)[name] for factor in FACTORS}

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Only the triplets the rank allocator kept: A (k, in), E (k, 1), B (out, k)."""
        tensors = self.adapter_tensors(name)
        keep = self.kept.get(name)
        if keep is None or bool(keep.all()):
            return tensors
        keep = keep.to(tensors["lora_A"].device)
        return {"lora_A": tensors["lora_A"][keep], "lora_E": tensors["lora_E"][keep],
                "lora_B": tensors["lora_B"][:, keep]}

    def pattern_entry(self, name: str, keep: torch.Tensor) -> list[bool]:
        """``keep`` over this layer's rows (r,) as a rank_pattern entry over the initial triplets,
        so that a pattern always has one entry per initial triplet (HF PEFT indexes init_r rows with it)."""
        entry = [False] * self.initial[name]
        for slot, kept in zip(self.slots[name], keep.tolist()):
            entry[slot] = bool(kept)
        return entry

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return additive_forward(self, x, *args, **kwargs)

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s * B diag(E) A dropout(x), with the small factors cast to the activations' dtype."""
        h = self.lora_dropout[name](x)
        ae = (self.lora_A[name] * self.lora_E[name]).to(h.dtype)  # (r, in): row i scaled by E[i]
        return F.linear(F.linear(h, ae), self.lora_B[name].to(h.dtype)) * self.scaling[name]

    # -- merging -----------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B diag(E) A in float32 and the base weight's layout."""
        a, e, b = (getattr(self, f)[name].float() for f in FACTORS)
        delta = (b @ (a * e)) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, names: list[str], safe: bool = False) -> float:
        """Fold each named adapter into the base weight; return the largest rounding error."""
        return additive_merge(self, names, safe)

    def unmerge(self) -> None:
        additive_unmerge(self)
