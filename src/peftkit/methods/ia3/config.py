"""(IA)^3 configuration (field names as in HF PEFT's ``IA3Config``)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from peftkit.config import TargetingConfig, check_field

# Defaults by ``config.model_type`` when a config leaves them unset, as HF PEFT chooses them:
# (target_modules, feedforward_modules). Keys, values and the feed-forward down projection.
DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2"],
                    (["k_proj", "v_proj", "down_proj"], ["down_proj"])),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], (["key", "value", "output.dense"], ["output.dense"])),
    **dict.fromkeys(["t5", "mt5"], (["k", "v", "wo"], ["wo"])),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "opt": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "distilbert": (["q_lin", "v_lin", "lin2"], ["lin2"]),
}
EXAMPLES = "; ".join(f"{k}: {v[0]} and {v[1]}" for k, v in list(DEFAULTS.items())[:1] + [("bert", DEFAULTS["bert"]), ("gpt2", DEFAULTS["gpt2"])])
# Fields HF PEFT's IA3Config lacks; written only when set, so HF loads our files without a warning.
NOT_IN_HF = ("layers_to_transform", "layers_pattern")


@dataclass
class IA3Config(TargetingConfig):
    """``h = l * (W x + b)`` for attention targets, ``h = W (l * x) + b`` for feed-forward targets."""

    feedforward_modules: list[str] | str | None = field(default=None, metadata={"help": "Targets whose input (not output) is scaled: name suffixes (matched as HF does, by plain string suffix) or a regex on the full name; must be a subset of target_modules."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out), as in GPT-2's Conv1D (set per layer type automatically)."})
    init_ia3_weights: bool = field(default=True, metadata={"help": "True: l = 1 (no change at start); False: l ~ N(0, 1) (changes the output; for tests)."})

    def __post_init__(self) -> None:
        self.peft_type = "IA3"
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        ff = self.feedforward_modules
        check_field(ff is None or isinstance(ff, str) or all(isinstance(m, str) for m in ff),
                    "feedforward_modules", ff, "a list of module names or a regex string")
        check_field(isinstance(self.init_ia3_weights, bool), "init_ia3_weights", self.init_ia3_weights, "True or False")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            check_field(not outside, "feedforward_modules", self.feedforward_modules,
                        f"a subset of target_modules={self.target_modules} (not in it: {outside})")

    def fill_defaults(self, model_type: str | None) -> None:
        """Fill unset targets from HF PEFT's per-architecture choice; keep feed-forward within targets."""
        if self.target_modules is None or self.feedforward_modules is None:
            check_field(model_type in DEFAULTS, "target_modules/feedforward_modules", None,
                        f"both set: peftkit has no IA3 default for model type {model_type!r}; e.g. {EXAMPLES}")
        if self.target_modules is None:
            self.target_modules = list(DEFAULTS[model_type][0])
        if self.feedforward_modules is None:
            ff = DEFAULTS[model_type][1]
            targets = self.target_modules
            self.feedforward_modules = [m for m in ff if isinstance(targets, str) or m in targets]

    def is_feedforward(self, key: str) -> bool:
        """As HF PEFT: a regex must match the whole name; a list entry is a plain string suffix."""
        if isinstance(self.feedforward_modules, str):
            return re.fullmatch(self.feedforward_modules, key) is not None
        return any(key.endswith(name) for name in self.feedforward_modules or [])

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in NOT_IN_HF:
            if data[name] is None:
                del data[name]
        return data
