"""Model skeletons without weights: what the params and memory estimates are computed on.

A model is named by a local folder (``config.json`` + weights, only the config is read), a
``config.json`` file, one of the bundled models (``minilm``, ``smollm2``; ``None`` is the bundled
model for the task), or a published architecture in ``NAMED_SHAPES`` (e.g. ``llama-3-8b``). The
model is built on PyTorch's ``meta`` device: every parameter has its shape and dtype but no storage,
so an 8B or 70B model costs nothing to build.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Published architecture dimensions (from the models' config.json files); nothing is downloaded.
NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
BUNDLED = ("minilm", "smollm2")
TASKS = ("classification", "causal-lm")
ENCODERS = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "deberta", "deberta-v2")


@dataclass(frozen=True)
class ModelSource:
    """Where a skeleton comes from: a transformers config and the task head to put on it."""

    name: str  # what the user called it
    config: Any  # a transformers PretrainedConfig
    task: str  # "classification" (sequence-classification head) or "causal-lm"
    num_labels: int = 2  # classes of the classification head


def known_names() -> list[str]:
    return [*BUNDLED, *NAMED_SHAPES]


def load_config(model: str | None, task: str) -> Any:
    """The transformers config for ``model`` (see the module docstring for what it may be)."""
    from transformers import AutoConfig, LlamaConfig

    from peftkit.data import assets

    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; use one of {', '.join(TASKS)}")
    if model is None:
        model = "minilm" if task == "classification" else "smollm2"
    if model in NAMED_SHAPES:
        return LlamaConfig(max_position_embeddings=8192, **NAMED_SHAPES[model])
    if model in BUNDLED:
        return AutoConfig.from_pretrained(assets.minilm_dir() if model == "minilm" else assets.smollm2_dir())
    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        return AutoConfig.from_pretrained(path.parent) if path.name == "config.json" else _config_file(path)
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    raise ValueError(f"model {model!r} is neither a folder holding config.json, a config .json file, nor a known "
                     f"name; use a path or one of: {', '.join(known_names())}")


def _config_file(path: Path) -> Any:
    import json

    from transformers import AutoConfig

    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise ValueError(f"{str(path)!r} has no 'model_type' key, so it is not a transformers config; "
                         "pass a config.json written by save_pretrained")
    return AutoConfig.for_model(**data)


def infer_task(model: str | None) -> str:
    """The task a model is built for: its architectures say; encoders default to classification."""
    if model is None or model in NAMED_SHAPES or model == "smollm2":
        return "causal-lm" if model else "classification"
    if model == "minilm":
        return "classification"
    config = load_config(model, "causal-lm")
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ForSequenceClassification" in archs or (not archs and config.model_type in ENCODERS):
        return "classification"
    return "causal-lm" if "ForCausalLM" in archs or not archs else "classification"


def source(model: str | None, task: str, num_labels: int | None = None) -> ModelSource:
    """``num_labels`` None: the classes of the config's own classification head, else 2."""
    config = load_config(model, task)
    if num_labels is None:
        has_head = any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])
        num_labels = config.num_labels if has_head else 2
    return ModelSource(model or ("minilm" if task == "classification" else "smollm2"), config, task, num_labels)


def build_meta(src: ModelSource) -> torch.nn.Module:
    """The model with its task head, every parameter on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftkit.cli.common import quiet_transformers

    quiet_transformers()
    with torch.device("meta"):
        if src.task == "classification":
            config = src.config.__class__.from_dict({**src.config.to_dict(), "num_labels": src.num_labels})
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(src.config)
