"""Flags generated from config dataclasses, and YAML merged beneath them."""

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from peftkit.cli.errors import UserError
from peftkit.cli.options import add_dataclass_flags, check_keys, cli_value
from peftkit.cli.runconfig import resolve
from peftkit.cli.train import build_parser, method_spec


@dataclass
class FakeConfig:
    rank: int = field(default=4, metadata={"help": "the rank"})
    scale: float | None = field(default=None, metadata={"help": "a scale"})
    use_thing: bool = field(default=False, metadata={"help": "a switch"})
    targets: list[str] | str | None = field(default=None, metadata={"help": "targets"})
    layers: list[int] | None = field(default=None, metadata={"help": "layer ids"})
    pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "per-module ranks"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "a mode"})


def parse(argv):
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, FakeConfig, set(), set())
    return vars(parser.parse_args(argv))


def test_every_field_becomes_a_typed_flag():
    got = parse(["--rank", "8", "--scale", "0.5", "--use-thing", "--targets", "q", "v", "--layers", "0", "2",
                 "--pattern", '{"q": 2}', "--mode", "b"])
    assert got == {"rank": 8, "scale": 0.5, "use_thing": True, "targets": ["q", "v"], "layers": [0, 2],
                   "pattern": {"q": 2}, "mode": "b"}
    assert parse(["--no-use-thing"]) == {"use_thing": False}
    assert parse([]) == {}  # untyped flags stay out, so YAML values underneath survive


def test_a_single_regex_or_all_linear_stays_a_string():
    hint = list[str] | str | None
    assert cli_value(hint, ["all-linear"]) == "all-linear"
    assert cli_value(hint, [".*attn.*"]) == ".*attn.*"
    assert cli_value(hint, ["query"]) == ["query"]


def test_unknown_keys_suggest_the_nearest():
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        check_keys({"learning_rat": 1}, ["learning_rate", "batch_size"], "training")


def test_every_lora_option_is_a_flag():
    import dataclasses

    spec = method_spec("lora")
    options = {s for a in build_parser(spec)._actions for s in a.option_strings}
    for f in dataclasses.fields(spec.config_cls):
        if f.name not in ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"):
            assert "--" + f.name.replace("_", "-") in options, f.name


def test_flags_override_yaml_which_overrides_presets():
    spec = method_spec("lora")
    doc = {"training": {"learning_rate": 0.01, "batch_size": 4}, "lora": {"r": 4, "lora_alpha": 32}}
    cfg = resolve({"learning_rate": 0.02, "r": 2}, doc, spec)
    assert cfg.training.learning_rate == 0.02 and cfg.training.batch_size == 4
    assert cfg.method_config.r == 2 and cfg.method_config.lora_alpha == 32
    assert cfg.method_config.target_modules == ["query", "value"]  # preset for the bundled model
    assert cfg.method_config.task_type == "SEQ_CLS"


def test_yaml_round_trip_gives_the_same_config():
    spec = method_spec("lora")
    cfg = resolve({"task": "causal-lm", "max_steps": 7, "seed": 3}, {}, spec)
    again = resolve({}, cfg.to_yaml_dict(), spec)
    assert again.to_yaml_dict() == cfg.to_yaml_dict()
    assert again.training.max_steps == 7 and again.training.seed == 3 and again.run.task == "causal-lm"


def test_asking_for_epochs_drops_the_presets_step_budget():
    spec = method_spec("lora")
    assert resolve({"task": "causal-lm"}, {}, spec).training.max_steps == 60
    assert resolve({"task": "causal-lm", "epochs": 2}, {}, spec).training.max_steps is None
    assert resolve({"task": "causal-lm", "epochs": 2, "max_steps": 5}, {}, spec).training.max_steps == 5
