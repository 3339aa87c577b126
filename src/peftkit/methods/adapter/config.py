"""Bottleneck adapter configuration (Houlsby et al., 2019; Pfeiffer et al., 2020; AdapterDrop).

HF PEFT has no bottleneck adapter, so ``peft_type`` is peftkit's own "BOTTLENECK" and HF PEFT cannot
load these files; the folder layout (adapter_config.json + adapter_model.safetensors) and the JSON
style (``target_modules``, ``layers_to_transform``, ...) are HF PEFT's, so tools that read that format
still parse them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peftkit.config import TargetingConfig, check_field

PLACEMENT_NAMES = ("houlsby", "pfeiffer", "parallel")
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
DROP_MODES = ("both", "train", "inference")

# Default targets (the modules whose OUTPUT gets an adapter) by placement and ``config.model_type``.
# Houlsby: after the attention output projection and after the feed-forward output of each block;
# Pfeiffer: after the feed-forward output only. BERT's FFN output is "layer.N.output.dense", whose
# suffix "output.dense" also names the attention output, hence the regex.
# Parallel (He et al., 2022): beside the whole feed-forward block, whose INPUT the adapter reads; for
# BERT that block is BertOutput ("layer.N.output"), whose input_tensor argument is the FFN input.
_LLAMA = {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"], "parallel": ["mlp"]}
_BERT = {"houlsby": ["output.dense"], "pfeiffer": r"(?:.*\.)?layer\.\d+\.output\.dense",
         "parallel": r"(?:.*\.)?layer\.\d+\.output"}
PLACEMENTS: dict[str, dict[str, list[str] | str]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"], _LLAMA),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], _BERT),
    "gpt2": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"], "parallel": ["mlp"]},
}


@dataclass
class BottleneckConfig(TargetingConfig):
    """``h <- h + scaling * up(act(down(h)))`` on each target's output (methods/adapter/layer.py); with
    ``placement="parallel"`` ``FFN(x) + scaling * up(act(down(x)))`` beside each feed-forward block
    (methods/adapter/parallel.py)."""

    placement: Literal["houlsby", "pfeiffer", "parallel"] = field(default="pfeiffer", metadata={"help": "Where adapters go: 'houlsby' (after the attention output and the feed-forward output of each block) or 'pfeiffer' (after the feed-forward output only), both sequential on a linear's output; 'parallel' (He et al., 2022): beside each feed-forward BLOCK (targets are blocks such as 'mlp'), reading the block's input."})
    reduction_factor: int = field(default=16, metadata={"help": "Bottleneck width m = d // reduction_factor (at least 1), d being the target's output width."})
    bottleneck_size: int | None = field(default=None, metadata={"help": "Fixed bottleneck width m for every target; overrides reduction_factor when set."})
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = field(default="relu", metadata={"help": "Activation between down and up: relu, gelu, silu or tanh."})
    scaling: float = field(default=1.0, metadata={"help": "Factor s on the adapter's output: h + s * up(act(down(h)))."})
    init_weights: bool = field(default=True, metadata={"help": "True: up = 0, so a fresh adapter changes nothing; False: up random too (changes the output; for tests)."})
    adapter_drop: list[int] | None = field(default=None, metadata={"help": "AdapterDrop: block indices (as in layers_to_transform) whose adapters are skipped."})
    adapter_drop_lowest: int = field(default=0, metadata={"help": "AdapterDrop: also skip the adapters of the lowest k blocks (0 .. k-1)."})
    adapter_drop_mode: Literal["both", "train", "inference"] = field(default="both", metadata={"help": "When dropped adapters are skipped: 'both', 'train' (only in training mode) or 'inference' (only in eval mode)."})

    def __post_init__(self) -> None:
        self.peft_type = "BOTTLENECK"
        super().__post_init__()
        check_field(self.placement in PLACEMENT_NAMES, "placement", self.placement,
                    "'houlsby' or 'pfeiffer' (sequential), or 'parallel' (beside the feed-forward block)")
        check_field(_positive_int(self.reduction_factor), "reduction_factor", self.reduction_factor, "an integer >= 1")
        check_field(self.bottleneck_size is None or _positive_int(self.bottleneck_size), "bottleneck_size",
                    self.bottleneck_size, "None or an integer >= 1")
        check_field(self.non_linearity in NON_LINEARITIES, "non_linearity", self.non_linearity, f"one of {NON_LINEARITIES}")
        check_field(isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool), "scaling",
                    self.scaling, "a number")
        check_field(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "True or False")
        if isinstance(self.adapter_drop, (set, tuple)):
            self.adapter_drop = sorted(self.adapter_drop)
        drop = self.adapter_drop
        check_field(drop is None or (isinstance(drop, list) and all(isinstance(i, int) and i >= 0 for i in drop)),
                    "adapter_drop", drop, "None or a list of block indices >= 0 (e.g. [0, 1])")
        check_field(isinstance(self.adapter_drop_lowest, int) and self.adapter_drop_lowest >= 0,
                    "adapter_drop_lowest", self.adapter_drop_lowest, "an integer >= 0 (0: drop none)")
        check_field(self.adapter_drop_mode in DROP_MODES, "adapter_drop_mode", self.adapter_drop_mode, f"one of {DROP_MODES}")
        check_field(self.placement != "parallel" or not self.dropped_blocks(), "adapter_drop", self.adapter_drop or
                    self.adapter_drop_lowest, "no AdapterDrop with placement='parallel' (it applies to sequential adapters)")

    def fill_defaults(self, model_type: str | None) -> None:
        """Fill unset target_modules from ``placement`` for this architecture."""
        if self.target_modules is not None:
            return
        examples = "; ".join(f"{k}: {PLACEMENTS[k][self.placement]!r}" for k in ("llama", "bert", "gpt2"))
        check_field(model_type in PLACEMENTS, "target_modules", None,
                    f"to be set: peftkit has no {self.placement} placement for model type {model_type!r} "
                    f"(known: {sorted(PLACEMENTS)}); name the modules whose output gets an adapter, e.g. {examples}")
        value = PLACEMENTS[model_type][self.placement]
        self.target_modules = list(value) if isinstance(value, list) else value

    def bottleneck_for(self, width: int) -> int:
        """m for a target whose output has ``width`` features."""
        return self.bottleneck_size or max(1, width // self.reduction_factor)

    def dropped_blocks(self) -> set[int]:
        return set(self.adapter_drop or []) | set(range(self.adapter_drop_lowest))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
