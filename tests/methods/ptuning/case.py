"""The P-tuning row of the contract suite (tests/test_contract.py), wired in by tests/method_cases.py.

P-tuning wraps only the input embeddings (targets are ignored), never merges, cannot mix adapters
per row and has no identity init (any prepended token changes the output). Its file holds the
prompt encoder's output, not the encoder (as HF PEFT's does), so the reload is for inference.
"""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import PromptEncoderConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> PromptEncoderConfig:
    return PromptEncoderConfig(**{"num_virtual_tokens": 3, "task_type": task, **overrides})


CASE = MethodCase("ptuning", make, can_merge=False, supports_mixed_batch=False, identity_init=False, stacks=False,
                  saves_folded=True)
