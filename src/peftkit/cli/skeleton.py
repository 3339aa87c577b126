"""What ``peftkit params``, ``memory`` and ``recommend`` share: naming a model and a method config.

``--model`` takes a model folder, a ``config.json``, a bundled model (``minilm``, ``smollm2``) or a
published shape (``llama-3-8b``, ...); only the config is read and the model is built on the meta
device. The method and its options are the same flags as ``peftkit train`` (``--method NAME --help``
lists them) and resolve through the same presets, so the numbers describe what train would run.
"""

from __future__ import annotations

import argparse
import dataclasses

from .errors import UserError
from .options import add_dataclass_flags
from .parser import Parser
from .runconfig import METHOD_SKIP, resolve
from .train import RUN_LENGTH_OPTIONS


def pre_parse(argv: list[str]) -> argparse.Namespace:
    pre = Parser(add_help=False)
    pre.add_argument("--method", default="lora")
    known, _ = pre.parse_known_args(argv)
    return known


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    from peftkit.analysis.shapes import known_names

    group = parser.add_argument_group("model")
    group.add_argument("--model", help=f"model folder, config.json, or one of: {', '.join(known_names())} "
                                       "(default: the bundled model for the task)")
    group.add_argument("--task", choices=["classification", "causal-lm"],
                       help="head to put on the model (default: from the model's config)")
    group.add_argument("--num-labels", type=int,
                       help="classification: number of classes (default: the model's head, else 2)")
    group.add_argument("--method", default="lora", help="PEFT method; `peftkit methods` lists them")


def add_method_flags(parser: argparse.ArgumentParser, spec, taken: set[str]) -> None:
    add_dataclass_flags(parser.add_argument_group(f"{spec.name} options"), spec.config_cls, METHOD_SKIP, taken)


def model_source(args: argparse.Namespace):
    from peftkit.analysis.shapes import infer_task, source

    if args.num_labels is not None and args.num_labels < 1:
        raise UserError(f"--num-labels must be >= 1, got {args.num_labels}")
    try:
        task = args.task or infer_task(args.model)
        return source(args.model, task, args.num_labels)
    except (ValueError, OSError) as err:
        raise UserError(" ".join(str(err).split())) from None


def method_config(spec, task: str, model: str | None, flags: dict, steps: int = 1000):
    """The method's config from its flags, with train's presets beneath them.

    Options that train fills with the run's length (AdaLoRA's ``total_step``) take ``steps``; they
    change schedules, not parameter counts or memory.
    """
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    chosen = {k: v for k, v in flags.items() if k in names}
    run = {"task": task, "method": spec.name, "model": model}
    config = resolve({**run, **chosen}, {}, spec).method_config
    unset = {o: steps for o in RUN_LENGTH_OPTIONS if o in names and getattr(config, o) is None}
    return dataclasses.replace(config, **unset) if unset else config


def dataclass_values(args: argparse.Namespace, cls: type):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid option: {' '.join(str(err).split())}") from None


def gib(n: float) -> str:
    return f"{n / 1024 ** 3:,.2f}"
