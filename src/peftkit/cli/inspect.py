"""``peftkit inspect ADAPTER_DIR``: what an adapter folder holds, read from its files alone.

It reads ``adapter_config.json`` and the tensors of ``adapter_model.safetensors`` (or of a legacy
``adapter_model.bin``, tensors only) with no base model needed, and reports the method, targets, ranks,
alpha, parameter counts and base model, plus any problems: a missing or unreadable config or weights
file, an unknown method, a config field that loading would refuse, weights whose module
does not fit ``target_modules`` or whose rank is not the configured one, unpaired ``lora_A``/``lora_B``,
listed ``modules_to_save`` without weights, and NaN or infinite values. Exit code 0 when it finds no
problems, 1 when it does (so scripts can gate on it), 2 when the folder is not there at all.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftkit.peft_model import CLASSIFIER_NAMES

from .errors import UserError
from .parser import Parser

HELP = "describe an adapter folder: method, targets, ranks, parameter counts, base model, problems"
WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."
RANKED = {"lora_A": 0, "lora_embedding_A": 0}  # parameter -> axis holding the rank


@dataclass
class Report:
    path: str
    config: dict | None = None
    tensors: dict[str, tuple[list[int], str]] = field(default_factory=dict)  # key -> (shape, dtype)
    nonfinite: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def build_parser() -> Parser:
    p = Parser(prog="peftkit inspect", description=HELP)
    p.add_argument("path", metavar="ADAPTER_DIR", help="adapter folder (or a run folder holding adapter/)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


# ------------------------------------------------------------------------------------------ reading
def read_config(folder: Path, report: Report) -> None:
    path = folder / "adapter_config.json"
    if not path.is_file():
        report.problems.append("adapter_config.json is missing: the method and targets are unknown; re-save the adapter")
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        report.problems.append(f"adapter_config.json is not valid JSON ({err}); re-save the adapter")
        return
    if not isinstance(config, dict):
        report.problems.append(f"adapter_config.json must hold a JSON object of config fields, found a "
                               f"{type(config).__name__}; re-save the adapter")
        return
    report.config = config


def read_weights(folder: Path, report: Report) -> None:
    """The safetensors file's tensors, or (when that is absent) the legacy ``adapter_model.bin``'s."""
    if not (folder / WEIGHTS).is_file() and (folder / LEGACY_WEIGHTS).is_file():
        _read_legacy_weights(folder / LEGACY_WEIGHTS, report)
    else:
        _read_safetensors(folder, report)


def _read_legacy_weights(path: Path, report: Report) -> None:
    from peftkit.io.hf_format import read_weights as read_adapter_weights

    try:
        tensors = read_adapter_weights(path.parent)  # weights_only: a pickle of anything else is refused
    except ValueError as err:
        report.problems.append(" ".join(str(err).split()).replace(str(path), LEGACY_WEIGHTS))
        return
    for key, tensor in tensors.items():
        _record(report, key, tensor)


def _record(report: Report, key: str, tensor: torch.Tensor) -> None:
    report.tensors[key] = (list(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        report.nonfinite.append(key)


def _read_safetensors(folder: Path, report: Report) -> None:
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS
    if not path.is_file():
        report.problems.append(f"{WEIGHTS} is missing: the folder holds no adapter weights")
        return
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                _record(report, key, f.get_tensor(key))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        report.problems.append(f"{WEIGHTS} cannot be read ({' '.join(str(err).split())}); the file is corrupt")


def adapter_param_names() -> frozenset[str]:
    """The names adapter layers give their own tensors in files, asked of every registered method
    (each layer type declares them as ``file_tensors``): a new method needs no edit here."""
    from peftkit.registry import list_methods

    return _file_tensor_names(tuple(list_methods()))


@functools.lru_cache(maxsize=4)
def _file_tensor_names(methods: tuple[str, ...]) -> frozenset[str]:
    """Computed once per set of registered methods: split_key asks for every tensor of a file."""
    from peftkit.registry import get_method

    wrappers = [w for m in methods for w in [r.wrapper for r in get_method(m).layer_rules] + list(get_method(m).part_layers)]
    return frozenset(name for wrapper in wrappers for name in getattr(wrapper, "file_tensors", ()))


def split_key(key: str) -> tuple[str, str | None]:
    """``base_model.model.a.b.lora_A.weight`` -> (``a.b``, ``lora_A``); non-adapter tensors -> (module, None)."""
    name = key.removeprefix(PREFIX)
    parts = name.split(".")
    own = adapter_param_names()
    for i, part in enumerate(parts):
        if part in own:
            return ".".join(parts[:i]), part
    return ".".join(parts[:-1]), None


# ----------------------------------------------------------------------------------------- analysis
def layers(report: Report) -> dict[str, dict[str, list[int]]]:
    """module -> {adapter parameter -> shape} for the adapter layers found in the weights."""
    found: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for key, (shape, _) in report.tensors.items():
        module, param = split_key(key)
        if param is not None:
            found[module][param] = shape
    return dict(found)


def target_fits(module: str, targets) -> bool:
    if targets is None or targets == "all-linear" or not isinstance(targets, (str, list)):
        return True  # a target_modules of the wrong type is reported by check_config
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def configured_rank(module: str, config: dict) -> int | None:
    if "init_r" in config:  # AdaLoRA: init_r, or the triplets its rank allocator kept
        kept = (config.get("rank_pattern") or {}).get(f"{module}.lora_E")
        return config["init_r"] if kept is None else sum(kept)
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return rank
    return config.get("r")


def check_layers(report: Report, found: dict[str, dict[str, list[int]]]) -> None:
    config = report.config or {}
    for module, params in sorted(found.items()):
        if "target_modules" in config and not target_fits(module, config["target_modules"]):
            report.problems.append(f"weights for {module!r} do not fit target_modules={config['target_modules']!r}")
        if ("lora_A" in params) != ("lora_B" in params):
            report.problems.append(f"{module!r} has {sorted(params)} but LoRA needs both lora_A and lora_B")
        for param, axis in RANKED.items():
            rank, want = (params[param][axis] if param in params else None), configured_rank(module, config)
            if rank is not None and want is not None and rank != want:
                report.problems.append(f"{module}.{param} has rank {rank} but the config says r={want}")


def saved_modules(report: Report) -> dict[str, int]:
    """modules_to_save name -> parameter count found in the weights."""
    counts: dict[str, int] = {}
    for name in (report.config or {}).get("modules_to_save") or []:
        keys = [k for k in report.tensors if split_key(k)[1] is None and _under(k.removeprefix(PREFIX), name)]
        counts[name] = sum(_numel(report.tensors[k][0]) for k in keys)
    return counts


def _under(name: str, module: str) -> bool:
    return name.startswith(module + ".") or f".{module}." in name


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_config(report: Report, found: dict) -> None:
    config = report.config
    if config is None:
        return
    from peftkit.registry import get_method_by_peft_type

    try:
        spec = get_method_by_peft_type(config.get("peft_type"), config)
    except ValueError as err:
        report.problems.append(str(err))
    else:
        check_fields(spec, config, report)
    counts = saved_modules(report)
    for name, count in counts.items():
        # HF lists both usual classifier head names for classification tasks; one of them is enough
        head_found = name in CLASSIFIER_NAMES and any(counts.get(n) for n in CLASSIFIER_NAMES)
        if count == 0 and not head_found:
            report.problems.append(f"modules_to_save lists {name!r} but the weights hold no tensors for it")
    base = config.get("base_model_name_or_path")
    if base and not Path(base).exists() and Path(base).is_absolute():
        report.problems.append(f"base model folder {base!r} does not exist on this machine; pass --model when loading")
    if report.tensors and not found and config.get("peft_type") == "LORA":
        report.problems.append("the weights hold no LoRA tensors (lora_A / lora_B)")


def check_fields(spec, config: dict, report: Report) -> None:
    """Build the method's config from the file, as loading would: a field it refuses is a problem
    (fields it does not know, from newer versions, only warn when loading and are not reported)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            spec.config_cls.from_dict(config)
        except (TypeError, ValueError) as err:
            report.problems.append(f"adapter_config.json: {' '.join(str(err).split())}; loading it would fail")


