"""LoRA configuration (field names as in HF PEFT's ``LoraConfig``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from peftkit.config import TargetingConfig, check_field

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")


@dataclass
class LoraConfig(TargetingConfig):
    """``h = W0 x + (lora_alpha / r) * B A dropout(x)``; see methods/lora/layer.py."""

    r: int = field(default=8, metadata={"help": "Rank of the update B A."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: scaling = lora_alpha / r (or / sqrt(r) with use_rslora)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the low-rank path, in [0, 1)."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out), as in GPT-2's Conv1D."})
    bias: str = field(default="none", metadata={"help": "Which biases train: none, all, or lora_only (biases of adapted layers)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling lora_alpha / sqrt(r)."})
    init_lora_weights: bool | str = field(default=True, metadata={"help": "True: kaiming-uniform A, zero B (no change at start); 'gaussian': normal A; False: random B too (changes the output)."})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module rank: {regex on module name suffix: r}."})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "Per-module alpha: {regex on module name suffix: alpha}."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA): True builds a DoRA adapter, as in HF PEFT."})

    def __post_init__(self) -> None:
        self.peft_type = "LORA"
        super().__post_init__()
        check_field(isinstance(self.r, int) and self.r > 0, "r", self.r, "an integer > 0")
        check_field(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "a number > 0")
        check_field(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "a float in [0, 1)")
        check_field(self.bias in BIAS_MODES, "bias", self.bias, f"one of {BIAS_MODES}")
        check_field(self.init_lora_weights in INIT_MODES, "init_lora_weights", self.init_lora_weights, f"one of {INIT_MODES}")
        for key, rank in self.rank_pattern.items():
            check_field(isinstance(rank, int) and rank > 0, f"rank_pattern[{key!r}]", rank, "an integer > 0")

    def rank_for(self, key: str) -> int:
        from peftkit.engine.targets import pattern_value
        return pattern_value(self.rank_pattern, key, self.r)

    def alpha_for(self, key: str) -> float:
        from peftkit.engine.targets import pattern_value
        return pattern_value(self.alpha_pattern, key, self.lora_alpha)

    def scaling_for(self, key: str) -> float:
        r, alpha = self.rank_for(key), self.alpha_for(key)
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r
