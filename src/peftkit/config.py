"""Configuration shared by every method: the task types, the base config, and its file format.

A method's config is a dataclass that subclasses :class:`PeftConfig`, documents each field once
(``metadata={"help": ...}``), and validates itself in ``__post_init__``. The same field names are
used in ``adapter_config.json`` (the Hugging Face PEFT format), YAML files and CLI flags.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import json
import numbers
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """What the wrapped model does; picks the PeftModel subclass (as in HF PEFT)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def check_field(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a ValueError naming the field, the value and what is allowed."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {allowed}")


def value_fits(hint: Any, value: Any) -> bool:
    """Whether ``value`` (read from JSON or YAML, or given in Python) has the type a field annotates.

    ``float`` accepts ints, ``int`` and ``float`` refuse bools (numpy's numbers are numbers too),
    lists accept tuples and sets; an annotation this function does not know accepts anything (the
    field's own check decides).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(value_fits(a, value) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint in (bool, str):
        return isinstance(value, hint)
    if hint in (int, float):
        return isinstance(value, numbers.Integral if hint is int else numbers.Real) and not isinstance(value, bool)
    if hint in (list, tuple, set) or origin in (list, tuple, set):
        return isinstance(value, (list, tuple, set)) and (not args or all(value_fits(args[0], v) for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict) and (len(args) < 2 or all(value_fits(args[1], v) for v in value.values()))
    return True


def type_name(hint: Any) -> str:
    """``int | None`` -> "int or None"; ``Literal["a", "b"]`` -> "'a' or 'b'"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) and not args else str(hint)


def check_types(cls: type, values: dict[str, Any]) -> None:
    """Raise a ValueError naming the first of ``values`` whose type its field of ``cls`` refuses."""
    hints = _type_hints(cls)
    helps = _field_helps(cls)
    for name, value in values.items():
        if name in hints and not value_fits(hints[name], value):
            help_text = helps.get(name)
            check_field(False, name, value, type_name(hints[name]) + (f" ({help_text})" if help_text else ""))


@functools.cache
def _field_helps(cls: type) -> dict[str, str]:
    """Each field's help text: a wrong type's error also says what the field means and takes."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolving the annotations is slow, and every config construction asks


# Fields that HF PEFT writes for features peftkit does not model. Left at their defaults they mean
# nothing and are dropped quietly; set to something else they are dropped with a warning.
FOREIGN_FIELDS = {
    "auto_mapping", "peft_version", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "layer_replication", "runtime_config", "lora_bias",
    "use_qalora", "qalora_group_size", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "arrow_config", "ensure_weight_tying", "kasa_config",
    "lora_ga_config", "monteclora_config", "use_bdlora", "velora_config", "peftkit_version",
}
FOREIGN_DEFAULTS = (None, False, {}, [], "megatron.core", 16)


@dataclass
class PeftConfig:
    """Fields every adapter config carries."""

    peft_type: str | None = field(default=None, metadata={"help": "Method identifier in the HF format, e.g. LORA."})
    task_type: str | None = field(default=None, metadata={"help": "SEQ_CLS, CAUSAL_LM, TOKEN_CLS, SEQ_2_SEQ_LM, QUESTION_ANS or FEATURE_EXTRACTION."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model the adapter was trained on."})
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})
    inference_mode: bool = field(default=False, metadata={"help": "Freeze the adapter (loaded for inference)."})

    def __post_init__(self) -> None:
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        # Built in Python, a wrongly typed field is named here, as one read from a file or YAML is,
        # not met later as a TypeError deep inside (LoraConfig(target_modules=5)).
        check_types(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init})
        self._plain_numbers()
        allowed = [t.value for t in TaskType]
        check_field(self.task_type is None or self.task_type in allowed, "task_type", self.task_type,
                    f"one of {allowed} or None")

    # -- dict / json ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build from a dict; keys from a newer version or another library warn instead of failing."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in FOREIGN_FIELDS:
                if not any(value == d and type(value) is type(d) for d in FOREIGN_DEFAULTS) and value is not None:
                    if key not in ("auto_mapping", "peft_version", "peftkit_version"):
                        warnings.warn(f"{cls.__name__}: field {key}={value!r} is not supported by peftkit and is ignored")
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {sorted(unknown)} "
                          "(written by a newer version or another library?)")
        return cls(**kwargs)  # __post_init__ names a field of the wrong type

    def _plain_numbers(self) -> None:
        """numpy (or other) integers and reals in number fields become Python int / float, so the
        config's own checks and its JSON file treat them as the numbers they are."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)):
                setattr(self, f.name, int(value) if isinstance(value, numbers.Integral) else float(value))

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        from peftkit.io.atomic import atomic_write_text

        data = self.to_dict()
        for key, value in data.items():
            if isinstance(value, set):
                data[key] = sorted(value)
        atomic_write_text(Path(save_directory) / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "PeftConfig":
        """Read ``adapter_config.json`` from a folder; on the base class, dispatch on ``peft_type``.

        A value the config refuses raises a ValueError that names the file and the field.
        """
        data = read_config_file(path)
        data.update(overrides)
        try:
            if cls is PeftConfig:
                from peftkit.registry import get_method_by_peft_type
                return get_method_by_peft_type(data.get("peft_type"), data).config_cls.from_dict(data)
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_file(path)}: {err}; correct that field or save the adapter again") from err

    def copy(self) -> "PeftConfig":
        return copy.deepcopy(self)


