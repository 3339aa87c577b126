"""LoRA configuration (field names as in HF PEFT's ``LoraConfig`` and ``LoftQConfig``)."""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from peftkit.config import TargetingConfig, check_field

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")
# Initialisations computed from the base weight, which they rewrite (methods/lora/inits.py).
WEIGHT_INITS = ("pissa", "olora", "loftq")
PISSA_NITER = re.compile(r"^pissa_niter_(\d+)$")
INIT_HELP = ("one of True, False, 'gaussian', 'pissa', 'pissa_niter_K' (randomized SVD with K >= 1 subspace "
             "iterations), 'olora' or 'loftq' (with loftq_config)")


def valid_init(mode: object) -> bool:
    if isinstance(mode, bool):
        return True
    niter = PISSA_NITER.match(mode) if isinstance(mode, str) else None
    return mode == "gaussian" or mode in WEIGHT_INITS or (niter is not None and int(niter.group(1)) >= 1)


def is_weight_init(mode: object) -> bool:
    """True for the initialisations that derive A, B from W and rewrite W (PiSSA, OLoRA, LoftQ)."""
    return isinstance(mode, str) and mode != "gaussian" and valid_init(mode)


@dataclass
class LoftQConfig:
    """LoftQ's options (Li et al., 2023), as HF PEFT's ``LoftQConfig``: the base weight becomes an NF4
    quantization Q and the adapter the rank-r SVD of what Q misses, alternated ``loftq_iter`` times."""

    loftq_bits: int = field(default=4, metadata={"help": "Bits of the quantized base: 4 (peftkit's NF4)."})
    loftq_iter: int = field(default=1, metadata={"help": "Alternations of quantizing and SVD, >= 1."})

    def __post_init__(self) -> None:
        check_field(self.loftq_bits == 4 and not isinstance(self.loftq_bits, bool), "loftq_bits", self.loftq_bits,
                    "4 (peftkit's LoftQ quantizes with its own NF4 code; HF PEFT's 8-bit variant needs "
                    "bitsandbytes' int8, which peftkit does not have)")
        check_field(isinstance(self.loftq_iter, int) and not isinstance(self.loftq_iter, bool) and self.loftq_iter >= 1,
                    "loftq_iter", self.loftq_iter, "an integer >= 1")


@dataclass
class LoraConfig(TargetingConfig):
    """``h = W0 x + (lora_alpha / r) * B A dropout(x)``; see methods/lora/layer.py."""

    r: int = field(default=8, metadata={"help": "Rank of the update B A."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: scaling = lora_alpha / r (or / sqrt(r) with use_rslora)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the low-rank path, in [0, 1)."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out), as in GPT-2's Conv1D."})
    bias: str = field(default="none", metadata={"help": "Which biases train: none, all, or lora_only (biases of adapted layers)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling lora_alpha / sqrt(r)."})
    init_lora_weights: bool | str = field(default=True, metadata={"help": "True: kaiming-uniform A, zero B (no change at start); 'gaussian': normal A; False: random B too (changes the output); 'pissa' / 'pissa_niter_K': A, B from the top-r singular triplets of W, base = the residual; 'olora': from a QR of W; 'loftq': base = NF4 quantization, A, B = SVD of its error (see methods/lora/inits.py)."})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module rank: {regex on module name suffix: r}."})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "Per-module alpha: {regex on module name suffix: alpha}."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA): True builds a DoRA adapter, as in HF PEFT."})
    loftq_config: dict[str, int] = field(default_factory=dict, metadata={"help": "LoftQ options with init_lora_weights='loftq', e.g. {loftq_bits: 4, loftq_iter: 1} (a LoftQConfig or a dict)."})

    def __post_init__(self) -> None:
        self.peft_type = "LORA"
        if isinstance(self.loftq_config, LoftQConfig):  # stored as a dict, as HF does (and as the field is typed)
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        super().__post_init__()
        check_field(isinstance(self.r, int) and self.r > 0, "r", self.r, "an integer > 0")
        check_field(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "a number > 0")
        check_field(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "a float in [0, 1)")
        check_field(self.bias in BIAS_MODES, "bias", self.bias, f"one of {BIAS_MODES}")
        check_field(valid_init(self.init_lora_weights), "init_lora_weights", self.init_lora_weights, INIT_HELP)
        for key, rank in self.rank_pattern.items():
            check_field(isinstance(rank, int) and rank > 0, f"rank_pattern[{key!r}]", rank, "an integer > 0")
        self._check_weight_init()

    def _check_weight_init(self) -> None:
        """LoftQ options only with 'loftq' (dropped with a warning otherwise, as HF does); no DoRA on
        an initialisation that rewrites the base weight."""
        if self.init_lora_weights == "loftq":
            check_field(bool(self.loftq_config), "loftq_config", self.loftq_config,
                        "LoftQ options with init_lora_weights='loftq', e.g. loftq_config=LoftQConfig(loftq_bits=4) "
                        "(CLI: --loftq-config '{loftq_bits: 4, loftq_iter: 1}')")
            try:
                self.loftq_config = dataclasses.asdict(LoftQConfig(**self.loftq_config))
            except TypeError as err:
                raise ValueError(f"loftq_config={self.loftq_config!r} is invalid: expected the fields of "
                                 f"LoftQConfig (loftq_bits, loftq_iter) ({err})") from None
        elif self.loftq_config:
            warnings.warn(f"loftq_config={self.loftq_config!r} is ignored: init_lora_weights is "
                          f"{self.init_lora_weights!r}, not 'loftq'")
            self.loftq_config = {}
        check_field(not (self.use_dora and is_weight_init(self.init_lora_weights)), "init_lora_weights",
                    self.init_lora_weights, "True, False or 'gaussian' with use_dora=True (peftkit's DoRA does not "
                    "take PiSSA/OLoRA/LoftQ initialisations; use plain LoRA for them)")

    def rank_for(self, key: str) -> int:
        from peftkit.engine.targets import pattern_value
        return pattern_value(self.rank_pattern, key, self.r)

    def alpha_for(self, key: str) -> float:
        from peftkit.engine.targets import pattern_value
        return pattern_value(self.alpha_pattern, key, self.lora_alpha)

    def scaling_for(self, key: str) -> float:
        r, alpha = self.rank_for(key), self.alpha_for(key)
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r
