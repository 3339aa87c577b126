"""AdaLoRA's row in the contract suite (tests/test_contract.py): the LoRA targets of each tiny family."""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import AdaLoraConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> AdaLoraConfig:
    kwargs = dict(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=targets, task_type=task,
                  init_lora_weights=identity)
    kwargs.update(overrides)
    return AdaLoraConfig(**kwargs)


CASE = MethodCase("adalora", make, trains_one_adapter=True)
