"""Partial fine-tuning's row in the contract suite (tests/test_contract.py): the top block of each
tiny two-block family, every module with parameters in it (the LoRA targets are not used)."""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import PartialConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> PartialConfig:
    kwargs = dict(num_top_layers=1, task_type=task, init_partial_weights=identity)
    kwargs.update(overrides)
    return PartialConfig(**kwargs)


CASE = MethodCase("partial", make)