def config_file(path: str | os.PathLike) -> Path:
    """The config file of an adapter folder (``path`` itself when it names the config file)."""
    path = Path(path)
    return path if path.name == CONFIG_NAME and path.is_file() else path / CONFIG_NAME


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read an adapter config as a dict, with errors that say which file and what is wrong."""
    path = Path(path)
    file = config_file(path)
    if path.is_file() and file != path:
        raise NotADirectoryError(f"{path} is a file, not an adapter folder; pass the folder written by "
                                 f"save_pretrained (the one holding {CONFIG_NAME})")
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: pass the folder written by save_pretrained "
                                "(peftkit never downloads adapters; use a local folder)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the file is corrupt, re-save the adapter") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, found {type(data).__name__}")
    return data


@dataclass
class TargetingConfig(PeftConfig):
    """Target selection fields shared by every method that wraps layers."""

    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Module-name suffixes, a regex matched on full names, or 'all-linear'."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted (same syntax as target_modules)."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Only adapt blocks with these indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the block list used with layers_to_transform, e.g. 'layers' or 'h'."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a classifier head)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value) if isinstance(value, set) else list(value))
        check_field(self.layers_pattern is None or self.layers_to_transform is not None, "layers_pattern",
                    self.layers_pattern, "to be used together with layers_to_transform")


# Fields a composite config sets for all its parts (a part's options may not set them).
SHARED_PART_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                      "modules_to_save")


@dataclass
class CompositeConfig(PeftConfig):
    """Base of composite methods' configs (MAM, UniPELT; ``MethodSpec.parts``): one adapter made of
    several methods' parts. Each part's options are a dict field named after the part, holding that
    part's config fields (e.g. ``prefix_tuning={"num_virtual_tokens": 30}``), merged over the method's
    defaults on construction and checked by building the part's config, so a wrong option fails
    here, naming the part. ``adapter_config.json`` holds the merged dicts; ``task_type``,
    ``inference_mode`` and ``modules_to_save`` are the composite's and reach every part."""

    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a classifier head)."})

    @classmethod
    def part_types(cls) -> dict[str, tuple[type, dict, dict]]:
        """part field -> (its config class, the method's default options, options the method fixes)."""
        raise NotImplementedError

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, (part_cls, defaults, fixed) in self.part_types().items():
            options = getattr(self, name)
            check_field(options is None or isinstance(options, dict), name, options,
                        f"a dict of {part_cls.__name__} options, e.g. {defaults}")
            for key in set(options or {}) & set(fixed):
                check_field(options[key] == fixed[key], f"{name}[{key!r}]", options[key],
                            f"{fixed[key]!r}: this method fixes it (leave it out)")
            setattr(self, name, {**defaults, **(options or {})})
            self.make_part(name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """As ``PeftConfig.from_dict``, and a part option from a newer version (unknown to the part's
        config) is dropped with a warning; building the config directly refuses it."""
        data = dict(data)
        for name, (part_cls, _, _) in cls.part_types().items():
            options = data.get(name)
            unknown = sorted(set(options) - set(part_options(part_cls))) if isinstance(options, dict) else []
            if unknown:
                warnings.warn(f"{cls.__name__}: ignoring unknown {name} options {unknown} "
                              "(written by a newer version or another library?)")
                data[name] = {k: v for k, v in options.items() if k not in unknown}
        return super().from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The fields, each part's options cut to what its own config saves (prefix tuning's
        ``prefix_init_text`` is used once, when the adapter is made)."""
        data = super().to_dict()
        for name in self.part_types():
            saved = self.make_part(name).to_dict()
            data[name] = {k: v for k, v in data[name].items() if k in saved}
        return data

    def make_part(self, name: str) -> PeftConfig:
        """Part ``name``'s config, built from its options and the composite's shared fields."""
        part_cls, _, fixed = self.part_types()[name]
        options = getattr(self, name)
        known = part_options(part_cls)
        unknown = sorted(k for k in options if k not in known)
        if unknown:
            raise ValueError(f"{name} has unknown option(s) {unknown}: {part_cls.__name__} takes {sorted(known)} "
                             f"(task_type, inference_mode and modules_to_save are set on the {type(self).__name__})")
        shared = {k: getattr(self, k) for k in SHARED_PART_FIELDS if k not in ("peft_type", "modules_to_save")}
        try:
            return part_cls(**{**options, **fixed}, **shared)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: {err}") from err


def part_options(part_cls: type) -> list[str]:
    """The options a composite's part of config class ``part_cls`` takes (its fields but the shared ones)."""
    return [f.name for f in dataclasses.fields(part_cls) if f.init and f.name not in SHARED_PART_FIELDS]
