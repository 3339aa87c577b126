"""A trained PiSSA / OLoRA adapter as a plain LoRA adapter for the original base weights.

HF PEFT's ``save_pretrained(dir, path_initial_model_for_weight_conversion=INIT)``, where INIT is the
adapter saved right after initialisation (factors A0, B0). The initialisation rewrote each base
weight to W_res = W - s B0 A0; after training the model is W_res + s B A. On the original W the same
model needs the update

    s (B A - B0 A0) = s [B | -B0] [A ; A0],    lora_A = [A ; A0] (2r, in),  lora_B = [B | -B0] (out, 2r)

a LoRA adapter of rank 2r whose scaling must stay s: r and lora_alpha double (alpha / r unchanged),
or with rsLoRA alpha grows by sqrt(2) (alpha / sqrt(r) unchanged); rank_pattern and alpha_pattern
entries change the same way. (HF PEFT doubles alpha_pattern entries under rsLoRA too, so it refuses
rsLoRA with patterns; here they are scaled by sqrt(2), which keeps every layer's scaling.) The saved
config says ``init_lora_weights=True``, so loading it rewrites nothing. Tensors besides the factors
(``modules_to_save`` copies, trained biases) are written unchanged; HF PEFT drops them.
The folder INIT is only read (HF PEFT also rewrites its config to ``init_lora_weights=True``).
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from peftkit.io import hf_format
from peftkit.methods.lora.config import PISSA_NITER, LoraConfig
from peftkit.registry import method_for_config


def convertible(mode: Any) -> bool:
    """PiSSA and OLoRA adapters (and plain ones, whose B0 = 0 makes the conversion a no-op)."""
    return mode is True or mode in ("pissa", "olora") or (isinstance(mode, str) and bool(PISSA_NITER.match(mode)))


def convert_to_lora(adapter_model: Any, name: str, state: dict[str, torch.Tensor], config: LoraConfig,
                    initial: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """(file tensors, config) of adapter ``name`` as a rank-2r LoRA adapter on the original base."""
    mode = config.init_lora_weights
    if not convertible(mode):
        raise ValueError(f"path_initial_model_for_weight_conversion converts PiSSA and OLoRA adapters, but adapter "
                         f"{name!r} has init_lora_weights={mode!r}"
                         + (" (LoftQ's base is its quantization, not a residual: keep the adapter with the "
                            "rewritten base instead)" if mode == "loftq" else "") + "; save it without that argument")
    first = initial_tensors(initial)
    converted = dict(state)
    for a_key, b_key in factor_keys(adapter_model, name):
        a0, b0 = (initial_factor(first, key, state[key], initial) for key in (a_key, b_key))
        converted[a_key] = torch.cat([state[a_key], a0], dim=0)  # (2r, in)
        converted[b_key] = torch.cat([state[b_key], -b0], dim=1)  # (out, 2r)
    return converted, doubled(config)


def factor_keys(adapter_model: Any, name: str) -> list[tuple[str, str]]:
    """File keys (lora_A, lora_B) of every linear LoRA layer holding adapter ``name``."""
    from peftkit.methods.lora.layer import LoraLinear

    prefix = method_for_config(adapter_model.peft_config[name]).file_prefix
    return [(f"{prefix}{key}.lora_A.weight", f"{prefix}{key}.lora_B.weight")
            for key, layer in adapter_model.adapter_layers()
            if isinstance(layer, LoraLinear) and name in layer.adapter_names()]


def initial_tensors(initial: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return hf_format.read_weights(initial)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"path_initial_model_for_weight_conversion={str(initial)!r}: {err} (save the adapter "
                                "right after get_peft_model, before training, and pass that folder)") from None


def initial_factor(first: dict[str, torch.Tensor], key: str, now: torch.Tensor, initial: Any) -> torch.Tensor:
    """The initial adapter's tensor ``key``, checked against the trained one."""
    if key not in first:
        raise ValueError(f"the initial adapter in {initial} has no tensor {key}: pass the folder saved from this "
                         "same adapter right after initialisation")
    if first[key].shape != now.shape:
        raise ValueError(f"the initial adapter in {initial} has {key} of shape {tuple(first[key].shape)}, the trained "
                         f"adapter {tuple(now.shape)}: pass the folder saved from this same adapter before training")
    return first[key].to(now.dtype)


def doubled(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r adapter: every layer's scaling as before, no initialisation to redo."""
    grow = math.sqrt(2) if config.use_rslora else 2
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= grow
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: grow * v for k, v in config.alpha_pattern.items()}
    return config
