"""Diff pruning's row in the contract suite (tests/test_contract.py): a diff on each tiny family's
LoRA targets; the suite's short loops never reach the projection (total_step=10)."""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import DiffPruningConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> DiffPruningConfig:
    kwargs = dict(target_modules=targets, total_step=10, task_type=task, init_diff_weights=identity,
                  fan_in_fan_out="c_attn" in targets)
    kwargs.update(overrides)
    return DiffPruningConfig(**kwargs)


CASE = MethodCase("diff_pruning", make)
