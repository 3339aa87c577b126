"""Learning-rate schedules: linear warm-up, then linear / cosine decay to zero, or constant.

The multiplier at optimizer step ``s`` (0-based, before the step is taken) is

    warm-up   s < W:   (s + 1) / W          (reaches 1.0 on the last warm-up step)
    linear    s >= W:  (T - s) / (T - W)
    cosine    s >= W:  0.5 * (1 + cos(pi * (s - W) / (T - W)))
    constant  s >= W:  1

with ``T`` total steps and ``W`` warm-up steps. The schedule is a small callable object, so
``LambdaLR.state_dict()`` saves its fields and a resumed run continues from exactly the same point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class WarmupSchedule:
    kind: str
    total_steps: int
    warmup_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """Explicit warm-up steps win; otherwise a ratio of the whole run (rounded up)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(kind, total_steps, warmup))
