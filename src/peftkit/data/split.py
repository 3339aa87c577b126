"""Deterministic train/eval splits.

The same seed must give the same split on every machine and Python version, so we shuffle with our
own ``random.Random(seed)`` rather than the global state. Classification splits are stratified: each
label keeps its share in both halves, so a small eval set never misses a class by bad luck.
"""

from __future__ import annotations

import random
from collections import defaultdict


def train_eval_split(
    records: list[dict], *, eval_fraction: float = 0.1, seed: int = 0, stratify_by: str | None = None
) -> tuple[list[dict], list[dict]]:
    """Split records into (train, eval); ``stratify_by="label"`` keeps label proportions in both."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(
            f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}; 0.1 keeps 10% for eval"
        )
    if len(records) < 2:
        raise ValueError(f"need at least 2 records to split into train and eval, got {len(records)}")
    groups = _group_indices(records, stratify_by)
    rng = random.Random(seed)
    eval_idx: set[int] = set()
    for indices in groups:
        rng.shuffle(indices)
        eval_idx.update(indices[: _eval_count(len(indices), eval_fraction)])
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    evals = [r for i, r in enumerate(records) if i in eval_idx]
    return _shuffled(train, rng), _shuffled(evals, rng)


def _group_indices(records: list[dict], key: str | None) -> list[list[int]]:
    """Record indices grouped by ``key`` (one group when not stratifying), in first-seen order."""
    if key is None:
        return [list(range(len(records)))]
    groups: dict[object, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if key not in r:
            raise ValueError(f"cannot stratify by {key!r}: record {i} has no such field (fields: {list(r)})")
        groups[r[key]].append(i)
    return list(groups.values())


def _eval_count(n: int, fraction: float) -> int:
    """Eval share of a group: rounded, at least one when the group can spare it, never all of it."""
    return min(max(round(n * fraction), 1), n - 1) if n > 1 else 0


def _shuffled(items: list[dict], rng: random.Random) -> list[dict]:
    """Shuffle so training does not see a block of one label; stratification grouped them."""
    items = list(items)
    rng.shuffle(items)
    return items
