"""Where the soft prompt enters: the forward's keyword arguments and ``generate``'s first step.

``prepare_inputs`` rewrites one forward call (input ids -> ``[P ; E[x]]`` embeddings plus the
extended mask, labels and token types; see ``layer.py``). ``generating`` makes ``generate`` do the
same once: while the KV cache is empty the prompt is prepended; afterwards the cache holds it and
only the mask needs its ``p`` leading ones.

Shared by every method that prepends virtual tokens at the input (prompt tuning, P-tuning): the
layer holding adapter ``name`` only needs ``prompt(name, batch)`` -> (batch, p, d),
``virtual_tokens(name)`` -> p, and ``base_layer`` (the word embeddings). ``pad_front`` and
``patched_generation`` also serve prefix tuning, which widens the mask and patches ``generate``.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from peftkit.engine.layer import AdapterLayer


def prompt_layer(adapter_model: Any, name: str) -> AdapterLayer:
    """The input-level layer that holds adapter ``name`` (the one with a ``prompt`` to prepend)."""
    return next(layer for _, layer in adapter_model.adapter_layers()
                if hasattr(layer, "prompt") and name in layer.adapter_names())


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


def check_not_mixed(layer: AdapterLayer, name: str) -> None:
    if layer.batch_adapter_names is not None:
        raise ValueError(f"adapter {name!r} acts at the input (prompt tuning, P-tuning, prefix tuning), so it "
                         "cannot take part in a mixed batch (adapter_names): its rows would see virtual tokens "
                         "the others do not; run it on its own")


def pad_front(tensor: torch.Tensor, p: int, value: int) -> torch.Tensor:
    """(batch, n) -> (batch, p + n) with ``value`` in the ``p`` new leading columns."""
    front = torch.full((tensor.shape[0], p), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([front, tensor], dim=1)


def extend_extras(kwargs: dict, p: int, n: int) -> dict:
    """Pad mask (ones), token-level labels (-100) and token types (zeros) by ``p`` in front."""
    pads = {"attention_mask": 1, "token_type_ids": 0, "labels": -100}
    for key, value in pads.items():
        tensor = kwargs.get(key)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and (key != "labels" or tensor.shape[1] == n):
            kwargs[key] = pad_front(tensor, p, value)  # (batch, p + n)
    if kwargs.get("position_ids") is not None:
        warnings.warn("position_ids are ignored with prompt tuning (the model numbers the p + n positions "
                      "itself), as in HF PEFT")
        kwargs["position_ids"] = None
    return kwargs


@contextmanager
def generating(adapter_model: Any, name: str) -> Iterator[None]:
    """Patch the base model's ``prepare_inputs_for_generation`` for one ``generate`` call."""
    layer = prompt_layer(adapter_model, name)
    if layer.disabled:
        yield
        return
    check_not_mixed(layer, name)
    with patched_generation(adapter_model.model, lambda inputs: generation_step(inputs, layer, name)):
        yield


@contextmanager
def patched_generation(model: Any, step: Callable[[dict], dict]) -> Iterator[None]:
    """Run ``step`` over the inputs ``model.prepare_inputs_for_generation`` makes, inside the block."""
    original = model.prepare_inputs_for_generation
    patched = "prepare_inputs_for_generation" in vars(model)  # an instance attribute already there

    def prepare(*args: Any, **kwargs: Any) -> dict:  # named **kwargs: transformers checks the signature
        return step(original(*args, **kwargs))

    model.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if patched:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation  # back to the class's method


def generation_step(inputs: dict, layer: AdapterLayer, name: str) -> dict:
    """One step's model inputs: mask always widened by p; the prompt prepended while the cache is empty."""
    if inputs.get("input_ids") is None:
        raise ValueError("generate with prompt tuning needs input_ids (not inputs_embeds); pass the token ids")
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        inputs["attention_mask"] = pad_front(mask, layer.virtual_tokens(name), 1)  # (batch, p + cached + new)
    cache = inputs.get("past_key_values")
    if cache is None or cache.get_seq_length() == 0:  # prefill: the prompt goes in once
        embeds = layer.base_layer(inputs.pop("input_ids"))  # (batch, n, d)
        prompt = layer.prompt(name, embeds.shape[0]).to(embeds.dtype)  # (batch, p, d)
        inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (batch, p + n, d)
    inputs.pop("cache_position", None)  # the model recounts positions from the cache
    inputs.pop("position_ids", None)  # as in forward: positions are the model's own (HF drops them too)
    return inputs
