"""Load and save whole models in bitsandbytes' 4-bit checkpoint format, without bitsandbytes.

    model = load_quantized_model("llama-7b-bnb-4bit")          # a folder saved by transformers + bnb
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(target_modules="all-linear"))
    save_quantized_model(quantize_model(model, QuantConfig(bnb_4bit_use_double_quant=True)), "out")

Loading builds the transformers model from config.json without its ``quantization_config``, its
parameters on the meta device (no memory, no initialisation; buffers such as rotary tables are
made as usual), puts a ``Linear4bit`` holding the stored bytes where each quantized linear layer
is, and assigns every other stored tensor. The result is what ``quantize_model`` returns.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from peftkit.engine.layer import AdapterLayer
from peftkit.io.atomic import atomic_write_text, atomic_write_with
from peftkit.quant import bnb_format
from peftkit.quant.bnb_format import QuantizedFileError
from peftkit.quant.config import QuantConfig
from peftkit.quant.linear4bit import Linear4bit

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def bnb_quantization_config(folder: str | Path) -> dict | None:
    """config.json's ``quantization_config`` when it is bitsandbytes', else None."""
    path = Path(folder) / "config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    qc = raw.get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes" else None


def load_quantized_model(folder: str | Path, dtype: torch.dtype | None = None, model_class=None) -> nn.Module:
    """A transformers model with the 4-bit layers of a bitsandbytes checkpoint as ``Linear4bit``.

    ``dtype``: for the unquantized tensors (embeddings, norms, head, biases); default as stored.
    ``model_class``: a transformers model class; default: config.json's first architecture.
    """
    folder = Path(folder)
    config, quant = _config(folder)
    tensors = read_safetensors(folder)
    model = _empty_model(config, model_class)
    for prefix in bnb_format.quantized_prefixes(tensors):
        _check_target(model, prefix)
        model.set_submodule(prefix, bnb_format.read_layer(prefix, tensors, dtype, quant.compute_dtype))
        tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix + ".")}
    _assign(model, {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in tensors.items()}, folder)
    model.peftkit_quant_config = quant  # what it was quantized with (save_quantized_model reuses it)
    return model.eval()


def save_quantized_model(model: nn.Module, folder: str | Path, config: QuantConfig | None = None) -> None:
    """Write ``model`` (quantized by ``quantize_model`` or loaded by ``load_quantized_model``) as
    config.json + model.safetensors in bitsandbytes' layout, each file atomically."""
    from safetensors.torch import save_file

    layers = {k: m for k, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError("save_quantized_model needs a model with Linear4bit layers: call quantize_model first")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("save_quantized_model writes a base model, but this one holds adapters: save the adapter "
                         "with save_pretrained, or merge_and_unload first")
    config = config or getattr(model, "peftkit_quant_config", None) or _config_of(layers)
    tensors = {}
    for prefix, layer in layers.items():
        tensors |= bnb_format.layer_tensors(prefix, layer)
    for key, value in model.state_dict().items():
        if not any(key.startswith(p + ".") for p in layers):
            tensors[key] = value.detach().cpu().contiguous().clone()
    _drop_tied(model, tensors)
    raw = model.config.to_dict()
    raw["quantization_config"] = bnb_format.quantization_config(config, _unquantized_linears(model, layers))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_with(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(folder / "config.json", json.dumps(raw, indent=2, sort_keys=True) + "\n")


# -------------------------------------------------------------------------------------- reading
def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards its index names."""
    from safetensors.torch import load_file

    if (folder / INDEX).is_file():
        shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    elif (folder / WEIGHTS).is_file():
        shards = [WEIGHTS]
    else:
        raise FileNotFoundError(f"{folder} holds neither {WEIGHTS} nor {INDEX}: pass a folder written by "
                                "save_pretrained with safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors |= load_file(str(folder / shard))
    return tensors


def _config(folder: Path):
    from transformers import AutoConfig

    raw = bnb_quantization_config(folder)
    if raw is None:
        raise QuantizedFileError(f"{folder}/config.json has no bitsandbytes quantization_config; load this "
                                 "model with from_pretrained (and quantize_model to quantize it)")
    quant = bnb_format.quant_config_from(raw, f"{folder}/config.json")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config, quant


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters registered inside live on the meta device, so building a model allocates and
    initialises nothing; buffers stay real (rotary tables are computed in __init__, never stored)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _empty_model(config, model_class) -> nn.Module:
    import transformers

    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        model_class = model_class or transformers.AutoModelForCausalLM
    with parameters_on_meta():
        if hasattr(model_class, "from_config"):  # an Auto class
            return model_class.from_config(config)
        return model_class(config)


def _check_target(model: nn.Module, prefix: str) -> None:
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        raise QuantizedFileError(f"the checkpoint quantizes {prefix!r}, which {type(model).__name__} does not "
                                 "have; the config.json and the weights do not belong together") from None
    if not isinstance(module, nn.Linear):
        raise QuantizedFileError(f"the checkpoint quantizes {prefix!r}, a {type(module).__name__} in "
                                 f"{type(model).__name__}; only nn.Linear layers can be 4-bit")


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise QuantizedFileError(f"{folder}: tensors the model does not have: {sorted(result.unexpected_keys)[:8]}")
    model.tie_weights()
    missing = sorted(k for k, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta")
    if missing:
        raise QuantizedFileError(f"{folder}: tensors missing from the checkpoint: {missing[:8]}")


# -------------------------------------------------------------------------------------- writing
def _config_of(layers: dict[str, Linear4bit]) -> QuantConfig:
    first = next(iter(layers.values()))
    return QuantConfig(bnb_4bit_quant_type=first.quant_type, bnb_4bit_use_double_quant=first.double_quant,
                       bnb_4bit_compute_dtype=first.compute_dtype, block_size=first.block_size)


def _unquantized_linears(model: nn.Module, layers: dict[str, Linear4bit]) -> list[str]:
    """Linear layers left in full precision (llm_int8_skip_modules, as transformers writes it)."""
    plain = {k for k, m in model.named_modules() if isinstance(m, nn.Linear) and k not in layers}
    return sorted({k.rpartition(".")[2] for k in plain})


def _drop_tied(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Keep one copy of tied parameters (the output head sharing the input embeddings)."""
    seen: dict[int, str] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen and key in tensors:
            del tensors[key]
        seen.setdefault(id(param), key)
