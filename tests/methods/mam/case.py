"""The MAM adapter's row in the contract suite (tests/test_contract.py), wired in by tests/method_cases.py.

MAM = prefix tuning + a parallel FFN adapter under one adapter name (the targets passed in are not
used: the prefix anchors on the input embeddings, the adapter on each family's FFN blocks). Like its
prefix part it never merges, cannot mix adapters per row, has no identity init, cannot stack with a
second prefix and refuses gradient checkpointing.
"""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import MamConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> MamConfig:
    kwargs = dict(task_type=task, prefix_tuning={"num_virtual_tokens": 3},
                  parallel_adapter={"reduction_factor": 4, "init_weights": identity})
    kwargs.update(overrides)
    return MamConfig(**kwargs)


CASE = MethodCase("mam", make, can_merge=False, supports_mixed_batch=False, identity_init=False, stacks=False,
                  gradient_checkpointing=False)
