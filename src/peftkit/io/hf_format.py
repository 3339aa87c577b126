"""The adapter file format of Hugging Face PEFT, as pure functions over an ``AdapterModel``.

A folder holds ``adapter_config.json`` (the config's fields, HF names) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module>.<tensor>`` with the
adapter name left out, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
Prompt tuning differs, as in HF: ``prompt_embeddings`` at the top level, and ``base_model.<module>``
for its modules_to_save copies (the method's ``file_prefix``).
Keys come from the layers themselves (``adapter_tensors``), never from searching parameter names.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from peftkit.io.atomic import atomic_write_text, atomic_write_with
from peftkit.registry import method_for_config

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def adapter_tensor_map(adapter_model: Any, name: str, saved: bool = False) -> dict[str, torch.Tensor]:
    """HF key -> the live tensor, for every tensor that belongs to adapter ``name``.

    ``saved``: the tensors as written to a file (``saved_tensors``, which may be a pruned view).
    """
    prefix = method_for_config(adapter_model.peft_config[name]).file_prefix
    found: dict[str, torch.Tensor] = {}
    for key, layer in adapter_model.adapter_layers():
        if name in layer.adapter_names():
            tensors = layer.saved_tensors(name) if saved else layer.adapter_tensors(name)
            found.update({file_key(prefix, key, layer, local): tensor for local, tensor in tensors.items()})
    for key, param in adapter_model.bias_parameters(name).items():
        found[prefix + key] = param
    return found


def file_key(prefix: str, key: str, layer: Any, local: str) -> str:
    """The file key of tensor ``local`` of the layer at module ``key``."""
    return local if layer.top_level_keys else f"{prefix}{key}.{local}"


def to_hf_state_dict(adapter_model: Any, name: str) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies, ready for safetensors."""
    return {k: t.detach().contiguous().clone() for k, t in adapter_tensor_map(adapter_model, name, saved=True).items()}


