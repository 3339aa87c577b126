"""What several subcommands share: finding and loading models, reading data, generating samples.

Everything here checks the user's input before any work starts and raises ``UserError`` with a
message that names the problem and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftkit.data import assets
from peftkit.data.causal_lm import CausalLMCollator, build_causal_lm_dataset, prompt_batch
from peftkit.data.classification import ClassificationCollator, build_classification_dataset, label_mapping
from peftkit.data.packing import PackedCollator, pack_dataset
from peftkit.data.readers import load_records, select_columns
from peftkit.data.split import train_eval_split

from .errors import UserError
from .options import load_yaml

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"


# ------------------------------------------------------------------------------------------- models
def bundled_model_dir(task: str) -> Path:
    return assets.minilm_dir() if task == "classification" else assets.smollm2_dir()


def check_model_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"model folder {str(path)!r} does not exist; pass --model a local transformers model folder")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(
            f"{str(path)!r} is not a transformers model folder (no config.json); pass --model a folder "
            "written by save_pretrained, holding config.json and the weights"
        )
    return path


def quiet_transformers() -> None:
    """Keep the CLI's output to what the user asked for: no load reports or weight progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _loading(what: str, path: Path, load):
    quiet_transformers()
    try:
        return load()
    except UserError:
        raise
    except Exception as err:  # transformers raises many types for a broken folder
        raise UserError(f"cannot load the {what} from {str(path)!r}: {' '.join(str(err).split())[:300]}; "
                        "pass a folder written by save_pretrained") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return _loading("tokenizer", path, lambda: AutoTokenizer.from_pretrained(path))


def check_head(path: Path, label2id: dict) -> None:
    """A model that already has a classification head must have exactly the data's labels."""
    from transformers import AutoConfig

    config = _loading("model config", path, lambda: AutoConfig.from_pretrained(path))
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return  # a bare encoder: the head is created for the data's labels
    names = [str(config.id2label[i]) for i in sorted(config.id2label)]
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    data = [str(x) for x in label2id]
    if len(names) != len(data) or (not generic and sorted(names) != sorted(data)):
        raise UserError(
            f"the model's classification head has {len(names)} labels {names} but the data has {len(data)} labels "
            f"{data}; give data with the head's labels, or a base model without a head"
        )


def load_classifier(path: Path, label2id: dict):
    from transformers import AutoModelForSequenceClassification

    if prequantized(path):
        raise UserError(f"{str(path)!r} is a 4-bit bitsandbytes checkpoint; peftkit loads those for --task causal-lm "
                        "only: pass the full-precision model with --quantize nf4 instead")
    check_head(path, label2id)
    id2label = {i: str(label) for label, i in label2id.items()}
    return _loading("model", path, lambda: AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(label2id), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        dtype=torch.float32))


def load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    if prequantized(path):  # saved in 4 bits by transformers + bitsandbytes (or save_quantized_model)
        from peftkit.quant import load_quantized_model

        return _loading("4-bit model", path, lambda: load_quantized_model(path, torch.float32, AutoModelForCausalLM))
    return _loading("model", path, lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))


def prequantized(path: Path) -> bool:
    from peftkit.quant.checkpoint import bnb_quantization_config

    return bnb_quantization_config(path) is not None


# --------------------------------------------------------------------------------------------- data
GRAPH_PAD_MULTIPLE = 64  # few batch shapes, so few recorded graphs; at most 63 more tokens per row


@dataclass
class Data:
    train: Any
    eval: Any
    collate: Any
    eval_records: list[dict]
    label2id: dict | None


def _classification_records(records: list[dict], opts) -> list[dict]:
    return select_columns(records, {"text": opts.text_column or "text", "label": opts.label_column or "label"})


