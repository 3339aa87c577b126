"""One row of the contract suite (tests/test_contract.py): how to build a method's configs and
which optional capabilities it declares. Kept apart from the list of rows so that each method's
``case.py`` can import it without importing every other method's row."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class MethodCase:
    name: str
    make: Callable[..., Any]  # (target_modules, task_type, identity: bool, **overrides) -> config
    can_merge: bool = True
    supports_mixed_batch: bool = True
    identity_init: bool = True  # False: no init leaves outputs unchanged (prompt tuning prepends tokens)
    stacks: bool = True  # False: set_adapter refuses several of its adapters active at once
    gradient_checkpointing: bool = True  # False: training under gradient checkpointing raises (prefix tuning)
    saves_folded: bool = False  # True: the file holds the trained encoder's output, not its tensors (P-tuning)
    trains_one_adapter: bool = False  # True: a second adapter is refused unless in inference mode (AdaLoRA)
    extra: dict = field(default_factory=dict)

    def config(self, targets: list[str], task: str, identity: bool = False, **overrides: Any) -> Any:
        return self.make(targets, task, identity, **overrides)
