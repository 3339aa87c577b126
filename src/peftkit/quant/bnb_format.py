"""bitsandbytes' 4-bit tensor layout, as pure functions: a ``Linear4bit`` to and from the tensors that
transformers + bitsandbytes save, and ``QuantConfig`` to and from ``quantization_config``.

Per quantized linear layer ``P`` (e.g. ``model.layers.0.self_attn.q_proj``) the safetensors hold

    P.weight                                 uint8 (ceil(n / 2), 1)   packed codes (``nf4`` docstring)
    P.weight.absmax                          float32 (n_blocks,), or uint8 (n_blocks,) with double quant
    P.weight.quant_map                       float32 (16,)            the code table (NF4 or FP4)
    P.weight.nested_absmax                   float32 (n_groups,)      } double quantization only
    P.weight.nested_quant_map                float32 (256,)           } the dynamic map
    P.weight.quant_state.bitsandbytes__nf4   uint8 (k,): UTF-8 JSON {quant_type, blocksize, dtype,
                                             shape, [nested_blocksize, nested_dtype, nested_offset]}
    P.bias                                   unquantized, when the layer has one

Reading never requantizes: the bytes become the layer's buffers as they are. Every check names the
tensor and what is wrong with it.
"""
from __future__ import annotations

import json
from typing import Mapping

import torch

from peftkit.quant import nf4
from peftkit.quant.config import DTYPES, QuantConfig
from peftkit.quant.linear4bit import Linear4bit

STATE_KEY = "weight.quant_state.bitsandbytes__"  # + quant_type
TENSOR_NAMES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class QuantizedFileError(ValueError):
    """A quantized tensor in a checkpoint is missing, malformed or inconsistent."""


# ------------------------------------------------------------------------------------------ writing
def layer_tensors(prefix: str, layer: Linear4bit) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes saves for ``layer`` under ``prefix`` (contiguous CPU copies)."""
    state = layer.quant_state()
    meta = {"quant_type": state.quant_type, "blocksize": state.block_size,
            "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape)}
    out = {"weight": layer.weight.detach().reshape(-1, 1), "weight.absmax": state.absmax,
           "weight.quant_map": nf4.code_table(state.quant_type)}
    if state.nested is not None:
        out |= {"weight.nested_absmax": state.nested.absmax, "weight.nested_quant_map": nf4.DYNAMIC}
        meta |= {"nested_blocksize": state.nested.block_size, "nested_dtype": "float32",
                 "nested_offset": state.nested.offset.item()}
    out[STATE_KEY + state.quant_type] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in out.items()}


def quantization_config(config: QuantConfig, skip: list[str]) -> dict:
    """config.json's ``quantization_config`` for a model quantized with ``config``."""
    if config.block_size != 64:
        raise ValueError(f"bitsandbytes checkpoints use block_size 64; this model was quantized with "
                         f"{config.block_size}: quantize with QuantConfig(block_size=64) to save it in this format")
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": config.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": config.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": config.bnb_4bit_compute_dtype, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": sorted(skip)}


# ------------------------------------------------------------------------------------------ reading
def quant_config_from(raw: dict, where: str) -> QuantConfig:
    """``QuantConfig`` from a ``quantization_config`` dict; anything but bitsandbytes 4-bit is refused."""
    if raw.get("quant_method") != "bitsandbytes":
        raise QuantizedFileError(f"{where}: quantization_config.quant_method is {raw.get('quant_method')!r}; "
                                 "peftkit reads bitsandbytes 4-bit checkpoints only")
    if not raw.get("load_in_4bit") or raw.get("load_in_8bit"):
        raise QuantizedFileError(f"{where}: this is not a 4-bit checkpoint (load_in_4bit="
                                 f"{raw.get('load_in_4bit')}, load_in_8bit={raw.get('load_in_8bit')}); "
                                 "peftkit reads bitsandbytes 4-bit checkpoints only")
    storage = raw.get("bnb_4bit_quant_storage", "uint8")
    if storage not in ("uint8", None):
        raise QuantizedFileError(f"{where}: bnb_4bit_quant_storage={storage!r}; only uint8 storage is supported")
    try:
        return QuantConfig(bnb_4bit_quant_type=raw.get("bnb_4bit_quant_type", "fp4"),
                           bnb_4bit_use_double_quant=bool(raw.get("bnb_4bit_use_double_quant", False)),
                           bnb_4bit_compute_dtype=raw.get("bnb_4bit_compute_dtype") or "float32",
                           llm_int8_skip_modules=raw.get("llm_int8_skip_modules"))
    except ValueError as err:
        raise QuantizedFileError(f"{where}: quantization_config: {err}") from None


def quantized_prefixes(keys) -> list[str]:
    """Module names that have a packed quant state among ``keys``; an unknown quant type is refused."""
    prefixes = []
    for key in keys:
        head, sep, quant_type = key.partition("." + STATE_KEY)
        if not sep:
            continue
        if quant_type not in nf4.QUANT_TYPES:
            raise QuantizedFileError(f"tensor {key!r}: quant type {quant_type!r} is unknown; peftkit reads "
                                     f"{nf4.QUANT_TYPES}")
        prefixes.append(head)
    return sorted(prefixes)


