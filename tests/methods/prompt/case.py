"""The prompt-tuning row of the contract suite (tests/test_contract.py), wired in by tests/method_cases.py.

Prompt tuning wraps only the input embeddings (targets are ignored), never merges, cannot mix
adapters per row, and has no identity init (any prompt changes the sequence); RANDOM init is the
"non-identity" init the suite asks for.
"""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import PromptTuningConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> PromptTuningConfig:
    return PromptTuningConfig(**{"num_virtual_tokens": 3, "task_type": task, **overrides})


CASE = MethodCase("prompt", make, can_merge=False, supports_mixed_batch=False, identity_init=False, stacks=False)
