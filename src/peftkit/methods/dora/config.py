"""DoRA configuration: LoRA's fields (HF PEFT's ``LoraConfig``) with ``use_dora`` fixed to True."""
from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.config import check_field
from peftkit.methods.lora.config import LoraConfig


@dataclass
class DoraConfig(LoraConfig):
    """``h = m * (W0 + s B A) x / ||W0 + s B A|| + b``; see methods/dora/layer.py.

    Saved as HF PEFT saves it: ``peft_type`` "LORA" with ``use_dora`` true, so
    ``LoraConfig(use_dora=True)`` (as HF users write it) builds the same adapter.
    """

    use_dora: bool = field(default=True, metadata={"help": "Weight-decomposed LoRA; always True for DoraConfig."})

    def __post_init__(self) -> None:
        check_field(self.use_dora is True, "use_dora", self.use_dora,
                    "True for DoraConfig (use LoraConfig for plain LoRA)")
        super().__post_init__()
