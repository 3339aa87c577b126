"""``AutoPeftModel*``: load a saved adapter together with its base model, from local folders only.

``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` reads ``adapter_config.json``, loads the
base from its ``base_model_name_or_path`` with the matching transformers Auto class (never from the
network: the path must be a local folder), and loads the adapter onto it, as in HF PEFT. The
``task_type`` in the config must fit the class (``AutoPeftModel`` itself takes adapters without
one). When the adapter folder holds a tokenizer with more tokens than the base's input embeddings,
the embeddings are resized to it first, as HF does (the adapter then carries the resized tables).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.config import TaskType, read_config_file
from peftkit.peft_model import TASK_CLASSES, PeftModel

TOKENIZER_CONFIG = "tokenizer_config.json"
# PeftModel.from_pretrained's own options; every other keyword goes to the base model's from_pretrained.
ADAPTER_OPTIONS = ("config", "autocast_adapter_dtype", "strict")
DEFAULT_IMPORT_ALLOWLIST = ("transformers",)


class _AutoPeftBase:
    """Shared loader; subclasses name the transformers Auto class and the task type they expect."""

    auto_class: str | None = None  # transformers Auto class for the base (None: from the folders)
    task_type: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is not built directly: call "
                        f"{type(self).__name__}.from_pretrained(adapter_dir)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, import_allowlist: list[str] | None = None,
                        **kwargs: Any) -> PeftModel:
        """Base model from the config's base_model_name_or_path, then the adapter on it.

        Keywords other than ``config``, ``autocast_adapter_dtype`` and ``strict`` (e.g. ``dtype``,
        ``torch_dtype``, ``num_labels``) go to the base model's ``from_pretrained``.
        """
        adapter_dir = Path(pretrained_model_name_or_path)
        raw = read_config_file(adapter_dir)
        task_type = cls._check_task(raw.get("task_type"))
        base_dir = base_folder(raw.get("base_model_name_or_path"), adapter_dir)
        options = {k: kwargs.pop(k) for k in ADAPTER_OPTIONS if k in kwargs}
        base_class = cls._base_class(raw, base_dir, import_allowlist)
        base = load_base(base_class, base_dir, kwargs)
        resize_to_tokenizer(base, adapter_dir)
        wrapper = TASK_CLASSES.get(task_type, PeftModel)
        return wrapper.from_pretrained(base, str(adapter_dir), adapter_name=adapter_name,
                                       is_trainable=is_trainable, **options)

    @classmethod
    def _check_task(cls, task_type: str | None) -> str | None:
        """The config's task type, refused when it does not fit this class."""
        if cls.task_type is None and task_type is not None:
            raise ValueError(f"the adapter has task_type={task_type!r}: load it with {class_for_task(task_type)}"
                             ".from_pretrained (AutoPeftModel is for adapters without a task type)")
        if cls.task_type is not None and task_type not in (None, cls.task_type):
            raise ValueError(f"the adapter has task_type={task_type!r}, but {cls.__name__} loads "
                             f"{cls.task_type} adapters: use {class_for_task(task_type)}.from_pretrained")
        return task_type

    @classmethod
    def _base_class(cls, raw: dict, base_dir: Path, allowlist: list[str] | None) -> Any:
        """The class that loads the base: this class's Auto class, else the config's ``auto_mapping``
        (HF writes it for adapters without a task type), else the base folder's architecture."""
        import transformers

        if cls.auto_class is not None:
            return getattr(transformers, cls.auto_class)
        mapping = raw.get("auto_mapping") or {}
        if mapping.get("base_model_class"):
            return mapped_class(mapping, allowlist)
        architectures = read_json(base_dir / "config.json").get("architectures") or []
        if architectures and hasattr(transformers, architectures[0]):
            return getattr(transformers, architectures[0])
        raise ValueError(f"cannot tell which class loads the base model in {base_dir}: the adapter config has no "
                         "task_type or auto_mapping and the base's config.json names no transformers architecture; "
                         "load the base yourself and call PeftModel.from_pretrained(base, adapter_dir)")


