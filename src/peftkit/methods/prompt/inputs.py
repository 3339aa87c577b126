"""Where the soft prompt enters: the forward's keyword arguments and ``generate``'s first step.

``prepare_inputs`` rewrites one forward call (input ids -> ``[P ; E[x]]`` embeddings plus the
extended mask, labels and token types; see ``layer.py``). ``generating`` makes ``generate`` do the
same once: while the KV cache is empty the prompt is prepended; afterwards the cache holds it and
only the mask needs its ``p`` leading ones.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from peftkit.methods.prompt.layer import PromptEmbedding


def prompt_layer(adapter_model: Any, name: str) -> PromptEmbedding:
    return next(layer for _, layer in adapter_model.adapter_layers()
                if isinstance(layer, PromptEmbedding) and name in layer.adapter_names())


def prepare_inputs(adapter_model: Any, name: str, kwargs: dict) -> dict:
    """Forward kwargs with adapter ``name``'s prompt prepended (unchanged while disabled)."""
    layer = prompt_layer(adapter_model, name)
    if layer.disabled:
        return kwargs
    check_not_mixed(layer, name)
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if ids is None:
            raise ValueError("prompt tuning needs input_ids or inputs_embeds; neither was given")
        embeds = layer.base_layer(ids)  # (batch, n, d)
    n = embeds.shape[1]
    prompt = layer.prompt(name, embeds.shape[0]).to(embeds.dtype)  # (batch, p, d)
    kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (batch, p + n, d)
    return extend_extras(kwargs, prompt.shape[1], n)


def check_not_mixed(layer: PromptEmbedding, name: str) -> None:
    if layer.batch_adapter_names is not None:
        raise ValueError(f"adapter {name!r} is a prompt-tuning adapter, which cannot take part in a mixed "
                         "batch (adapter_names): its rows would be longer than the others; run it on its own")


def extend_extras(kwargs: dict, p: int, n: int) -> dict:
    """Pad mask (ones), token-level labels (-100) and token types (zeros) by ``p`` in front."""
    pads = {"attention_mask": 1, "token_type_ids": 0, "labels": -100}
    for key, value in pads.items():
        tensor = kwargs.get(key)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and (key != "labels" or tensor.shape[1] == n):
            front = torch.full((tensor.shape[0], p), value, dtype=tensor.dtype, device=tensor.device)
            kwargs[key] = torch.cat([front, tensor], dim=1)  # (batch, p + n)
    if kwargs.get("position_ids") is not None:
        warnings.warn("position_ids are ignored with prompt tuning (the model numbers the p + n positions "
                      "itself), as in HF PEFT")
        kwargs["position_ids"] = None
    return kwargs


@contextmanager
def generating(adapter_model: Any, name: str) -> Iterator[None]:
    """Patch the base model's ``prepare_inputs_for_generation`` for one ``generate`` call."""
    model, layer = adapter_model.model, prompt_layer(adapter_model, name)
    if layer.disabled:
        yield
        return
    check_not_mixed(layer, name)
    original = model.prepare_inputs_for_generation
    patched = "prepare_inputs_for_generation" in vars(model)  # an instance attribute already there

    def prepare(*args: Any, **kwargs: Any) -> dict:  # named **kwargs: transformers checks the signature
        return generation_step(original(*args, **kwargs), layer, name)

    model.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if patched:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation  # back to the class's method


def generation_step(inputs: dict, layer: PromptEmbedding, name: str) -> dict:
    """One step's model inputs: mask always widened by p; the prompt prepended while the cache is empty."""
    if inputs.get("input_ids") is None:
        raise ValueError("generate with prompt tuning needs input_ids (not inputs_embeds); pass the token ids")
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        p = layer.prompt_encoder[name].num_embeddings
        front = torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device)
        inputs["attention_mask"] = torch.cat([front, mask], dim=1)  # (batch, p + cached + new)
    cache = inputs.get("past_key_values")
    if cache is None or cache.get_seq_length() == 0:  # prefill: the prompt goes in once
        embeds = layer.base_layer(inputs.pop("input_ids"))  # (batch, n, d)
        prompt = layer.prompt(name, embeds.shape[0]).to(embeds.dtype)  # (batch, p, d)
        inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (batch, p + n, d)
    inputs.pop("cache_position", None)  # the model recounts positions from the cache
    inputs.pop("position_ids", None)  # as in forward: positions are the model's own (HF drops them too)
    return inputs
