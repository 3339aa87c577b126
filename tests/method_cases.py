"""The rows of the contract suite: one entry per registered method.

A later method adds one ``MethodCase`` here and every property in tests/test_contract.py runs on
it; a capability a method lacks is declared (``can_merge=False``) so the skip shows in the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from peftkit import LoraConfig


@dataclass
class MethodCase:
    name: str
    make: Callable[..., Any]  # (target_modules, task_type, identity: bool, **overrides) -> config
    can_merge: bool = True
    supports_mixed_batch: bool = True
    extra: dict = field(default_factory=dict)

    def config(self, targets: list[str], task: str, identity: bool = False, **overrides: Any) -> Any:
        return self.make(targets, task, identity, **overrides)


def _lora(targets: list[str], task: str, identity: bool, **overrides: Any) -> LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, task_type=task,
                  init_lora_weights=True if identity else False)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


CASES = [MethodCase("lora", _lora)]