def load_base(base_class: Any, base_dir: Path, kwargs: dict[str, Any]) -> nn.Module:
    """``base_class.from_pretrained``, or for a 4-bit bitsandbytes checkpoint peftkit's own loader
    (transformers would need bitsandbytes), which takes ``dtype`` only."""
    from peftkit.quant.checkpoint import bnb_quantization_config, load_quantized_model

    if bnb_quantization_config(base_dir) is None:
        return base_class.from_pretrained(str(base_dir), **{"local_files_only": True, **kwargs})
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    kwargs.pop("local_files_only", None)
    if kwargs:
        raise ValueError(f"the base {base_dir} is a 4-bit bitsandbytes checkpoint, loaded by "
                         f"peftkit.quant.load_quantized_model, which takes dtype only; drop {sorted(kwargs)}")
    return load_quantized_model(base_dir, None if dtype in (None, "auto") else dtype, base_class)


def base_folder(path: str | None, adapter_dir: Path) -> Path:
    """The base model's local folder, or a clear error (peftkit never downloads models)."""
    fix = ("save the base model locally with save_pretrained and set base_model_name_or_path in "
           f"{adapter_dir / 'adapter_config.json'} to that folder, or load the base yourself and call "
           "PeftModel.from_pretrained(base_model, adapter_dir)")
    if not path:
        raise ValueError(f"adapter_config.json in {adapter_dir} has no base_model_name_or_path, so the base model "
                         f"is unknown; {fix}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"base_model_name_or_path={path!r} in {adapter_dir / 'adapter_config.json'} is not a local "
                         f"folder, and peftkit never downloads models; {fix}")
    return folder


def mapped_class(mapping: dict, allowlist: list[str] | None) -> Any:
    """HF's ``auto_mapping`` {base_model_class, parent_library}, importing only allowed libraries."""
    library = mapping.get("parent_library") or "transformers"
    allowed = list(allowlist or DEFAULT_IMPORT_ALLOWLIST)
    if not any(library == a or library.startswith(a + ".") for a in allowed):
        raise ValueError(f"the adapter's auto_mapping asks to import {library!r}, which is not in the import "
                         f"allowlist {allowed}; if that library is safe, pass import_allowlist=[{library!r}]")
    return getattr(importlib.import_module(library), mapping["base_model_class"])


def resize_to_tokenizer(base: nn.Module, adapter_dir: Path) -> None:
    """Grow the input embeddings to the adapter folder's tokenizer, if it holds one with more tokens
    (as HF PEFT does; a smaller tokenizer leaves the base alone)."""
    if not (adapter_dir / TOKENIZER_CONFIG).is_file() or not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), local_files_only=True)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def class_for_task(task_type: str) -> str:
    return next((c.__name__ for c in AUTO_CLASSES if c.task_type == task_type), "AutoPeftModel")


class AutoPeftModel(_AutoPeftBase):
    """Adapters without a task type; the base class comes from auto_mapping or the base's config."""


class AutoPeftModelForCausalLM(_AutoPeftBase):
    auto_class, task_type = "AutoModelForCausalLM", TaskType.CAUSAL_LM.value


class AutoPeftModelForSeq2SeqLM(_AutoPeftBase):
    auto_class, task_type = "AutoModelForSeq2SeqLM", TaskType.SEQ_2_SEQ_LM.value


class AutoPeftModelForSequenceClassification(_AutoPeftBase):
    auto_class, task_type = "AutoModelForSequenceClassification", TaskType.SEQ_CLS.value


class AutoPeftModelForTokenClassification(_AutoPeftBase):
    auto_class, task_type = "AutoModelForTokenClassification", TaskType.TOKEN_CLS.value


class AutoPeftModelForQuestionAnswering(_AutoPeftBase):
    auto_class, task_type = "AutoModelForQuestionAnswering", TaskType.QUESTION_ANS.value


class AutoPeftModelForFeatureExtraction(_AutoPeftBase):
    auto_class, task_type = "AutoModel", TaskType.FEATURE_EXTRACTION.value


AUTO_CLASSES = (AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification,
                AutoPeftModelForTokenClassification, AutoPeftModelForQuestionAnswering,
                AutoPeftModelForFeatureExtraction)
