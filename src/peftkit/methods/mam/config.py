"""MAM adapter configuration (He et al., 2022): prefix tuning + a scaled parallel adapter on the FFN.

peftkit's own ``peft_type`` "MAM" (HF PEFT has none). The options of each part are the fields of
that part's own config, so one vocabulary holds everywhere:

    MamConfig(task_type="CAUSAL_LM",
              prefix_tuning={"num_virtual_tokens": 30},                       # PrefixTuningConfig fields
              parallel_adapter={"reduction_factor": 2, "scaling": 4.0})      # BottleneckConfig fields

Defaults follow the paper's MAM: a prefix of 30 virtual tokens (P-tuning v2 style, trained
directly) and a parallel adapter with s = 4 and ReLU whose width is d / 2, the paper's 512 for its
d = 1024 models, scaled to the model (192 for MiniLM's d = 384, 288 for SmolLM2's 576).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.config import CompositeConfig
from peftkit.methods.adapter.config import BottleneckConfig
from peftkit.methods.prefix.config import PrefixTuningConfig

PREFIX_DEFAULTS = {"num_virtual_tokens": 30}
ADAPTER_DEFAULTS = {"reduction_factor": 2, "scaling": 4.0, "non_linearity": "relu"}


@dataclass
class MamConfig(CompositeConfig):
    """Prefix tuning on every attention layer + a scaled parallel adapter beside every FFN block."""

    prefix_tuning: dict | None = field(default=None, metadata={"help": f"PrefixTuningConfig options of the prefix part, e.g. {{num_virtual_tokens: 30}} (defaults {PREFIX_DEFAULTS})."})
    parallel_adapter: dict | None = field(default=None, metadata={"help": f"BottleneckConfig options of the parallel FFN adapter, e.g. {{bottleneck_size: 64, scaling: 4.0}}; placement is always 'parallel' (defaults {ADAPTER_DEFAULTS})."})

    def __post_init__(self) -> None:
        self.peft_type = "MAM"
        super().__post_init__()

    @classmethod
    def part_types(cls) -> dict[str, tuple[type, dict, dict]]:
        return {"prefix_tuning": (PrefixTuningConfig, PREFIX_DEFAULTS, {}),
                "parallel_adapter": (BottleneckConfig, ADAPTER_DEFAULTS, {"placement": "parallel"})}
