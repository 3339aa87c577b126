"""Resumable batches: a seeded per-epoch shuffle addressed by (epoch, batch index).

The order of epoch ``e`` is ``randperm(len(dataset), generator=seed + e)``, a pure function of the
seed and the epoch, so resuming at (epoch, batch) regenerates the same permutation and skips
exactly the batches already consumed without touching their data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


class ResumableBatches:
    def __init__(self, dataset: Sequence, batch_size: int, collate_fn: Callable[[list], Any], seed: int):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty; give it at least one example")
        self.dataset, self.batch_size, self.collate_fn, self.seed = dataset, batch_size, collate_fn, seed
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Batches per epoch (the last one may be smaller)."""
        return -(-len(self.dataset) // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cached = (epoch, torch.randperm(len(self.dataset), generator=generator).tolist())
        return self._cached[1]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int, Any]]:
        """Yield ``(batch_index, batch)`` for one epoch, starting at ``start_batch``."""
        order = self.order(epoch)
        for index in range(start_batch, len(self)):
            ids = order[index * self.batch_size : (index + 1) * self.batch_size]
            yield index, self.collate_fn([self.dataset[i] for i in ids])


def eval_batches(dataset: Sequence, batch_size: int, collate_fn: Callable[[list], Any]) -> Iterator[Any]:
    """Evaluation batches in dataset order."""
    for start in range(0, len(dataset), batch_size):
        yield collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
