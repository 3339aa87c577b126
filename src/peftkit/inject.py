"""``inject_adapter_in_model``: adapter layers put into a plain model in place, without a PeftModel.

As HF PEFT's function of the same name: the model's target modules are replaced by adapter layers
(state dict keys ``...q_proj.base_layer.weight``, ``...q_proj.lora_A.default.weight``), the
adapter is active and trainable, the base frozen, and the model itself is returned. There is no
wrapper to switch, merge or save with afterwards; use ``get_peft_model`` for those.

Methods that act at the input (prompt tuning, prefix tuning, P-tuning, and composites with such a
part) need the wrapper's forward to rewrite the inputs, and AdapterFusion needs adapters already in
place, so they are refused here, as HF refuses prompt learning.
"""
from __future__ import annotations

from torch import nn

from peftkit.config import PeftConfig
from peftkit.engine.model import AdapterModel
from peftkit.registry import method_for_config


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            autocast_adapter_dtype: bool = True) -> nn.Module:
    """Inject adapter ``adapter_name`` of ``peft_config`` into ``model`` in place; return ``model``."""
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
    check_injectable(peft_config, model)
    return AdapterModel(model, peft_config, adapter_name, autocast_adapter_dtype).model


def check_injectable(config: PeftConfig, model: nn.Module) -> None:
    """Refuse methods that cannot work as bare layers (input-level ones, fusions of existing adapters)."""
    spec = method_for_config(config)
    parts = [spec] if spec.parts is None else [part for part, _ in spec.parts(config, model)]
    at_input = [part.name for part in parts if part.prepare_inputs is not None]
    if at_input:
        raise ValueError(f"inject_adapter_in_model cannot add a {spec.name} adapter: {', '.join(at_input)} acts on "
                         "the model's inputs (prompt learning), which needs the PeftModel wrapper; "
                         "use get_peft_model(model, config) instead")
    if spec.composes:
        raise ValueError(f"inject_adapter_in_model cannot add a {spec.name} adapter: it combines adapters the model "
                         "already holds; use get_peft_model and PeftModel.add_fusion instead")