def inspect(folder: Path) -> Report:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{str(folder)!r} is not a folder; pass the folder written by save_pretrained")
    if not (folder / "adapter_config.json").exists() and (folder / "adapter" / "adapter_config.json").exists():
        folder = folder / "adapter"
    report = Report(str(folder))
    read_config(folder, report)
    read_weights(folder, report)
    found = layers(report)
    check_layers(report, found)
    check_config(report, found)
    report.problems += [f"tensor {k} holds NaN or infinite values" for k in report.nonfinite]
    return report


# --------------------------------------------------------------------------------------- rendering
def summary(report: Report) -> dict:
    config, found = report.config or {}, layers(report)
    adapter = sum(_numel(s) for k, (s, _) in report.tensors.items() if split_key(k)[1] is not None)
    ranks = Counter(p["lora_A"][0] for p in found.values() if "lora_A" in p)
    return {
        "path": report.path, "method": config.get("peft_type"), "task_type": config.get("task_type"),
        "base_model": config.get("base_model_name_or_path"), "target_modules": config.get("target_modules"),
        "adapted_modules": len(found), "r": config.get("init_r", config.get("r")), "observed_ranks": dict(sorted(ranks.items())),
        "lora_alpha": config.get("lora_alpha"), "modules_to_save": saved_modules(report),
        "parameters": sum(_numel(s) for s, _ in report.tensors.values()), "adapter_parameters": adapter,
        "tensors": len(report.tensors), "dtypes": sorted({d for _, d in report.tensors.values()}),
        "problems": report.problems,
    }


def render(info: dict) -> str:
    ranks = ", ".join(f"{r} ({n} modules)" for r, n in info["observed_ranks"].items()) or "-"
    lines = [
        f"adapter:     {info['path']}",
        f"method:      {info['method']}   task type: {info['task_type']}",
        f"base model:  {info['base_model']}",
        f"targets:     {info['target_modules']}  ->  {info['adapted_modules']} adapted modules",
    ]
    if info["r"] is not None:  # low-rank methods only (IA3 and other scaling methods have no rank)
        lines += [f"rank:        r={info['r']}; in the weights: {ranks}", f"alpha:       {info['lora_alpha']}"]
    lines += [
        f"parameters:  {info['parameters']:,} in {info['tensors']} tensors "
        f"({info['adapter_parameters']:,} adapter, {sum(info['modules_to_save'].values()):,} modules_to_save "
        f"{list(info['modules_to_save'])}); dtype {', '.join(info['dtypes']) or '-'}",
    ]
    problems = info["problems"]
    lines.append("problems:    " + ("none" if not problems else f"{len(problems)} found"))
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    info = summary(inspect(Path(args.path)))
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 1 if info["problems"] else 0
