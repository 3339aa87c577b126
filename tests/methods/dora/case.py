"""DoRA's row in the contract suite (tests/test_contract.py): the LoRA targets of each tiny family."""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import DoraConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> DoraConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, task_type=task,
                  init_lora_weights=True if identity else False)
    kwargs.update(overrides)
    return DoraConfig(**kwargs)


CASE = MethodCase("dora", make)
