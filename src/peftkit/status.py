"""What state a model's adapters are in: ``get_layer_status`` / ``get_model_status``, as in HF PEFT.

One record per adapter wrapper (LoRA layer, IA3 layer, a trained module copy, ...) and one summary
for the model. Each summary field holds a single value when every layer agrees and the string
``"irregular"`` when they do not (some layers disabled, or one adapter merged in some layers only),
which is the state these functions exist to catch: such a model does not compute what its
configuration says.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from torch import nn

from peftkit.engine.layer import AdapterLayer

Irregular = Literal["irregular"]
IRREGULAR: Irregular = "irregular"


@dataclass
class TunerLayerStatus:
    name: str  # module name in the base model, e.g. "model.layers.0.self_attn.q_proj"
    module_type: str  # "<method>.<layer class>", e.g. "lora.LoraLinear"
    enabled: bool  # False inside disable_adapter()
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]  # per adapter: do all its tensors here train?
    available_adapters: list[str]
    devices: dict[str, list[str]]  # per adapter: the device types its tensors are on
    quantization_backend: str | None  # "peftkit 4bit" over a Linear4bit base, else None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _agree(values: list) -> object:
    """The one value all entries share, else "irregular"."""
    first = values[0]
    return first if all(v == first for v in values[1:]) else IRREGULAR


def _adapter_model(model: nn.Module) -> nn.Module:
    """The engine model (AdapterModel) of a PeftModel; anything else is searched as it is."""
    return getattr(model, "base_model", model) if hasattr(model, "peft_config") else model


def _quantization_backend(layer: AdapterLayer) -> str | None:
    from peftkit.quant.linear4bit import Linear4bit

    return "peftkit 4bit" if isinstance(layer.base_layer, Linear4bit) else None


def layer_status(name: str, layer: AdapterLayer) -> TunerLayerStatus:
    tensors = {adapter: list(layer.adapter_tensors(adapter).values()) for adapter in layer.adapter_names()}
    return TunerLayerStatus(
        name=name,
        module_type=f"{type(layer).__module__.split('.')[-2]}.{type(layer).__name__}",
        enabled=not layer.disabled,
        active_adapters=list(layer.active_adapters),
        merged_adapters=list(layer.merged_adapters),
        requires_grad={a: _agree([t.requires_grad for t in ts]) for a, ts in tensors.items() if ts},
        available_adapters=sorted(layer.adapter_names()),
        devices={a: sorted({t.device.type for t in ts}) for a, ts in tensors.items()},
        quantization_backend=_quantization_backend(layer),
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One status per adapter wrapper of ``model`` (a PeftModel, or a model with injected adapters)."""
    # Names as HF PEFT gives them: from its tuner model, whose own `model` is the base ("model.model.layers...").
    found = [layer_status(name, module) for name, module in _adapter_model(model).named_modules()
             if isinstance(module, AdapterLayer)]
    if not found:
        raise ValueError("no adapter layers in this model: wrap it with get_peft_model or inject_adapter_in_model, "
                         "or load an adapter, first (input-level methods such as prompt tuning have no layers)")
    return found


def _merged(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """Adapters merged into the base: regular only if each is merged in every layer that holds it."""
    merged = sorted({a for s in layers for a in s.merged_adapters})
    for s in layers:
        if set(merged) & (set(s.available_adapters) - set(s.merged_adapters)):
            return IRREGULAR
    return merged


def _per_adapter(layers: list[TunerLayerStatus], field: str) -> dict[str, list]:
    values: dict[str, list] = defaultdict(list)
    for s in layers:
        for adapter, value in getattr(s, field).items():
            values[adapter].append(value)
    return values


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapters' state summed up over every adapter wrapper of ``model``."""
    layers = get_layer_status(model)
    engine = _adapter_model(model)
    configs = getattr(engine, "peft_config", {})
    base = engine.model if hasattr(engine, "peft_config") else model
    from peftkit.peft_model import PeftModel

    # PeftModel's count for any module (as HF does): packed 4-bit weights count as the values they hold
    trainable, total = PeftModel.get_nb_trainable_parameters(model)
    active = {tuple(s.active_adapters) for s in layers}
    return TunerModelStatus(
        base_model_type=type(base).__name__,
        adapter_model_type=type(engine).__name__ if configs else "None",
        peft_types={name: str(config.peft_type) for name, config in configs.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_agree([s.enabled for s in layers]),
        active_adapters=list(active.pop()) if len(active) == 1 else IRREGULAR,
        merged_adapters=_merged(layers),
        requires_grad={a: _agree(vs) for a, vs in _per_adapter(layers, "requires_grad").items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted({d for ds in vs for d in ds}) for a, vs in _per_adapter(layers, "devices").items()},
        quantization_backend=_agree([s.quantization_backend for s in layers]),
    )


__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]
