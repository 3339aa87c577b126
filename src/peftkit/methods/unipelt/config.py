"""UniPELT configuration (Mao et al., 2022): gated LoRA + gated prefix tuning + a gated adapter.

peftkit's own ``peft_type`` "UNIPELT" (HF PEFT has none). Each part's options are the fields of its
own config:

    UniPeltConfig(task_type="SEQ_CLS",
                  lora={"r": 8, "lora_alpha": 16},                 # LoraConfig fields (targets: q/v by model)
                  prefix_tuning={"num_virtual_tokens": 10},       # PrefixTuningConfig fields
                  adapter={"reduction_factor": 16},               # BottleneckConfig fields (Pfeiffer placement)
                  gates=True)

Defaults follow the paper: LoRA of rank 8 on the query and value projections, a prefix of 10 virtual
tokens, a Pfeiffer (after the feed-forward output) adapter of width d / 16 (48 for BERT-base).
``gates=False`` is the paper's ablation: the three methods summed, each exactly its plain method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.config import CompositeConfig, check_field
from peftkit.methods.adapter.config import BottleneckConfig
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.prefix.config import PrefixTuningConfig

LORA_DEFAULTS = {"r": 8, "lora_alpha": 16}
PREFIX_DEFAULTS = {"num_virtual_tokens": 10}
ADAPTER_DEFAULTS = {"placement": "pfeiffer", "reduction_factor": 16}


@dataclass
class UniPeltConfig(CompositeConfig):
    """LoRA, prefix tuning and a bottleneck adapter, each scaled by a learned gate sigmoid(W_g x + b_g)."""

    lora: dict | None = field(default=None, metadata={"help": f"LoraConfig options of the LoRA part, e.g. {{r: 8, target_modules: [q_proj, v_proj]}} (defaults {LORA_DEFAULTS}; targets: the model's query/value projections)."})
    prefix_tuning: dict | None = field(default=None, metadata={"help": f"PrefixTuningConfig options of the prefix part, e.g. {{num_virtual_tokens: 10}} (defaults {PREFIX_DEFAULTS})."})
    adapter: dict | None = field(default=None, metadata={"help": f"BottleneckConfig options of the sequential adapter part, e.g. {{reduction_factor: 16}} (defaults {ADAPTER_DEFAULTS})."})
    gates: bool = field(default=True, metadata={"help": "Scale each part by its learned gate; false: the plain sum of the three methods (the paper's ablation)."})

    def __post_init__(self) -> None:
        self.peft_type = "UNIPELT"
        super().__post_init__()
        check_field(isinstance(self.gates, bool), "gates", self.gates, "true or false")
        placement = self.adapter["placement"]
        check_field(placement != "parallel", "adapter['placement']", placement,
                    "'pfeiffer' or 'houlsby': UniPELT's adapter is sequential (MAM has the parallel one)")

    @classmethod
    def part_types(cls) -> dict[str, tuple[type, dict, dict]]:
        return {"lora": (LoraConfig, LORA_DEFAULTS, {"bias": "none", "use_dora": False}),
                "prefix_tuning": (PrefixTuningConfig, PREFIX_DEFAULTS, {}),
                "adapter": (BottleneckConfig, ADAPTER_DEFAULTS, {})}