def get_peft_model_state_dict(model: Any, state_dict: dict | None = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """HF PEFT's function of the same name: the adapter's tensors under their file keys."""
    if state_dict is not None:
        raise ValueError("passing state_dict is not supported; call without it to read the live model")
    return to_hf_state_dict(getattr(model, "base_model", model), adapter_name)


def set_peft_model_state_dict(model: Any, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", strict: bool = True) -> list[str]:
    """HF PEFT's function of the same name: load file-keyed tensors into adapter ``adapter_name``."""
    return load_state(getattr(model, "base_model", model), adapter_name, peft_model_state_dict, strict)


def save_weights(state: dict[str, torch.Tensor], folder: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    target = Path(folder) / WEIGHTS_NAME
    atomic_write_with(target, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return target


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the adapter tensors of a folder (safetensors, or the legacy pickle-free .bin)."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return _read_safetensors(folder / WEIGHTS_NAME)
    if (folder / LEGACY_WEIGHTS_NAME).is_file():
        return _read_legacy(folder / LEGACY_WEIGHTS_NAME)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {folder}: "
                            "pass the folder written by save_pretrained")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{path} is corrupt or truncated ({err}); save or copy the adapter again") from err


def _read_legacy(path: Path) -> dict[str, torch.Tensor]:
    """A pickled ``{key: tensor}``; ``weights_only`` refuses any other object, so no code runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for garbled, truncated or unsafe pickles
        raise _unpickle_error(path, err) from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} must hold a dict of tensor name -> tensor, found {type(state).__name__}; "
                         "save the adapter again")
    bad = [repr(k) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path} must hold a dict of tensor name -> tensor, but {', '.join(bad[:3])} "
                         "are not; save the adapter again")
    return state


def _unpickle_error(path: Path, err: Exception) -> ValueError:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found:
        return ValueError(f"{path} holds pickled Python objects besides tensors ({found.group(1)}), which peftkit "
                          f"does not unpickle (that could run code); save the adapter again as {WEIGHTS_NAME}")
    return ValueError(f"{path} is corrupt or not a tensor file ({' '.join(str(err).split())[:200]}); "
                      f"save the adapter again (as {WEIGHTS_NAME})")


def load_state(adapter_model: Any, name: str, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Copy ``state`` into adapter ``name`` after checking every key and shape; return warnings.

    Keys for base-model tensors (HF saves resized embedding tables this way) load into the base.
    Nothing is copied unless the whole file fits. Layers whose file form differs from their live
    tensors (``from_saved``) turn their part of ``state`` into the live form first.
    """
    state = live_form(adapter_model, name, state)
    expected = adapter_tensor_map(adapter_model, name)
    base = dict(adapter_model.named_parameters(prefix="base_model"))
    missing = sorted(set(expected) - set(state))
    extra = sorted(k for k in state if k not in expected and k not in base)
    problems = _shape_problems(state, {**base, **expected}) + _dtype_problems(state, {**base, **expected})
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if extra or problems or (strict and (missing or nonfinite)):
        misfits = set(missing) | {k for k, _ in problems if k in expected}  # the adapter's own tensors that do not fit
        raise ValueError(_mismatch_message(adapter_model, name, missing, extra, [m for _, m in problems], nonfinite,
                                           misfits))
    with torch.no_grad():
        for key, value in state.items():
            (expected.get(key) if key in expected else base[key]).copy_(value)
    notes = [f"tensor {k} is missing from the file and keeps its initial value" for k in missing]
    notes += [f"tensor {k} holds NaN or infinite values (loaded anyway: strict=False)" for k in nonfinite]
    notes += [f"base tensor {k} was overwritten from the adapter file" for k in state if k not in expected]
    return notes


def live_form(adapter_model: Any, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each ``from_saved`` layer's file tensors replaced by its live tensors.

    A layer that saves a compact form (diff pruning: indices and values of a sparse diff) defines
    ``from_saved(name, tensors) -> tensors``, the inverse of its ``saved_tensors``; keys are relative
    to the layer, and tensors the file lacks stay out so the missing-key check still names them.
    """
    prefix = method_for_config(adapter_model.peft_config[name]).file_prefix
    state = dict(state)
    for key, layer in adapter_model.adapter_layers():
        convert = getattr(layer, "from_saved", None)
        if convert is None or name not in layer.adapter_names() or layer.top_level_keys:
            continue
        head = f"{prefix}{key}."
        mine = {k[len(head):]: state.pop(k) for k in list(state)
                if k.startswith(head) and "." not in k[len(head):]}
        state.update({head + local: tensor for local, tensor in convert(name, mine).items()})
    return state


def _shape_problems(state: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(key, what is wrong) for each tensor of the file whose shape the model's does not match."""
    return [(k, f"{k}: file has shape {tuple(v.shape)}, model has {tuple(live[k].shape)}")
            for k, v in state.items() if k in live and tuple(v.shape) != tuple(live[k].shape)]


def _dtype_problems(state: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(key, what is wrong) for values the model cannot hold: integer or boolean tensors for
    floating-point weights (a cast would load them silently), complex ones anywhere. Another float
    width (bf16 files) is fine."""
    return [(k, f"{k}: file has dtype {str(v.dtype).removeprefix('torch.')}, model has "
                f"{str(live[k].dtype).removeprefix('torch.')}") for k, v in state.items()
            if k in live and (v.is_floating_point() != live[k].is_floating_point() or v.is_complex())]


def _mismatch_message(adapter_model: Any, name: str, missing: list[str], extra: list[str],
                      problems: list[str], nonfinite: list[str] = (), misfits: set[str] = frozenset()) -> str:
    base = getattr(adapter_model.peft_config.get(name), "base_model_name_or_path", None)
    lines = [f"adapter {name!r} does not fit this model (adapter trained on base model {base!r}):"]
    for label, items in (("shape or dtype mismatch", problems), ("missing from the file", missing),
                         ("in the file but not in the model", extra), ("NaN or infinite values", nonfinite)):
        if items:
            lines.append(f"  {label} ({len(items)}): " + "; ".join(items[:5]) + (" ..." if len(items) > 5 else ""))
    fix = _method_fix(adapter_model, name, misfits)
    if nonfinite and not (missing or extra or problems):
        fix = ("the adapter's training diverged or the file is damaged: load an earlier checkpoint or retrain "
               "(strict=False loads it anyway, with a warning)")
    lines.append(f"  fix: {fix}")
    return "\n".join(lines)


def _method_fix(adapter_model: Any, name: str, misfits: set[str]) -> str:
    """The method's own fix (``MethodSpec.load_fix``); for a composite adapter, that of each part
    whose tensors do not fit (``misfits``: missing, or of the wrong shape); else the generic one."""
    config = adapter_model.peft_config.get(name)
    parts = adapter_model.parts.get(name, [])
    if config is None or not any(part is not None for _, part in parts):
        hook = method_for_config(config).load_fix if config is not None else None
        fix = hook(config) if hook else None
    else:
        fixes = [_part_fix(config, spec, part) for spec, part in parts
                 if spec.load_fix is not None and _part_keys(adapter_model, name, spec) & misfits]
        fix = "; ".join(f for f in fixes if f) or None
    return fix or "load it onto the base model it was trained on, with the same config"


def _part_keys(adapter_model: Any, name: str, spec: Any) -> set[str]:
    """The file keys of adapter ``name``'s tensors held by the layers of composite part ``spec``."""
    prefix = method_for_config(adapter_model.peft_config[name]).file_prefix
    wrappers = tuple(rule.wrapper for rule in spec.layer_rules)
    return {file_key(prefix, key, layer, local) for key, layer in adapter_model.adapter_layers()
            if type(layer) in wrappers and name in layer.adapter_names() for local in layer.adapter_tensors(name)}


def _part_fix(config: Any, spec: Any, part: Any) -> str | None:
    """A part's ``load_fix``, followed by where the composite keeps that part's options."""
    fix = spec.load_fix(part)
    field = next((f for f, (cls, _, _) in config.part_types().items() if isinstance(part, cls)), None)
    if fix is None or field is None:
        return fix
    composite = type(config).__name__
    return (f"its {field} part: {fix}. In this {composite} adapter, set such {type(part).__name__} options in "
            f"its {field} dict instead: config = {composite}.from_pretrained(folder); config.{field}[OPTION] = VALUE; "
            "PeftModel.from_pretrained(base, folder, config=config, ...)")


def write_model_card(folder: str | os.PathLike, config: Any) -> None:
    """A short README.md that says what the adapter is and how to load it."""
    path = Path(folder) / "README.md"
    if path.exists():
        return
    text = (f"---\nlibrary_name: peftkit\nbase_model: {config.base_model_name_or_path}\n---\n\n"
            f"# {config.peft_type} adapter\n\n"
            f"- base model: `{config.base_model_name_or_path}`\n"
            f"- task: `{config.task_type}`\n"
            f"- target modules: `{getattr(config, 'target_modules', None)}`\n\n"
            f"{load_line(method_for_config(config))}\n")
    atomic_write_text(path, text)


def load_line(spec: Any) -> str:
    """How to load a folder of this method (the model card's last line)."""
    if spec.load_hint:
        return spec.load_hint
    also = " (or Hugging Face PEFT's `PeftModel.from_pretrained`)" if spec.hf_format else \
        f" (peftkit's own format: Hugging Face PEFT has no {spec.peft_type} adapters)"
    return f"Load with `peftkit.PeftModel.from_pretrained(base_model, this_folder)`{also}."
