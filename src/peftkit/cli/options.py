"""Command-line flags generated from config dataclasses, and YAML files checked against them.

Every field of a config dataclass becomes ``--field-name`` (underscores turned into dashes), typed
from its annotation and documented by its ``metadata["help"]``: so every option a method's config
declares is a flag without any per-method CLI code. Flags default to ``argparse.SUPPRESS``, so the
parsed namespace holds only what the user typed, which is what lets flags override a YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, Union

import yaml

from .errors import UserError, did_you_mean


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _parse_yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid YAML/JSON value ({err})") from err


def _parse_bool(text: str) -> bool:
    value = _parse_yaml_value(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _members(hint: Any) -> list[Any]:
    """Members of a union (``X | None`` and ``Optional[X]`` included), without ``None``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return [m for m in typing.get_args(hint) if m is not type(None)]
    return [hint]


def _is_list(hint: Any) -> bool:
    return typing.get_origin(hint) in (list, tuple, set) or hint in (list, tuple, set)


def _list_item(members: list[Any]) -> Any:
    for m in members:
        if _is_list(m):
            args = typing.get_args(m)
            return args[0] if args else str
    return str


def flag_kwargs(hint: Any, help_text: str) -> dict:
    """argparse keyword arguments for one annotated field."""
    members = _members(hint)
    kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
    if members == [bool]:
        return {**kwargs, "action": argparse.BooleanOptionalAction}
    if any(_is_list(m) for m in members):
        item = _list_item(members)
        return {**kwargs, "nargs": "+", "type": item if item in (int, float, str) else _parse_yaml_value,
                "metavar": item.__name__.upper() if isinstance(item, type) else "VALUE"}
    if len(members) == 1 and typing.get_origin(members[0]) is Literal:
        return {**kwargs, "choices": list(typing.get_args(members[0]))}
    if len(members) == 1 and members[0] in (int, float, str):
        return {**kwargs, "type": members[0], "metavar": members[0].__name__.upper()}
    return {**kwargs, "type": _parse_yaml_value, "metavar": "VALUE"}  # dicts, mixed unions: YAML text


def cli_value(hint: Any, value: Any) -> Any:
    """Undo argparse's list-ness where the field also takes one string (``--target-modules all-linear``).

    A single value for a ``list[str] | str`` field stays a list of one suffix unless it looks like a
    regex or is ``all-linear``, which the field only understands as a plain string.
    """
    members = _members(hint)
    if isinstance(value, list) and len(value) == 1 and str in members and any(_is_list(m) for m in members):
        item = value[0]
        if isinstance(item, str) and (item == "all-linear" or any(c in item for c in ".*+?[](){}|^$\\")):
            return item
    return value


def field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_dataclass_flags(group, cls: type, skip: set[str], taken: set[str]) -> list[str]:
    """Add one flag per field of ``cls`` (minus ``skip`` and flags already ``taken``); return the names."""
    hints, added = field_hints(cls), []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in taken or not f.init:
            continue
        flag = "--" + f.metadata["flag"] if "flag" in f.metadata else flag_name(f.name)
        group.add_argument(flag, dest=f.name, **flag_kwargs(hints[f.name], f.metadata.get("help", "")))
        taken.add(f.name)
        added.append(f.name)
    return added


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path!r} does not exist; check the path given to --config") from None
    except IsADirectoryError:
        raise UserError(f"--config {path!r} is a folder; pass a YAML file such as RUN_DIR/config.yaml") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path!r} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path!r} must hold a mapping of options, found a {type(data).__name__}")
    return data


def check_keys(section: dict, allowed: list[str], where: str) -> None:
    """Fail on a key that is not an option, suggesting the nearest one."""
    for key in section:
        if key not in allowed:
            raise UserError(
                f"unknown option {key!r} in {where}{did_you_mean(str(key), allowed)} "
                f"(valid options: {', '.join(sorted(allowed))})"
            )
