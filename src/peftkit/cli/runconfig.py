"""The run configuration: what ``peftkit train`` reads from flags and YAML and writes to config.yaml.

A run is four sections, each a dataclass whose fields are the YAML keys and the CLI flags:

    task: classification          # top level: RunOptions
    method: lora
    model: null                   # null: the bundled model for the task
    data: {path: null, ...}       # DataOptions (null path: the bundled data for the task)
    training: {...}               # peftkit.train.TrainingArguments
    lora: {r: 8, ...}             # the method's config, in a section named after the method

Values resolve in this order, later winning: dataclass defaults < task presets < YAML < flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from peftkit.config import check_types
from peftkit.train import TrainingArguments

from .errors import UserError, did_you_mean
from .options import check_keys, cli_value, field_hints

TASKS = ("classification", "causal-lm")
TRAINING_SKIP = {"output_dir", "task"}  # set by the run itself
METHOD_SKIP = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"}


@dataclass
class RunOptions:
    task: Literal["classification", "causal-lm"] = field(
        default="classification", metadata={"help": "classification (sequence labels) or causal-lm (chat Q/A or text)"}
    )
    method: str = field(default="lora", metadata={"help": "PEFT method; `peftkit methods` lists them"})
    model: str | None = field(
        default=None, metadata={"help": "local transformers model folder (default: the bundled model for the task)"}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "run folder to create (default: runs/<task>-<method>-<time>)"}
    )
    quantize: Literal["nf4", "fp4"] | None = field(
        default=None, metadata={"help": "store the base model's linear layers in 4 bits (QLoRA; LoRA only)"}
    )
    double_quant: bool = field(default=True, metadata={"help": "with --quantize: also quantize the block constants"})


@dataclass
class DataOptions:
    path: str | None = field(
        default=None,
        metadata={"flag": "data", "help": "dataset file: .jsonl .json .csv .tsv .parquet .txt (default: bundled data)"},
    )
    eval_path: str | None = field(
        default=None, metadata={"flag": "eval-data", "help": "separate held-out file (default: split off eval_fraction)"}
    )
    text_column: str | None = field(default=None, metadata={"help": "column holding the input text (default: text)"})
    label_column: str | None = field(default=None, metadata={"help": "column holding the class label (default: label)"})
    question_column: str | None = field(default=None, metadata={"help": "column holding the prompt (default: question)"})
    answer_column: str | None = field(default=None, metadata={"help": "column holding the response (default: answer)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of the data held out for evaluation"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most N training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use at most N held-out examples"})
    max_length: int = field(default=128, metadata={"help": "truncate examples to N tokens"})
    num_samples: int = field(default=3, metadata={"help": "causal-lm: held-out prompts to generate for before/after"})
    max_new_tokens: int = field(default=40, metadata={"help": "causal-lm: tokens to generate per sample"})
    packing: bool = field(
        default=False, metadata={"help": "causal-lm: pack training examples into rows of max_length tokens, each "
                                         "attending only to itself (no padding); held-out data stays unpacked"}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "pad each batch's length up to a multiple of N (default: 64 with "
                                        "--cuda-graphs, which records one graph per shape; else 1)"}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1 or null, got {value!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"data.pad_to_multiple_of must be >= 1 or null, got {self.pad_to_multiple_of!r}")
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length!r}")


# Task presets: tuned for the bundled model and data (ASSETS.md); applied beneath YAML and flags.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "classification": {
        "data": {"max_length": 64},
        "bundled_data": {"max_train_samples": 3000},
        "training": {"learning_rate": 2e-3, "batch_size": 16, "epochs": 1, "eval_steps": 50, "warmup_ratio": 0.06},
        "method": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "bundled_model": {"target_modules": ["query", "value"]},
    },
    "causal-lm": {
        "data": {"max_length": 96, "max_eval_samples": 64},
        "bundled_data": {},
        "training": {"learning_rate": 2e-3, "batch_size": 8, "max_steps": 60, "eval_steps": 20, "warmup_ratio": 0.05},
        "method": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "bundled_model": {"target_modules": ["q_proj", "v_proj"]},
    },
}


@dataclass
class RunConfig:
    run: RunOptions
    data: DataOptions
    training: TrainingArguments
    method_config: Any  # the method's config dataclass instance
    method_options: dict[str, Any]  # the method fields as resolved (what config.yaml stores)

    def to_yaml_dict(self) -> dict:
        run = dataclasses.asdict(self.run)
        run["output_dir"] = None  # a rerun from this file makes a new run folder
        training = {k: v for k, v in self.training.to_dict().items() if k not in TRAINING_SKIP}
        return {**run, "data": dataclasses.asdict(self.data), "training": training,
                self.run.method: dict(self.method_options)}


def method_fields(config_cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if f.init and f.name not in METHOD_SKIP]


def training_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainingArguments) if f.name not in TRAINING_SKIP]


def _section(yaml_doc: dict, name: str, allowed: list[str]) -> dict:
    section = yaml_doc.get(name) or {}
    if not isinstance(section, dict):
        raise UserError(f"'{name}' in the config file must be a mapping of options, found {section!r}")
    check_keys(section, allowed, f"the '{name}' section of the config file")
    return section


def _picked(flags: dict, fields: list[dataclasses.Field]) -> dict:
    return {f.name: flags[f.name] for f in fields if f.name in flags}


def _build(cls: type, values: dict, where: str):
    try:
        check_types(cls, values)  # YAML values are untyped: name a wrong type before the field's own checks
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid {where} option: {' '.join(str(err).split())}") from None


def resolve(flags: dict, yaml_doc: dict, spec) -> RunConfig:
    """Merge defaults, presets, YAML and flags into a validated RunConfig for method ``spec``."""
    run_fields = dataclasses.fields(RunOptions)
    top_allowed = [f.name for f in run_fields] + ["data", "training", spec.name]
    check_keys({k: v for k, v in yaml_doc.items()}, top_allowed, "the config file")
    run = _build(RunOptions, {**{k: yaml_doc[k] for k in yaml_doc if k in {f.name for f in run_fields}},
                              **_picked(flags, run_fields)}, "run")
    if run.task not in TASKS:
        raise UserError(f"task {run.task!r} is not supported{did_you_mean(run.task, TASKS)} (use one of {', '.join(TASKS)})")
    preset = PRESETS[run.task]
    data_f, train_f, meth_f = dataclasses.fields(DataOptions), training_fields(), method_fields(spec.config_cls)
    data_yaml = _section(yaml_doc, "data", [f.name for f in data_f])
    data_values = {**preset["data"], **data_yaml, **_picked(flags, data_f)}
    if data_values.get("path") is None:
        data_values = {**preset["data"], **preset["bundled_data"], **data_yaml, **_picked(flags, data_f)}
    data = _build(DataOptions, data_values, "data")
    if data.packing and run.task != "causal-lm":
        raise UserError(f"--packing joins causal-LM examples into shared rows; task {run.task!r} labels whole "
                        "sequences, so it cannot be packed: drop --packing or use --task causal-lm")
    chosen = {**_section(yaml_doc, "training", [f.name for f in train_f]), **_picked(flags, train_f)}
    presets = dict(preset["training"])
    if "epochs" in chosen and "max_steps" not in chosen:
        presets.pop("max_steps", None)  # the user counts in epochs: the preset's step budget does not apply
    training = _build(TrainingArguments, {**presets, **chosen, "task": run.task}, "training")
    method_values = _method_values(run, spec, flags, yaml_doc, preset, meth_f)
    method_config = _build_method(spec, run.task, method_values)
    resolved = {f.name: getattr(method_config, f.name) for f in meth_f}
    return RunConfig(run, data, training, method_config, resolved)


def _method_values(run, spec, flags, yaml_doc, preset, meth_f) -> dict:
    names = {f.name for f in meth_f}
    presets = {**preset["method"], **(preset["bundled_model"] if run.model is None else {})}
    if not spec.target_presets:
        presets.pop("target_modules", None)
    hints = field_hints(spec.config_cls)
    typed = {k: cli_value(hints[k], v) for k, v in _picked(flags, meth_f).items()}
    chosen = {k: v for k, v in presets.items() if k in names}
    chosen.update(_section(yaml_doc, spec.name, sorted(names)))
    chosen.update(typed)
    return chosen


def _build_method(spec, task: str, values: dict):
    task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    return _build(spec.config_cls, {**values, "task_type": task_type}, f"{spec.name}")
