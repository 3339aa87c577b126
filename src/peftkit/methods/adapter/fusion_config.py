"""AdapterFusion configuration (Pfeiffer et al., 2021): which bottleneck adapters to fuse, and how.

HF PEFT has no AdapterFusion, so ``peft_type`` is peftkit's own "ADAPTER_FUSION". A fusion folder
holds only the fusion's tensors (and its modules_to_save copies); ``adapter_names`` names the
member adapters, which must be loaded under those names before the fusion is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.config import PeftConfig, check_field


@dataclass
class FusionConfig(PeftConfig):
    """Attention over N frozen bottleneck adapters at each adapted layer; see methods/adapter/fusion.py."""

    adapter_names: list[str] = field(default_factory=list, metadata={"help": "The bottleneck adapters to fuse (at least two, all on the same layers); they stay frozen."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T in eval mode, and at the end of annealing."})
    temperature_start: float | None = field(default=None, metadata={"help": "Anneal: T in training mode starts here and moves linearly to temperature over anneal_steps optimizer steps; None: no annealing."})
    anneal_steps: int = field(default=0, metadata={"help": "Optimizer steps over which T moves from temperature_start to temperature."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the normal initialisation of W_Q and W_K (must be > 0: at 0 neither gets a gradient)."})
    value_noise: float = field(default=1e-6, metadata={"help": "Std of the noise added to the identity initialisation of W_V."})
    use_bias: bool = field(default=True, metadata={"help": "Biases on the query, key and value projections (zero-initialised)."})
    value_regularization: float = field(default=0.0, metadata={"help": "lambda of the extra loss lambda * sum over layers ||W_V - I||_F^2 that keeps W_V near the identity; 0: off."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved with the fusion (e.g. a classifier head)."})

    def __post_init__(self) -> None:
        self.peft_type = "ADAPTER_FUSION"
        super().__post_init__()
        if isinstance(self.adapter_names, tuple):
            self.adapter_names = list(self.adapter_names)
        names = self.adapter_names
        check_field(isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names),
                    "adapter_names", names, "a list of at least two bottleneck adapter names")
        check_field(len(set(names)) == len(names), "adapter_names", names, "distinct names")
        check_field(_positive(self.temperature), "temperature", self.temperature, "a number > 0")
        check_field(self.temperature_start is None or _positive(self.temperature_start), "temperature_start",
                    self.temperature_start, "None or a number > 0")
        check_field(isinstance(self.anneal_steps, int) and self.anneal_steps >= 0, "anneal_steps",
                    self.anneal_steps, "an integer >= 0")
        check_field(self.temperature_start is None or self.anneal_steps >= 1, "anneal_steps", self.anneal_steps,
                    ">= 1 when temperature_start is set (the steps to anneal over)")
        check_field(_positive(self.init_std), "init_std", self.init_std, "a number > 0")
        check_field(_number(self.value_noise) and self.value_noise >= 0, "value_noise", self.value_noise, "a number >= 0")
        check_field(isinstance(self.use_bias, bool), "use_bias", self.use_bias, "True or False")
        check_field(_number(self.value_regularization) and self.value_regularization >= 0, "value_regularization",
                    self.value_regularization, "a number >= 0")

    def train_temperature(self, step: int) -> float:
        """T in training mode after ``step`` optimizer steps (linear anneal, then flat)."""
        if self.temperature_start is None:
            return float(self.temperature)
        done = min(step / self.anneal_steps, 1.0)
        return float(self.temperature_start + done * (self.temperature - self.temperature_start))


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value: object) -> bool:
    return _number(value) and value > 0
