"""Training-memory estimates: full fine-tuning vs an adapter method vs the method on a 4-bit base.

Everything but activations is read off the model skeleton (meta device) parameter by parameter,
so the numbers are what PyTorch allocates, not a rule of thumb:

    weights      sum(numel * element size) over parameters and buffers; adapter tensors are fp32
                 (peftkit keeps adapters in fp32 over a half-precision base)
    4-bit base   (QLoRA) every frozen nn.Linear outside the output head/classifier stored as NF4:
                 n/2 bytes of 4-bit codes + one fp32 absmax per block of 64 values
                 (4/64 = 0.0625 byte/param, 0.5625 in all); with double quantization the absmax are
                 8-bit (1/64 byte/param) with one fp32 scale per 256 of them (4/(64*256)) and one fp32
                 offset per tensor: about 0.5159 byte/param
    gradients    sum(numel * element size) over trainable parameters
    AdamW        per trainable tensor: two fp32 moments (8 bytes/param) + a 4-byte fp32 step count
    8-bit AdamW  bitsandbytes' blockwise states: 2 x (1 byte/param + one fp32 scale per 256 values);
                 tensors under 4,096 values keep fp32 states. Paged variants allocate the same bytes
                 as pageable memory that can move to the CPU under pressure (flagged, not subtracted)
    activations  see ``peftkit.analysis.activations`` (per token per block, batch x sequence tokens)

Not counted: the CUDA context and allocator fragmentation (leave ~10% headroom), temporary
buffers inside kernels, and the dequantised copy of one 4-bit weight at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from peftkit.engine.targets import HEAD_NAMES

from . import activations as act
from .params import count
from .shapes import ModelSource, build_meta

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")
NF4_BLOCK, DQ_BLOCK, ADAM8_BLOCK, ADAM8_MIN_SIZE = 64, 256, 256, 4096
GIB = 1024 ** 3


@dataclass
class MemoryOptions:
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    seq_len: int = field(default=512, metadata={"help": "tokens per sequence"})
    dtype: Literal["fp32", "bf16", "fp16"] = field(default="bf16", metadata={"help": "base weight and compute dtype"})
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit"] = field(
        default="adamw", metadata={"help": "optimizer whose states are counted"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "keep only block inputs, recompute in backward"})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: quantize the NF4 absmax constants too"})

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")

    @property
    def element_size(self) -> int:
        return torch.tensor([], dtype=DTYPES[self.dtype]).element_size()


@dataclass
class MemoryEstimate:
    regime: str  # "full", the method's name, or "q" + name (4-bit base)
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: act.ActivationBytes
    paged_optimizer: bool = False
    four_bit: bool = False
    mergeable: bool = True  # every adapter layer can fold into the base weights

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations.peak

    def to_dict(self) -> dict:
        a = self.activations
        return {"regime": self.regime, "trainable_params": self.trainable, "weights_bytes": int(self.weights),
                "gradients_bytes": int(self.gradients), "optimizer_bytes": int(self.optimizer),
                "activations_bytes": int(a.peak), "activations_blocks_bytes": int(a.blocks),
                "activations_outside_bytes": int(a.outside), "activations_recompute_bytes": int(a.recompute),
                "total_bytes": int(self.total), "total_gib": round(self.total / GIB, 3),
                "paged_optimizer": self.paged_optimizer,
                "four_bit_base": self.four_bit}


# ------------------------------------------------------------------------------------ byte formulas
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def nf4_bytes(n: int, double_quant: bool) -> float:
    """Bytes of one n-value weight stored as NF4 (see the module docstring)."""
    blocks = math.ceil(n / NF4_BLOCK)
    if not double_quant:
        return math.ceil(n / 2) + 4 * blocks
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4


def adam_state_bytes(n: int, optimizer: str) -> int:
    """Optimizer state of one trainable tensor of n values."""
    if optimizer.endswith("8bit") and n >= ADAM8_MIN_SIZE:
        return 2 * (n + 4 * math.ceil(n / ADAM8_BLOCK)) + 4
    return 2 * 4 * n + 4


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def quantizable(model: nn.Module) -> list[torch.Tensor]:
    """Weights a 4-bit loader quantizes: frozen nn.Linear weights outside the output head/classifier."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for key, module in model.named_modules():
        if type(module) is not nn.Linear or module is head or module.weight.requires_grad:
            continue
        if not any(part in HEAD_NAMES for part in key.split(".")):
            found.append(module.weight)
    return found


def weight_bytes(model: nn.Module, four_bit: bool, double_quant: bool) -> float:
    every = tensor_bytes([*model.parameters(), *model.buffers()])
    if not four_bit:
        return every
    quant = quantizable(model)
    return every - tensor_bytes(quant) + sum(nf4_bytes(w.numel(), double_quant) for w in quant)


# ------------------------------------------------------------------------------------ the regimes
def measure(model: nn.Module, regime: str, shape: act.BlockShape, opts: MemoryOptions,
            four_bit: bool = False) -> MemoryEstimate:
    """Estimate for a model whose parameters already say what trains (requires_grad)."""
    train = trainable(model)
    trains = act.read_training(model, shape.style)
    activations = act.activation_bytes(shape, trains, opts.batch_size, opts.seq_len, opts.element_size,
                                       opts.gradient_checkpointing)
    return MemoryEstimate(regime, sum(p.numel() for p in train), weight_bytes(model, four_bit, opts.double_quant),
                          tensor_bytes(train), sum(adam_state_bytes(p.numel(), opts.optimizer) for p in train),
                          activations, opts.optimizer.startswith("paged"), four_bit)


def full_finetune(src: ModelSource, opts: MemoryOptions) -> MemoryEstimate:
    model = build_meta(src).to(DTYPES[opts.dtype])
    model.requires_grad_(True)
    return measure(model, "full", act.BlockShape.from_config(src.config), opts)


def with_method(src: ModelSource, method_config, opts: MemoryOptions, four_bit: bool = False,
                method: str | None = None) -> MemoryEstimate:
    """The method's adapter on the skeleton (``four_bit``: over an NF4 base, as QLoRA); ``method``
    names it (default: the method the config belongs to)."""
    import copy

    params, model = count(build_meta(src).to(DTYPES[opts.dtype]), copy.deepcopy(method_config), method)
    regime = ("q" if four_bit else "") + params.method
    estimate = measure(model, regime, act.BlockShape.from_config(src.config), opts, four_bit)
    estimate.mergeable = params.mergeable
    return estimate


def compare(src: ModelSource, method_config, opts: MemoryOptions, method: str | None = None) -> list[MemoryEstimate]:
    """Full fine-tuning, the method in ``opts.dtype``, and the method over a 4-bit base where it has
    a layer for one."""
    from peftkit.registry import get_method, method_for_config

    spec = get_method(method) if method else method_for_config(method_config)
    bases = (False, True) if adapts_4bit(spec, method_config) else (False,)
    return [full_finetune(src, opts)] + [with_method(src, method_config, opts, b, spec.name) for b in bases]


def adapts_4bit(spec, config) -> bool:
    """Whether the method has a layer for a 4-bit base linear (only those can train on one)."""
    from peftkit.quant.linear4bit import Linear4bit

    probe = Linear4bit(64, 64, bias=False)
    wrapper = spec.wrapper_for(probe, config)
    try:
        return wrapper is not None and wrapper(probe) is not None
    except (TypeError, ValueError):  # a catch-all rule that refuses the layer type (DoRA's)
        return False
