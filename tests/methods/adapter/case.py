"""The bottleneck adapter's row in the contract suite (tests/test_contract.py).

Targets come from the Houlsby placement of each tiny family (the LoRA targets passed in are not
used). Bottleneck adapters are nonlinear and cannot be merged, so the merge properties are declared
inapplicable; the engine refuses merge_adapter/merge_and_unload for them (tested beside the math).
"""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import BottleneckConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> BottleneckConfig:
    kwargs = dict(placement="houlsby", reduction_factor=8, non_linearity="gelu", task_type=task,
                  init_weights=identity)
    kwargs.update(overrides)
    return BottleneckConfig(**kwargs)


CASE = MethodCase("adapter", make, can_merge=False)
