"""Trainable-parameter counts for a model and a method config, without training or weights.

The adapter is injected by the engine itself (``get_peft_model``) into a skeleton on the meta
device, so any registered method is counted exactly as ``print_trainable_parameters()`` would
report it on the real model, and a method added later needs no code here. Counts follow HF PEFT:
a parameter shared by two modules (tied embeddings) counts once; ``modules_to_save`` copies count.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from peftkit.engine.layer import AdapterLayer, ModulesToSave


@dataclass
class ParamCount:
    """What one method adds to one model."""

    method: str
    trainable: int  # what print_trainable_parameters() calls "trainable params"
    total: int  # "all params": the base plus the adapter
    base: int  # the base model alone
    by_module: dict[str, int] = field(default_factory=dict)  # trainable per module name ("q_proj": n)
    by_layer_type: dict[str, int] = field(default_factory=dict)  # trainable per wrapper class
    adapted_modules: int = 0  # modules that hold an adapter layer
    mergeable: bool = True  # every adapter layer can fold into the base weights

    @property
    def percent_of_base(self) -> float:
        return 100.0 * self.trainable / max(self.base, 1)

    def to_dict(self) -> dict:
        return {"method": self.method, "trainable": self.trainable, "total": self.total, "base": self.base,
                "percent_of_base": round(self.percent_of_base, 6), "adapted_modules": self.adapted_modules,
                "mergeable": self.mergeable, "by_module": self.by_module, "by_layer_type": self.by_layer_type}


def base_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def wrap_on_meta(model: nn.Module, config) -> nn.Module:
    """``get_peft_model`` with the new adapter tensors created on the meta device too."""
    from peftkit import get_peft_model

    with torch.device("meta"):
        return get_peft_model(model, config)


def count(model: nn.Module, config, method: str | None = None) -> tuple[ParamCount, nn.Module]:
    """Count ``config``'s adapter on ``model`` (consumed: it is wrapped); also return the wrapped model.
    ``method`` names the row (a preset such as ptuning_v2 saves as, and is found as, its base method)."""
    from peftkit.registry import method_for_config

    base = base_count(model)
    peft_model = wrap_on_meta(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    result = ParamCount(method or method_for_config(config).name, trainable, total, base)
    _breakdown(peft_model, result)
    return result, peft_model


def _breakdown(peft_model: nn.Module, result: ParamCount) -> None:
    by_module, by_type = Counter(), Counter()
    owner = _trainable_owners(peft_model)
    for key, param in peft_model.named_parameters():
        if param.requires_grad:
            module, kind = owner.get(key, (key.rsplit(".", 2)[-2] if "." in key else key, "base parameter"))
            by_module[module] += param.numel()
            by_type[kind] += param.numel()
    layers = [m for m in peft_model.modules() if isinstance(m, AdapterLayer) and not isinstance(m, ModulesToSave)]
    result.by_module, result.by_layer_type = dict(by_module), dict(by_type)
    result.adapted_modules = len(layers)
    result.mergeable = all(layer.can_merge for layer in layers)


def _trainable_owners(peft_model: nn.Module) -> dict[str, tuple[str, str]]:
    """parameter key -> (short module name, wrapper class), for the tensors of adapter layers."""
    owners: dict[str, tuple[str, str]] = {}
    for key, module in peft_model.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        short = key.rsplit(".", 1)[-1]
        for pkey, _ in module.named_parameters(prefix=key):
            if ".base_layer." not in pkey[len(key):] + ".":
                owners.setdefault(pkey, (short, type(module).__name__))
    return owners
