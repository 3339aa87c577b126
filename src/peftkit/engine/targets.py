"""Which modules of a model an adapter wraps.

A config selects modules by ``target_modules`` (a list of name suffixes, a regex string matched
against the full name, or ``"all-linear"``), minus ``exclude_modules``, optionally restricted to
``layers_to_transform`` (indices found after ``layers_pattern`` in the name). The rules follow HF
PEFT so that configs written for it select the same modules here.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable

from torch import nn

ALL_LINEAR = "all-linear"
# Heads trained in full (modules_to_save) or producing outputs; "all-linear" never adapts them.
# As in HF PEFT, hidden layers such as BERT's pooler or MLM transform are not heads.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


# Default LoRA targets by ``config.model_type`` when a config leaves target_modules unset: the
# attention query and value projections, as in the LoRA paper and HF PEFT's defaults.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                     "gemma2", "gemma3_text", "opt", "bart", "mbart", "gptj", "phi", "stablelm", "starcoder2",
                     "olmo", "olmo2", "granite", "cohere", "whisper", "m2m_100", "marian", "pegasus"],
                    ["q_proj", "v_proj"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert", "layoutlm", "ernie"],
                    ["query", "value"]),
    **dict.fromkeys(["t5", "mt5", "umt5"], ["q", "v"]),
    **dict.fromkeys(["gpt_neox", "falcon", "bloom"], ["query_key_value"]),
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"], "deberta-v2": ["query_proj", "value_proj"], "mpt": ["Wqkv"],
    "phi3": ["qkv_proj"], "chatglm": ["query_key_value"], "codegen": ["qkv_proj"],
}


def default_targets(model: nn.Module) -> list[str]:
    """The usual targets for this architecture; raise naming what to set when there are none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"target_modules is not set and peftkit has no default for model type "
                         f"{model_type!r}: set target_modules (a list of names, a regex or 'all-linear'). "
                         f"{describe_modules(model)}")
    return list(DEFAULT_TARGETS[model_type])


def fill_default_targets(config: Any, model: nn.Module) -> None:
    """``prepare_config`` for methods that use the table above (LoRA, DoRA)."""
    if config.target_modules is None:
        config.target_modules = default_targets(model)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2 style Conv1D (a linear layer with its weight stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_quantized_linear(module: nn.Module) -> bool:
    """A 4-bit ``peftkit.quant.Linear4bit``: "all-linear" selects it; a method adapts it only if it
    registers a rule for it (LoRA does), others refuse it by name."""
    from peftkit.quant.linear4bit import Linear4bit

    return isinstance(module, Linear4bit)


def name_matches(key: str, targets: str | Iterable[str] | None) -> bool:
    """A regex string must match the whole name; a list entry matches the name or a dotted suffix."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    """The block index in a name such as ``model.layers.3.mlp``, or None outside numbered blocks."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [r"[^.]+"])
    for pattern in patterns:
        found = re.match(rf"(?:.*\.)?{pattern}\.(\d+)\.", key)
        if found:
            return int(found.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the model's outputs (LM head, classifier)."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is head or name.split(".")[-1] in HEAD_NAMES:
            names.add(name)
    return names


def is_target(config: Any, key: str, module: nn.Module, heads: set[str]) -> bool:
    """Does ``config`` select module ``key``?"""
    targets = config.target_modules
    if targets == ALL_LINEAR or targets == [ALL_LINEAR]:
        hit = (is_linear(module) or is_quantized_linear(module)) and key not in heads and not any(key.startswith(h + ".") for h in heads)
    else:
        hit = name_matches(key, targets)
    if not hit or name_matches(key, config.exclude_modules):
        return False
    layers = config.layers_to_transform
    if layers is not None:
        wanted = [layers] if isinstance(layers, int) else layers
        return layer_index(key, config.layers_pattern) in wanted
    return True


def find_targets(model: nn.Module, config: Any, skip: Iterable[str] = ()) -> list[str]:
    """Names of the modules ``config`` selects; raise, listing what exists, when there are none.

    An existing adapter wrapper is judged by the module it wraps; its own modules (factors) and its
    base layer itself are never targets. Modules inside a wrapped block's base layer are the model's
    own and can be (UniPELT's LoRA on the q/v of an attention that its prefix gate wraps).
    """
    from peftkit.engine.layer import AdapterLayer

    heads = output_head_names(model)
    inner, wrapped = tuple(skip), set()
    found = []
    for key, module in model.named_modules():
        if not key or _inside(key, inner) or key in wrapped:
            continue
        if isinstance(module, AdapterLayer):
            inner += tuple(f"{key}.{child}." for child, _ in module.named_children() if child != "base_layer")
            wrapped.add(f"{key}.base_layer")
            module = module.base_layer
        if is_target(config, key, module, heads):
            found.append(key)
    if not found:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of "
                         f"{type(model).__name__}. {describe_modules(model)}")
    return found


def _inside(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p.rstrip(".") + ".") for p in prefixes)


def unmatched_entries(config: Any, found: list[str]) -> list[str]:
    """List entries of target_modules that selected nothing (likely typos)."""
    targets = config.target_modules
    if not isinstance(targets, (list, tuple, set)) or targets == [ALL_LINEAR]:
        return []
    return [t for t in targets if not any(k == t or k.endswith("." + t) for k in found)]


def describe_modules(model: nn.Module, limit: int = 40) -> str:
    """Summarise the leaf-module names and types that exist, for error messages."""
    kinds: Counter[tuple[str, str]] = Counter()
    for key, module in model.named_modules():
        if key and not list(module.children()):
            kinds[(key.split(".")[-1], type(module).__name__)] += 1
    items = [f"{name} ({kind} x{count})" for (name, kind), count in sorted(kinds.items())]
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return "Module names that exist (name suffix, type, count): " + ", ".join(items[:limit]) + more


def pattern_value(patterns: dict[str, Any] | None, key: str, default: Any) -> Any:
    """Per-module override from ``rank_pattern``/``alpha_pattern``: a regex matched on a name suffix."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", key):
            return value
    return default
