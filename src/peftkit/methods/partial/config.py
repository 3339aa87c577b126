"""Partial fine-tuning configuration (peftkit's own format, ``peft_type`` "PARTIAL")."""
from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.config import PeftConfig, check_field


@dataclass
class PartialConfig(PeftConfig):
    """Train every parameter of the top ``num_top_layers`` blocks (or of ``layers_to_transform``),
    as full-size deltas; see methods/partial/layer.py. Blocks are found from the model's structure:
    the list of repeated modules (``model.layers``, ``encoder.layer``, ``transformer.h``)."""

    num_top_layers: int = field(default=2, metadata={"help": "Train the last k blocks (those nearest the output). Ignored when layers_to_transform is set."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Train exactly these block indices (0 = nearest the input) instead of the top num_top_layers."})
    layers_pattern: str | None = field(default=None, metadata={"help": "Name (or dotted suffix) of the block list, needed only when a model has several (encoder and decoder), e.g. 'decoder.block'."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Restrict training inside the chosen blocks to these modules (name suffixes or a regex on full names); None: every module with parameters."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules inside the chosen blocks that stay frozen (same syntax as target_modules)."})
    train_head: bool = field(default=False, metadata={"help": "Also train the output head (LM head or classifier) in full, as a modules_to_save copy."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved with the adapter (the classifier head is added for classification)."})
    init_partial_weights: bool = field(default=True, metadata={"help": "True: deltas start at 0 (no change); False: N(0, 0.02^2) (changes the output; for tests)."})

    def __post_init__(self) -> None:
        self.peft_type = "PARTIAL"
        super().__post_init__()
        k = self.num_top_layers
        check_field(isinstance(k, int) and not isinstance(k, bool) and k > 0, "num_top_layers", k, "an integer > 0")
        layers = self.layers_to_transform
        if isinstance(layers, int) and not isinstance(layers, bool):
            self.layers_to_transform = layers = [layers]
        check_field(layers is None or (isinstance(layers, list) and layers and all(isinstance(i, int) and i >= 0 for i in layers)),
                    "layers_to_transform", layers, "None or a non-empty list of block indices >= 0")
        check_field(self.layers_pattern is None or isinstance(self.layers_pattern, str), "layers_pattern",
                    self.layers_pattern, "None or the name of the block list, e.g. 'layers'")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            check_field(value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
                        name, value, "None, a list of module names or a regex string")
        for name in ("train_head", "init_partial_weights"):
            check_field(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)

    def block_indices(self, count: int) -> list[int]:
        """The chosen block indices for a model with ``count`` blocks."""
        if self.layers_to_transform is None:
            check_field(self.num_top_layers <= count, "num_top_layers", self.num_top_layers,
                        f"at most the model's {count} blocks")
            return list(range(count - self.num_top_layers, count))
        outside = [i for i in self.layers_to_transform if i >= count]
        check_field(not outside, "layers_to_transform", self.layers_to_transform,
                    f"indices below the model's {count} blocks (out of range: {outside})")
        return sorted(set(self.layers_to_transform))
