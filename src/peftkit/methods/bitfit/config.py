"""BitFit configuration (peftkit's own format: HF PEFT has no BitFit, ``peft_type`` "BITFIT")."""
from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.config import TargetingConfig, check_field
from peftkit.engine.targets import ALL_LINEAR


@dataclass
class BitFitConfig(TargetingConfig):
    """``h = f(x) + b_delta`` on every target; see methods/bitfit/layer.py.

    The default adapts every linear layer but the output head and classifier, and every LayerNorm
    (the paper's "all biases"). The paper's smallest subset, the query, value and FFN-intermediate
    biases of BERT, is ``target_modules=["query", "value", "intermediate.dense"],
    include_layernorms=False``.
    """

    target_modules: list[str] | str | None = field(default=ALL_LINEAR, metadata={"help": "Layers whose bias trains: name suffixes, a regex on full names, or 'all-linear' (every linear layer but the output head/classifier). LayerNorm modules may be named too."})
    include_layernorms: bool = field(default=True, metadata={"help": "Also train the bias of every nn.LayerNorm (minus exclude_modules and outside layers_to_transform)."})
    init_bitfit_weights: bool = field(default=True, metadata={"help": "True: the bias deltas start at 0 (no change); False: N(0, 0.1^2) (changes the output; for tests)."})

    def __post_init__(self) -> None:
        self.peft_type = "BITFIT"
        super().__post_init__()
        targets = self.target_modules
        check_field(isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets)),
                    "target_modules", targets, "a list of module names, a regex string or 'all-linear'")
        for name in ("include_layernorms", "init_bitfit_weights"):
            check_field(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
