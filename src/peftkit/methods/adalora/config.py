"""AdaLoRA configuration (field names as in HF PEFT's ``AdaLoraConfig``)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from peftkit.config import TargetingConfig, check_field

BIAS_MODES = ("none", "all", "lora_only")
# LoRA fields that HF PEFT writes into AdaLoRA files (its AdaLoraConfig subclasses LoraConfig) but
# that AdaLoRA does not use; at these defaults they are dropped quietly when a file is read.
UNUSED_LORA_FIELDS = {"r": 8, "use_rslora": False, "alpha_pattern": {}, "use_dora": False}


@dataclass
class AdaLoraConfig(TargetingConfig):
    """``h = W0 x + b + lora_alpha / init_r * B diag(E) A dropout(x)``; see methods/adalora/layer.py.

    Training has three phases (steps as counted by the trainer, from 1): up to ``tinit`` every
    layer keeps ``init_r`` triplets; then the total budget falls cubically to ``target_r`` per layer
    at step ``total_step - tfinal``, masking the least important triplets every ``deltaT`` steps;
    the last ``tfinal`` steps train with the final ranks fixed (recorded in ``rank_pattern``).
    """

    init_r: int = field(default=12, metadata={"help": "Rank each adapted layer starts with."})
    target_r: int = field(default=8, metadata={"help": "Average rank per layer at the end of the budget schedule."})
    tinit: int = field(default=0, metadata={"help": "Warm-up steps before any rank is pruned."})
    tfinal: int = field(default=0, metadata={"help": "Final steps that train with the ranks fixed."})
    deltaT: int = field(default=1, metadata={"help": "Steps between two budget allocations."})
    beta1: float = field(default=0.85, metadata={"help": "EMA coefficient of the sensitivity, in (0, 1)."})
    beta2: float = field(default=0.85, metadata={"help": "EMA coefficient of the uncertainty, in (0, 1)."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "Weight of the orthogonality penalty on A and B (>= 0)."})
    total_step: int | None = field(default=None, metadata={"help": "Total optimizer steps of the run (required before wrapping a model; `peftkit train` fills it from the run)."})
    rank_pattern: dict[str, list[bool]] | None = field(default=None, metadata={"help": "Kept triplets per layer, {'<module>.lora_E': [bool] * init_r}; written by the rank allocator."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: scaling = lora_alpha / init_r (kept fixed when ranks are pruned)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the low-rank path, in [0, 1)."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out), as in GPT-2's Conv1D (set per layer type automatically)."})
    bias: str = field(default="none", metadata={"help": "Which biases train: none, all, or lora_only (biases of adapted layers)."})
    init_lora_weights: bool = field(default=True, metadata={"help": "True: E = 0 and A, B ~ N(0, 0.02^2) (no change at start); False: A, E, B ~ N(0, 1) (changes the output)."})

    def check_schedule(self) -> None:
        """total_step is set, and leaves room to prune between tinit and total_step - tfinal."""
        value = self.total_step
        check_field(isinstance(value, int) and value > 0, "total_step", value,
                    "an integer > 0, the run's number of optimizer steps (required before the model is wrapped)")
        check_field(self.tinit < self.total_step - self.tfinal, "tinit", self.tinit,
                    f"< total_step - tfinal = {self.total_step - self.tfinal} so that ranks are pruned at all")

    def __post_init__(self) -> None:
        self.peft_type = "ADALORA"
        super().__post_init__()
        for name in ("init_r", "deltaT"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, name, value, "an integer > 0")
        for name in ("target_r", "tinit", "tfinal"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= 0, name, value, "an integer >= 0")
        if self.total_step is not None:  # may come later: `peftkit train` fills it from the run's length
            self.check_schedule()
        for name in ("beta1", "beta2"):
            check_field(0 < getattr(self, name) < 1, name, getattr(self, name), "a float in (0, 1)")
        check_field(self.orth_reg_weight >= 0, "orth_reg_weight", self.orth_reg_weight, "a number >= 0")
        check_field(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "a number > 0")
        check_field(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "a float in [0, 1)")
        check_field(self.bias in BIAS_MODES, "bias", self.bias, f"one of {BIAS_MODES}")
        check_field(isinstance(self.init_lora_weights, bool), "init_lora_weights", self.init_lora_weights, "True or False")
        for key, kept in (self.rank_pattern or {}).items():
            check_field(isinstance(kept, list) and all(isinstance(k, bool) for k in kept),
                        f"rank_pattern[{key!r}]", kept, "a list of booleans, one per initial triplet")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdaLoraConfig":
        """As the base class, but LoRA fields HF writes into AdaLoRA files are dropped (warned if set)."""
        data = dict(data)
        for key, default in UNUSED_LORA_FIELDS.items():
            if key in data and data.pop(key) != default:
                warnings.warn(f"AdaLoraConfig: field {key!r} is not used by AdaLoRA and is ignored"
                              + (" (the initial rank is init_r)" if key == "r" else ""))
        return super().from_dict(data)

    def rank_for(self, key: str) -> int:
        """Rows of A for module ``key``: the kept triplets if ``rank_pattern`` names it, else init_r."""
        kept = (self.rank_pattern or {}).get(f"{key}.lora_E")
        return self.init_r if kept is None else sum(kept)

    @property
    def scaling(self) -> float:
        """As HF PEFT: lora_alpha / (ranknum + 1e-5) with ranknum = init_r, also after pruning."""
        return self.lora_alpha / (self.init_r + 1e-5)
