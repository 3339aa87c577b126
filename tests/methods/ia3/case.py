"""The (IA)^3 row of the contract suite (tests/test_contract.py), wired in by tests/method_cases.py."""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import IA3Config

# A family is recognised by one of its LoRA target names; IA3 uses HF PEFT's per-family choice:
# keys and values of attention (output scaled) plus the feed-forward down projection (input scaled).
IA3_TARGETS = {
    "q_proj": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),  # llama
    "query": (["key", "value", "output.dense"], ["output.dense"]),  # bert
    "c_attn": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # gpt2 (Conv1D)
}


def ia3_targets(lora_targets: list[str]) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) for the family whose LoRA targets are given."""
    for marker, choice in IA3_TARGETS.items():
        if marker in lora_targets:
            return list(choice[0]), list(choice[1])
    return list(lora_targets), []


def make(targets: list[str], task: str, identity: bool, **overrides: Any) -> IA3Config:
    target_modules, feedforward = ia3_targets(targets)
    kwargs = dict(target_modules=target_modules, feedforward_modules=feedforward, task_type=task,
                  fan_in_fan_out="c_attn" in target_modules, init_ia3_weights=identity)
    kwargs.update(overrides)
    return IA3Config(**kwargs)


CASE = MethodCase("ia3", make)
