"""Quantize a model's linear layers to 4 bits and prepare it for QLoRA training.

    model = quantize_model(model, QuantConfig(bnb_4bit_use_double_quant=True))
    model = prepare_model_for_kbit_training(model)          # freeze, upcast norms, input grads
    model = get_peft_model(model, LoraConfig(target_modules="all-linear"))
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.engine import targets
from peftkit.engine.layer import AdapterLayer
from peftkit.quant.config import QuantConfig
from peftkit.quant.linear4bit import Linear4bit

HALF = (torch.float16, torch.bfloat16)
UPCAST_MODES = ("norms", "all", "none")


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` / GPT-2 ``Conv1D`` but the skipped ones by a ``Linear4bit``, in place.

    Skipped: ``config.llm_int8_skip_modules`` (names or dotted suffixes), or by default the output
    head and classifier (as transformers does), which stay in full precision.
    """
    config = config or QuantConfig()
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("the model already holds adapters; quantize the base model first, then call get_peft_model")
    keys = _linear_keys(model, config)
    if not keys:
        raise ValueError(f"quantize_model found no linear layer to quantize in {type(model).__name__} "
                         f"(skipped: {sorted(_skipped(model, config))}). {targets.describe_modules(model)}")
    for key in keys:
        model.set_submodule(key, Linear4bit.from_linear(
            model.get_submodule(key), config.compute_dtype, config.bnb_4bit_quant_type,
            config.bnb_4bit_use_double_quant, config.block_size))
    return model


def _skipped(model: nn.Module, config: QuantConfig) -> set[str]:
    names = config.llm_int8_skip_modules
    if names is None:
        return targets.output_head_names(model)
    return {k for k, _ in model.named_modules() if k and targets.name_matches(k, names)}


def _linear_keys(model: nn.Module, config: QuantConfig) -> list[str]:
    skip = _skipped(model, config)
    return [k for k, m in model.named_modules()
            if targets.is_linear(m) and not any(k == s or k.startswith(s + ".") for s in skip)]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Linear4bit) for m in model.modules())


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``Linear4bit`` by an ``nn.Linear`` with its dequantized weight, in place."""
    for key, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            model.set_submodule(key, module.to_linear(dtype))
    return model


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                    upcast: str = "norms") -> nn.Module:
    """HF PEFT's preparation of a quantized model, in place: freeze every parameter, keep
    normalisation layers in float32, and with gradient checkpointing make the embeddings' output
    require grad (so reentrant checkpointing reaches the adapters) and turn checkpointing on.

    ``upcast``: "norms" (default) casts only half-precision normalisation layers (class name
    containing "Norm") to float32; "all" casts every half-precision parameter, as HF PEFT does,
    which also doubles the embeddings and the head; "none" casts nothing.
    """
    if upcast not in UPCAST_MODES:
        raise ValueError(f"upcast={upcast!r} is invalid: expected one of {UPCAST_MODES}")
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if upcast == "all" or (upcast == "norms" and "Norm" in type(module).__name__):
            for param in module.parameters(recurse=upcast == "norms"):
                if param.dtype in HALF:
                    param.data = param.data.float()
    if use_gradient_checkpointing:
        _enable_checkpointing(model, dict(gradient_checkpointing_kwargs or {}))
    return model


def _enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                         "pass use_gradient_checkpointing=False")
    enable(gradient_checkpointing_kwargs=kwargs)
