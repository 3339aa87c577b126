"""The prefix-tuning row of the contract suite (tests/test_contract.py), wired in by tests/method_cases.py.

The row is P-tuning v2 (``prefix_projection=False``, HF's default): the file then holds exactly what
trains. Prefix tuning anchors on the input embeddings (targets are ignored), never merges, cannot mix
adapters per row, has no identity init (zero prefixes still take attention weight), and refuses to
train under gradient checkpointing (transformers drops the cache inside checkpointed layers). The
projected variant's folding on save is tested in test_prefix_math.py.
"""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import PrefixTuningConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> PrefixTuningConfig:
    return PrefixTuningConfig(**{"num_virtual_tokens": 3, "task_type": task, **overrides})


CASE = MethodCase("prefix", make, can_merge=False, supports_mixed_batch=False, identity_init=False, stacks=False,
                  gradient_checkpointing=False)
