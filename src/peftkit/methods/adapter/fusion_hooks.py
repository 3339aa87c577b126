"""AdapterFusion's model-level hooks (registered in methods/adapter/__init__.py): where a fusion
goes, its optional W_V regulariser, and its temperature schedule. The math is in fusion.py."""
from __future__ import annotations

import torch
from torch import nn

from peftkit.methods.adapter.fusion import FusionAttention
from peftkit.methods.adapter.fusion_config import FusionConfig
from peftkit.methods.adapter.layer import BottleneckLayer


def find_targets(model: nn.Module, config: FusionConfig) -> list[str]:
    """The layers holding every member; raise, naming them, if a member is missing or elsewhere."""
    layers = {k: m for k, m in model.named_modules() if isinstance(m, BottleneckLayer)}
    held = {n: [k for k, layer in layers.items() if n in layer.adapter_down] for n in config.adapter_names}
    missing = [n for n, keys in held.items() if not keys]
    if missing:
        known = sorted({n for layer in layers.values() for n in layer.adapter_down})
        raise ValueError(f"cannot fuse {config.adapter_names}: {missing} are not bottleneck adapters of this "
                         f"model (it has {known or 'none'}); add or load them under these names first, "
                         "e.g. model.load_adapter(folder, name)")
    first = config.adapter_names[0]
    for other in config.adapter_names[1:]:
        if held[other] != held[first]:
            odd = sorted(set(held[first]) ^ set(held[other]))
            raise ValueError(f"cannot fuse {first!r} and {other!r}: they sit on different layers ({odd[0]!r} "
                             "holds only one of them); a fusion needs its adapters on the same layers, so "
                             "train them with the same placement, target_modules and layers_to_transform")
    return held[first]


def fusion_modules(adapter_model: nn.Module, name: str) -> list[FusionAttention]:
    return [layer.adapter_fusion[name] for _, layer in adapter_model.adapter_layers()
            if isinstance(layer, BottleneckLayer) and name in layer.adapter_fusion]


def value_regularization(adapter_model: nn.Module, name: str) -> torch.Tensor | None:
    """lambda * sum over the fusion's layers of ||W_V - I||_F^2 (None when lambda is 0)."""
    weight = adapter_model.peft_config[name].value_regularization
    if not weight:
        return None
    return weight * sum(f.value_distance() for f in fusion_modules(adapter_model, name))


def anneal(adapter_model: nn.Module, name: str, global_step: int) -> None:
    """Move the training-mode temperature along the schedule after each optimizer step."""
    set_state(adapter_model, name, {"train_temperature": adapter_model.peft_config[name].train_temperature(global_step)})


def get_state(adapter_model: nn.Module, name: str) -> dict:
    modules = fusion_modules(adapter_model, name)
    return {"train_temperature": modules[0].train_temperature} if modules else {}


def set_state(adapter_model: nn.Module, name: str, state: dict) -> None:
    for module in fusion_modules(adapter_model, name):
        module.train_temperature = float(state.get("train_temperature", module.train_temperature))