def _causal_records(records: list[dict], opts) -> list[dict]:
    columns = list(records[0])
    if opts.question_column or opts.answer_column or {"question", "answer"} <= set(columns):
        mapping = {"question": opts.question_column or "question", "answer": opts.answer_column or "answer"}
        return select_columns(records, mapping)
    if opts.text_column or "text" in columns:
        return select_columns(records, {"text": opts.text_column or "text"})
    raise UserError(
        f"the data has columns {columns}, none of which is a causal-LM field; name them with "
        "--question-column and --answer-column (chat pairs) or --text-column (plain text)"
    )


def read_records(task: str, opts, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) records with our column names, split deterministically by ``seed``."""
    select = _classification_records if task == "classification" else _causal_records
    if opts.path is None:
        records = assets.review_records() if task == "classification" else assets.qa_pairs()
    else:
        records = select(load_records(opts.path), opts)
    if opts.eval_path is not None:
        train, evals = records, select(load_records(opts.eval_path), opts)
    else:
        stratify = "label" if task == "classification" else None
        train, evals = train_eval_split(records, eval_fraction=opts.eval_fraction, seed=seed, stratify_by=stratify)
    train, evals = train[: opts.max_train_samples], evals[: opts.max_eval_samples]
    if not train or not evals:
        raise UserError(f"the data gives {len(train)} training and {len(evals)} held-out examples; both need at least one")
    return train, evals


def build_data(task: str, tokenizer, opts, seed: int, label2id: dict | None = None, cuda_graphs: bool = False) -> Data:
    """Train and held-out sets and their collator; with ``cuda_graphs`` batches are padded to a
    multiple of 64 tokens unless ``opts.pad_to_multiple_of`` says otherwise."""
    train_records, eval_records = read_records(task, opts, seed)
    multiple = opts.pad_to_multiple_of or (GRAPH_PAD_MULTIPLE if cuda_graphs else 1)
    if task == "causal-lm":
        train = build_causal_lm_dataset(train_records, tokenizer, max_length=opts.max_length)
        evals = build_causal_lm_dataset(eval_records, tokenizer, max_length=opts.max_length)
        if opts.packing:  # the training set only: held-out metrics stay comparable with unpacked runs
            return Data(pack_dataset(train, opts.max_length), evals, PackedCollator.for_tokenizer(tokenizer, multiple),
                        eval_records, None)
        return Data(train, evals, CausalLMCollator.for_tokenizer(tokenizer, multiple), eval_records, None)
    label2id = label2id or label_mapping(r["label"] for r in train_records + eval_records)
    if len(label2id) < 2:
        raise UserError(f"the data has only the label(s) {list(label2id)}; classification needs at least two classes")
    train = build_classification_dataset(train_records, tokenizer, label2id=label2id, max_length=opts.max_length)
    evals = build_classification_dataset(eval_records, tokenizer, label2id=label2id, max_length=opts.max_length)
    return Data(train, evals, ClassificationCollator.for_tokenizer(tokenizer, multiple), eval_records, label2id)


# ------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], max_new_tokens: int,
                     synced_gpus: bool = False) -> list[str]:
    """Greedy chat completions for ``questions`` (left-padded batch, new tokens only).

    ``synced_gpus``: every rank of an FSDP2 job calls this, and all keep stepping until all are done.
    """
    if not questions:
        return []
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in prompt_batch(tokenizer, questions).items()}
    was_training = model.training
    model.eval()
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced_gpus,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    model.train(was_training)
    new = out[:, batch["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


# --------------------------------------------------------------------------------- run & adapters
@dataclass
class Located:
    """Where an adapter lives and what is known about the run that made it."""

    adapter_dir: Path
    run_dir: Path | None  # the run folder, when the path is one (it holds config.yaml)
    run_config: dict | None  # the run's config.yaml
    adapter_config: dict


def locate_adapter(path: str | Path) -> Located:
    """Accept a run folder (holding adapter/ and config.yaml) or an adapter folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; pass a run folder or an adapter folder")
    adapter_dir = path / "adapter" if (path / "adapter" / ADAPTER_CONFIG).is_file() else path
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UserError(f"{str(path)!r} holds no {ADAPTER_CONFIG}; pass a run folder or a folder written by save_pretrained")
    run_dir = adapter_dir.parent if (adapter_dir.parent / RUN_CONFIG).is_file() else None
    run_config = load_yaml(str(run_dir / RUN_CONFIG)) if run_dir else None  # checked: a mapping, valid YAML
    try:
        adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG} is not valid JSON ({err}); re-save the adapter") from None
    if not isinstance(adapter_config, dict):
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG} must hold a JSON object of config fields, found a "
                        f"{type(adapter_config).__name__}; re-save the adapter")
    return Located(adapter_dir, run_dir, run_config, adapter_config)


