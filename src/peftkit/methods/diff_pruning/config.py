"""Diff pruning configuration (peftkit's own format, ``peft_type`` "DIFF_PRUNING")."""
from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.config import TargetingConfig, check_field
from peftkit.engine.targets import ALL_LINEAR


@dataclass
class DiffPruningConfig(TargetingConfig):
    """``W' = W + z * w`` with hard-concrete gates z; see methods/diff_pruning/layer.py.

    Training has two phases (optimizer steps counted from 1): up to step ``total_step -
    fixed_mask_steps`` w and the gates train under the relaxed-L0 penalty; after that step the diff
    is projected onto its ``target_density`` largest magnitudes and the last ``fixed_mask_steps``
    steps train only those entries.
    """

    target_modules: list[str] | str | None = field(default=ALL_LINEAR, metadata={"help": "Weights that get a diff: name suffixes, a regex on full names, or 'all-linear' (every linear layer but the output head/classifier)."})
    target_density: float = field(default=0.005, metadata={"help": "Fraction of diff entries (over all targets together) kept nonzero by the projection, in (0, 1]; the paper's 0.5% is 0.005."})
    total_step: int | None = field(default=None, metadata={"help": "Total optimizer steps of the run (required before wrapping a model; `peftkit train` fills it from the run)."})
    fixed_mask_steps: int = field(default=0, metadata={"help": "Final steps that train the projected diff with its mask fixed (0: project after the last step)."})
    l0_penalty: float = field(default=1.25e-7, metadata={"help": "Weight of the relaxed-L0 penalty, the expected number of nonzero gates summed over all targets (>= 0)."})
    init_log_alpha: float = field(default=5.0, metadata={"help": "Initial gate logit log(alpha); large values start with the gates open."})
    temperature: float = field(default=2 / 3, metadata={"help": "Hard-concrete temperature beta (> 0)."})
    stretch_low: float = field(default=-0.1, metadata={"help": "Lower end gamma of the stretched interval (< 0)."})
    stretch_high: float = field(default=1.1, metadata={"help": "Upper end zeta of the stretched interval (> 1)."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out), as in GPT-2's Conv1D (set per layer type automatically)."})
    init_diff_weights: bool = field(default=True, metadata={"help": "True: w = 0 (no change at start); False: w ~ N(0, 0.02^2) (changes the output; for tests)."})

    def check_schedule(self) -> None:
        """total_step is set and leaves at least one step before the projection."""
        value = self.total_step
        check_field(isinstance(value, int) and not isinstance(value, bool) and value > 0, "total_step", value,
                    "an integer > 0, the run's number of optimizer steps (required before the model is wrapped)")
        check_field(self.fixed_mask_steps < value, "fixed_mask_steps", self.fixed_mask_steps,
                    f"< total_step = {value} so that the gates train before the projection")

    @property
    def projection_step(self) -> int:
        """The optimizer step after which the diff is projected."""
        return self.total_step - self.fixed_mask_steps

    def __post_init__(self) -> None:
        self.peft_type = "DIFF_PRUNING"
        super().__post_init__()
        check_field(isinstance(self.target_density, (int, float)) and 0 < self.target_density <= 1,
                    "target_density", self.target_density, "a fraction in (0, 1], e.g. 0.005 for 0.5%")
        check_field(isinstance(self.fixed_mask_steps, int) and self.fixed_mask_steps >= 0, "fixed_mask_steps",
                    self.fixed_mask_steps, "an integer >= 0")
        if self.total_step is not None:  # may come later: `peftkit train` fills it from the run's length
            self.check_schedule()
        check_field(self.l0_penalty >= 0, "l0_penalty", self.l0_penalty, "a number >= 0")
        check_field(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        check_field(self.stretch_low < 0, "stretch_low", self.stretch_low, "a number < 0 (gates can be exactly 0)")
        check_field(self.stretch_high > 1, "stretch_high", self.stretch_high, "a number > 1 (gates can be exactly 1)")
        for name in ("fan_in_fan_out", "init_diff_weights"):
            check_field(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
