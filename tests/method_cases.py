"""The rows of the contract suite: one entry per registered method.

A later method adds one ``MethodCase`` here and every property in tests/test_contract.py runs on
it; a capability a method lacks is declared (``can_merge=False``) so the skip shows in the report.
"""
from __future__ import annotations

from typing import Any

from contract_case import MethodCase
from peftkit import LoraConfig


def _lora(targets: list[str], task: str, identity: bool, **overrides: Any) -> LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, task_type=task,
                  init_lora_weights=True if identity else False)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


CASES = [MethodCase("lora", _lora)]

# Each further method keeps its row beside its own tests (tests/methods/<name>/case.py).
from methods.dora.case import CASE as DORA_CASE  # noqa: E402
from methods.ia3.case import CASE as IA3_CASE  # noqa: E402
from methods.adalora.case import CASE as ADALORA_CASE  # noqa: E402
from methods.adapter.case import CASE as ADAPTER_CASE  # noqa: E402
from methods.prompt.case import CASE as PROMPT_CASE  # noqa: E402

CASES += [DORA_CASE, IA3_CASE, ADALORA_CASE, ADAPTER_CASE, PROMPT_CASE]
from methods.prefix.case import CASE as PREFIX_CASE  # noqa: E402
from methods.ptuning.case import CASE as PTUNING_CASE  # noqa: E402

CASES += [PREFIX_CASE, PTUNING_CASE]
from methods.bitfit.case import CASE as BITFIT_CASE  # noqa: E402
from methods.partial.case import CASE as PARTIAL_CASE  # noqa: E402
from methods.diff_pruning.case import CASE as DIFF_PRUNING_CASE  # noqa: E402

CASES += [BITFIT_CASE, PARTIAL_CASE, DIFF_PRUNING_CASE]
from methods.mam.case import CASE as MAM_CASE  # noqa: E402

CASES += [MAM_CASE]
from methods.unipelt.case import CASE as UNIPELT_CASE  # noqa: E402

CASES += [UNIPELT_CASE]