def read_layer(prefix: str, tensors: Mapping[str, torch.Tensor], bias_dtype: torch.dtype | None = None,
               compute_dtype: torch.dtype = torch.float32) -> Linear4bit:
    """The ``Linear4bit`` stored under ``prefix``, its bytes used as they are."""
    meta = _read_meta(prefix, tensors)
    shape = tuple(meta["shape"])
    n_blocks = -(-_numel(shape) // meta["blocksize"])
    packed = _tensor(tensors, f"{prefix}.weight", torch.uint8, (-(-_numel(shape) // 2),))
    nested = _read_nested(prefix, tensors, meta, n_blocks)
    absmax = _tensor(tensors, f"{prefix}.weight.absmax", torch.uint8 if nested else torch.float32, (n_blocks,))
    table = _tensor(tensors, f"{prefix}.weight.quant_map", torch.float32, (16,))
    _same_table(f"{prefix}.weight.quant_map", table, nf4.code_table(meta["quant_type"]), meta["quant_type"])
    state = nf4.QuantState(shape, DTYPES[meta["dtype"]], meta["quant_type"], meta["blocksize"], absmax, nested)
    bias = tensors.get(f"{prefix}.bias")
    if bias is not None:
        bias = _tensor(tensors, f"{prefix}.bias", bias.dtype, (shape[0],))
        bias = bias.to(bias_dtype) if bias_dtype else bias
    return Linear4bit.from_quantized(packed, state, bias, compute_dtype)


def _read_meta(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict:
    keys = [k for k in tensors if k.startswith(f"{prefix}.{STATE_KEY}")]
    if len(keys) != 1:
        raise QuantizedFileError(f"{prefix}: expected one tensor {prefix}.{STATE_KEY}<quant_type>, found {keys}")
    key = keys[0]
    raw = _tensor(tensors, key, torch.uint8, None)
    try:
        meta = json.loads(bytes(raw.flatten().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuantizedFileError(f"tensor {key!r} does not hold UTF-8 JSON ({err}); the checkpoint is corrupt: "
                                 "save it again") from None
    _check_meta(key, meta)
    return meta


def _check_meta(key: str, meta) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise QuantizedFileError(f"tensor {key!r}: {what}, got {meta!r}; the checkpoint is corrupt: save it again")

    need(isinstance(meta, dict), "expected a JSON object")
    need(meta.get("quant_type") == key.rpartition("__")[2], "quant_type must match the key's suffix")
    need(isinstance(meta.get("blocksize"), int) and meta["blocksize"] >= 2 and meta["blocksize"] % 2 == 0,
         "blocksize must be an even integer >= 2")
    need(meta.get("dtype") in DTYPES, f"dtype must be one of {tuple(DTYPES)}")
    shape = meta.get("shape")
    need(isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape),
         "shape must be [out_features, in_features]")
    if "nested_blocksize" in meta:
        need(isinstance(meta["nested_blocksize"], int) and meta["nested_blocksize"] > 0,
             "nested_blocksize must be a positive integer")
        need(isinstance(meta.get("nested_offset"), (int, float)), "nested_offset must be a number")
        need(meta.get("nested_dtype", "float32") == "float32", "nested_dtype must be float32")


def _read_nested(prefix: str, tensors: Mapping[str, torch.Tensor], meta: dict,
                 n_blocks: int) -> nf4.NestedAbsmax | None:
    has_tensor, has_meta = f"{prefix}.weight.nested_absmax" in tensors, "nested_blocksize" in meta
    if has_tensor != has_meta:
        raise QuantizedFileError(f"{prefix}: nested_absmax {'is' if has_tensor else 'is not'} stored but the quant "
                                 f"state {'does not describe' if has_tensor else 'describes'} double quantization")
    if not has_meta:
        return None
    block = meta["nested_blocksize"]
    absmax = _tensor(tensors, f"{prefix}.weight.nested_absmax", torch.float32, (-(-n_blocks // block),))
    table = _tensor(tensors, f"{prefix}.weight.nested_quant_map", torch.float32, (256,))
    _same_table(f"{prefix}.weight.nested_quant_map", table, nf4.DYNAMIC, "the 8-bit dynamic map")
    return nf4.NestedAbsmax(absmax, torch.tensor(float(meta["nested_offset"]), dtype=torch.float32), n_blocks, block)


def _tensor(tensors: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype,
            numel: tuple[int] | None) -> torch.Tensor:
    """``tensors[key]`` flattened, checked for presence, dtype and element count."""
    if key not in tensors:
        raise QuantizedFileError(f"tensor {key!r} is missing from the checkpoint; save it again with all its "
                                 "quantization tensors")
    t = tensors[key]
    if t.dtype != dtype:
        raise QuantizedFileError(f"tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    if numel is not None and t.numel() != numel[0]:
        raise QuantizedFileError(f"tensor {key!r} has shape {tuple(t.shape)} ({t.numel()} values), expected "
                                 f"{numel[0]} values for this layer's shape and block size")
    return t.flatten()


def _same_table(key: str, got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    if not torch.equal(got, want):
        raise QuantizedFileError(f"tensor {key!r} is not {name} (first difference at index "
                                 f"{int((got != want).nonzero()[0])}); peftkit decodes with bitsandbytes' own tables "
                                 "only")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
