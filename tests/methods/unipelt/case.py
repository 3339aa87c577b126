"""UniPELT's row in the contract suite (tests/test_contract.py), wired in by tests/method_cases.py.

Gated LoRA on the family's query/value projections (LoRA's default targets), a gated prefix and a
gated Pfeiffer adapter under one adapter name. Like its prefix part it never merges, cannot mix
adapters per row, has no identity init, cannot stack with a second prefix and refuses gradient
checkpointing.
"""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import UniPeltConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> UniPeltConfig:
    kwargs = dict(task_type=task, lora={"r": 2, "init_lora_weights": True if identity else False},
                  prefix_tuning={"num_virtual_tokens": 3}, adapter={"reduction_factor": 8, "init_weights": identity})
    kwargs.update(overrides)
    return UniPeltConfig(**kwargs)


CASE = MethodCase("unipelt", make, can_merge=False, supports_mixed_batch=False, identity_init=False, stacks=False,
                  gradient_checkpointing=False)