def task_of(located: Located, override: str | None = None) -> str:
    if override:
        return override
    if located.run_config and located.run_config.get("task"):
        return located.run_config["task"]
    task_type = located.adapter_config.get("task_type")
    if task_type in ("SEQ_CLS", "CAUSAL_LM"):
        return "classification" if task_type == "SEQ_CLS" else "causal-lm"
    raise UserError(f"the adapter's task_type is {task_type!r}; pass --task classification or --task causal-lm")


def base_model_of(located: Located, task: str, override: str | None = None) -> Path:
    """--model wins; then the run's model (null = bundled); then the adapter's base_model_name_or_path."""
    if override:
        return check_model_folder(override)
    if located.run_config is not None:
        model = located.run_config.get("model")
        return check_model_folder(model) if model else bundled_model_dir(task)
    base = located.adapter_config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise UserError(f"the adapter names base model {base!r}, which is not a local folder; pass --model BASE_FOLDER")
    return check_model_folder(base)


def quantize_base(model, run: dict | None):
    """Quantize ``model`` as the run with config ``run`` (its config.yaml or resolved options) did."""
    from peftkit.quant import QuantConfig, is_quantized, quantize_model

    if not run or not run.get("quantize") or is_quantized(model):  # loaded from a 4-bit checkpoint
        return model
    precision = (run.get("training") or {}).get("precision", "fp32")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    config = QuantConfig(bnb_4bit_quant_type=run["quantize"], bnb_4bit_use_double_quant=run.get("double_quant", True),
                         bnb_4bit_compute_dtype=dtype)
    return quantize_model(model, config)


def load_peft(located: Located, task: str, base: Path, label2id: dict | None, quantized: bool = False):
    """Base model plus the saved adapter, ready for evaluation or generation; ``quantized``: with the
    base quantized as in the run that trained it (a merge wants the full-precision base instead)."""
    from peftkit import PeftModel

    model = load_classifier(base, label2id) if task == "classification" else load_causal_lm(base)
    model = quantize_base(model, located.run_config) if quantized else model
    try:
        return PeftModel.from_pretrained(model, str(located.adapter_dir), is_trainable=False)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        raise UserError(f"cannot load the adapter {str(located.adapter_dir)!r} onto {str(base)!r}: "
                        f"{' '.join(str(err).split())[:400]}") from None


def labels_of(located: Located) -> dict | None:
    """The run's label2id (from summary.json), so eval rebuilds the head with the same classes."""
    summary = located.run_dir / "summary.json" if located.run_dir else None
    labels = json.loads(summary.read_text()).get("labels") if summary and summary.is_file() else None
    return {label: i for i, label in enumerate(labels)} if labels else None


def head_size(adapter_dir: Path) -> int | None:
    """Output size of the saved classification head (a 2-D weight of a modules_to_save module)."""
    from .inspect import inspect, saved_modules, split_key

    report = inspect(adapter_dir)
    for name in saved_modules(report):
        for key, (shape, _) in report.tensors.items():
            module, param = split_key(key)
            if param is None and module.split(".")[-1] in (name, "out_proj") and key.endswith("weight") and len(shape) == 2:
                return shape[0]
    return None
