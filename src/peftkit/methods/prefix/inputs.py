"""Where the prefix enters: a key/value cache filled with it, for forward and for ``generate``.

transformers 5.x models take ``past_key_values`` as a ``Cache``; a ``DynamicCache`` whose layer
``l`` already holds ``(Pk_l, Pv_l)`` (batch, H, p, hd) makes every attention layer attend over the
prefix first, and the model numbers the real tokens from ``p`` (the cache's length) on. The mask
gets ``p`` leading ones; given ``position_ids`` are shifted by ``p`` (as HF PEFT does). A cache
that is already filled (one an earlier call returned, or ``generate``'s after its first step)
holds the prefix, so then only the mask and positions change.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from transformers import Cache, DynamicCache

from peftkit.methods.prefix.layer import PrefixEmbedding
from peftkit.methods.prompt.inputs import check_not_mixed, pad_front, patched_generation


def prefix_layer(adapter_model: Any, name: str) -> PrefixEmbedding:
    return next(layer for _, layer in adapter_model.adapter_layers()
                if isinstance(layer, PrefixEmbedding) and name in layer.adapter_names())


def prepare_inputs(adapter_model: Any, name: str, kwargs: dict) -> dict:
    """Forward kwargs with adapter ``name``'s prefix in the cache (unchanged while disabled)."""
    layer = prefix_layer(adapter_model, name)
    if layer.disabled:
        return kwargs
    check_not_mixed(layer, name)
    check_no_checkpointing(adapter_model.model)
    return with_prefix(dict(kwargs), adapter_model, layer, name)


def with_prefix(inputs: dict, adapter_model: Any, layer: PrefixEmbedding, name: str) -> dict:
    """Fill an absent or empty cache with the prefix; widen the mask; shift given positions."""
    p, cache = layer.virtual_tokens(name), inputs.get("past_key_values")
    if cache is not None and not isinstance(cache, Cache):
        raise ValueError(f"prefix tuning needs past_key_values to be a transformers Cache (or None), got "
                         f"{type(cache).__name__}; pass the cache object an earlier call returned")
    if cache is None or cache.get_seq_length() == 0:
        inputs["past_key_values"] = fill_cache(cache, adapter_model, layer, name, batch_size(inputs))
    mask = inputs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("prefix tuning widens a 2D attention_mask (batch, n) by the prefix; got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}: pass the 2D padding mask")
        inputs["attention_mask"] = pad_front(mask, p, 1)  # (batch, p + cached + n)
    if inputs.get("position_ids") is not None:
        inputs["position_ids"] = inputs["position_ids"] + p  # the prefix holds positions 0..p-1
    return inputs


def batch_size(inputs: dict) -> int:
    first = inputs.get("input_ids")
    first = inputs.get("inputs_embeds") if first is None else first
    if first is None:
        raise ValueError("prefix tuning needs input_ids or inputs_embeds; neither was given")
    return first.shape[0]


def fill_cache(cache: Cache | None, adapter_model: Any, layer: PrefixEmbedding, name: str, batch: int) -> Cache:
    """``cache`` (or a new DynamicCache) with layer l holding (Pk_l, Pv_l), each (batch, H, p, hd)."""
    config, model = adapter_model.peft_config[name], adapter_model.model
    heads, L = config.num_attention_heads, config.num_layers
    flat = layer.prefix(name).to(model_dtype(model))  # (1, p, L*2*d)
    p = flat.shape[1]
    kv = flat.repeat(batch, 1, 1).view(batch, p, 2 * L, heads, config.token_dim // heads)  # (b, p, 2L, H, hd)
    kv = kv.permute(2, 0, 3, 1, 4)  # (2L, b, H, p, hd): rows 2l and 2l+1 are layer l's keys and values
    cache = DynamicCache(config=model.config) if cache is None else cache
    for index in range(L):
        cache.update(kv[2 * index], kv[2 * index + 1], index)
    return cache


def model_dtype(model: Any) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def check_no_checkpointing(model: Any) -> None:
    """transformers drops ``past_key_values`` inside checkpointed layers while training, which would
    silently train without the prefix; refuse instead (HF PEFT refuses too)."""
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("prefix tuning does not work with gradient checkpointing: transformers drops the "
                         "prefix (past_key_values) inside checkpointed layers; call "
                         "gradient_checkpointing_disable(), or use P-tuning or prompt tuning")


@contextmanager
def generating(adapter_model: Any, name: str) -> Iterator[None]:
    """Patch the base model's ``prepare_inputs_for_generation`` for one ``generate`` call."""
    layer = prefix_layer(adapter_model, name)
    if layer.disabled:
        yield
        return
    check_not_mixed(layer, name)
    with patched_generation(adapter_model.model, lambda inputs: generation_step(inputs, adapter_model, layer, name)):
        yield


def generation_step(inputs: dict, adapter_model: Any, layer: PrefixEmbedding, name: str) -> dict:
    """One step's model inputs. Without use_cache, generate feeds the whole sequence each step but
    still hands back the cache the last step returned; that one is dropped for a fresh prefix."""
    if inputs.get("use_cache") is False:
        inputs["past_key_values"] = None
    return with_prefix(inputs, adapter_model, layer, name)
