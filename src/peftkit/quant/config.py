"""QuantConfig: how ``quantize_model`` stores a model's linear layers (names as in HF's BitsAndBytesConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from peftkit.config import check_field
from peftkit.quant.nf4 import QUANT_TYPES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class QuantConfig:
    """4-bit storage of every linear layer but the skipped ones; see ``peftkit.quant.quantize_model``."""

    load_in_4bit: bool = field(default=True, metadata={"help": "Store linear weights in 4 bits (the only mode; False is refused)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "Code: nf4 (NormalFloat) or fp4 (E2M1)."})
    bnb_4bit_use_double_quant: bool = field(default=False, metadata={"help": "Quantize the per-block absmax constants to 8 bits too (~0.37 bits/weight saved)."})
    bnb_4bit_compute_dtype: str | torch.dtype = field(default="float32", metadata={"help": "dtype the weight is rebuilt in for each matmul: float32, bfloat16 or float16."})
    llm_int8_skip_modules: list[str] | None = field(default=None, metadata={"help": "Module names (or name suffixes) kept in full precision; None: the output head / classifier."})
    block_size: int = field(default=64, metadata={"help": "Weights per absmax block (peftkit only; bitsandbytes uses 64)."})

    def __post_init__(self) -> None:
        check_field(self.load_in_4bit is True, "load_in_4bit", self.load_in_4bit,
                    "True (peftkit quantizes to 4 bits only; leave the model unquantized instead)")
        check_field(self.bnb_4bit_quant_type in QUANT_TYPES, "bnb_4bit_quant_type", self.bnb_4bit_quant_type,
                    f"one of {QUANT_TYPES}")
        if isinstance(self.bnb_4bit_compute_dtype, torch.dtype):
            self.bnb_4bit_compute_dtype = str(self.bnb_4bit_compute_dtype).removeprefix("torch.")
        check_field(self.bnb_4bit_compute_dtype in DTYPES, "bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype,
                    f"one of {tuple(DTYPES)}")
        check_field(isinstance(self.block_size, int) and self.block_size >= 2 and self.block_size % 2 == 0,
                    "block_size", self.block_size, "an even integer >= 2")

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.bnb_4bit_compute_dtype]
