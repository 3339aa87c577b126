"""BitFit's row in the contract suite (tests/test_contract.py): the default targets, every linear
layer but the head and every LayerNorm. The tiny Llama has no bias anywhere, so merging creates
them; transformers drops such biases when it reloads a Llama saved from merge_and_unload (its config
says attention_bias=False), which the row declares."""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import BitFitConfig


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> BitFitConfig:
    kwargs = dict(task_type=task, init_bitfit_weights=identity)
    kwargs.update(overrides)
    return BitFitConfig(**kwargs)


CASE = MethodCase("bitfit", make, extra={"merged_reload_drops_created_biases": True})
