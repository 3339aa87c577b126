"""Prefix init from real words (Li & Liang, 2021, sec. 7.2): instead of N(0, 1) noise, the prefix
starts as the keys and values the frozen model itself computes for a text at positions 0..p-1:

    (Pk_l, Pv_l) = (K_l, V_l) of base(text_ids)          for every layer l, text_ids (p,)

Since the prefix takes positions 0..p-1 and the real tokens are numbered from p, at step 0 the model
reads every input exactly as if the text preceded it (``tests/methods/prefix``), so training starts
from the base model's loss on a sensible context instead of from a model disturbed by random keys.
"""
from __future__ import annotations

from typing import Any

import torch

from peftkit.methods.prefix.inputs import prefix_layer
from peftkit.methods.prompt.layer import repeat_to, text_ids


def init_from_text(adapter_model: Any, name: str) -> None:
    """The ``after_inject`` hook: apply ``prefix_init_text`` when the config sets one."""
    config = adapter_model.peft_config[name]
    if config.prefix_init_text is None or config.inference_mode:
        return
    model = adapter_model.model
    tokenizer = config.tokenizer_name_or_path or getattr(model, "name_or_path", None)
    if not tokenizer:
        raise ValueError("prefix_init_text needs a tokenizer: set tokenizer_name_or_path (the model has no "
                         "name_or_path to take it from)")
    ids = text_ids(config.prefix_init_text, tokenizer)
    init_from_ids(adapter_model, name, repeat_to(ids, config.num_virtual_tokens, model.device))


@torch.no_grad()
def init_from_ids(adapter_model: Any, name: str, ids: torch.Tensor) -> None:
    """Set adapter ``name``'s prefix to the base model's keys and values for ``ids`` (p,)."""
    config, encoder = adapter_model.peft_config[name], prefix_layer(adapter_model, name).prompt_encoder[name]
    if encoder.projected or ids.shape != (config.num_virtual_tokens,):
        raise ValueError(f"init_from_ids needs a prefix without prefix_projection and {config.num_virtual_tokens} "
                         f"token ids; got prefix_projection={encoder.projected} and ids of shape {tuple(ids.shape)}")
    with adapter_model.disable_adapter():
        cache = getattr(adapter_model.model(input_ids=ids[None], use_cache=True), "past_key_values", None)
    if cache is None or len(cache.layers) < config.num_layers:
        raise ValueError(f"{type(adapter_model.model).__name__} returned no key/value cache for the init text; "
                         "prefix_init_text works with decoder models (use the default init for encoders)")
    kv = torch.stack([t for layer in cache.layers[:config.num_layers] for t in (layer.keys, layer.values)])  # (2L, 1, H, p, hd)
    table = kv.permute(1, 3, 0, 2, 4).reshape(config.num_virtual_tokens, -1)  # (p, L*2*H*hd), fill_cache's layout
    encoder.embedding.weight.copy_(table.to(encoder.embedding.weight.dtype))
