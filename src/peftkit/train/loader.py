"""Resumable batches: a seeded per-epoch shuffle addressed by (epoch, batch index).

The order of epoch ``e`` is ``randperm(len(dataset), generator=seed + e)``, a pure function of the
seed and the epoch, so resuming at (epoch, batch) regenerates the same permutation and skips
exactly the batches already consumed without touching their data.

Under data parallelism each rank reads its own shard of that order (``distributed.shard``), so the
same seed gives the same global order at every world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .distributed import shard


class ResumableBatches:
    def __init__(self, dataset: Sequence, batch_size: int, collate_fn: Callable[[list], Any], seed: int,
                 rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty; give it at least one example")
        self.dataset, self.batch_size, self.collate_fn, self.seed = dataset, batch_size, collate_fn, seed
        self.rank, self.world_size = rank, world_size
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Batches per epoch of this rank (the last one may be smaller)."""
        return -(-shard_length(len(self.dataset), self.world_size) // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """This rank's example indices for ``epoch`` (all of them in a single process)."""
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
            mine = order if self.world_size == 1 else shard(order, self.rank, self.world_size)
            self._cached = (epoch, mine)
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


def shard_length(n_examples: int, world_size: int) -> int:
    """Examples per rank and epoch (the order is padded to a multiple of the world size)."""
    return -(-n_examples // world_size)


def eval_shard_batches(dataset: Sequence, batch_size: int, collate_fn: Callable[[list], Any], rank: int,
                       world_size: int, n_batches: int) -> Iterator[tuple[Any, bool]]:
    """This rank's evaluation batches (examples rank, rank+world, ...), each example exactly once.

    Yields ``(batch, counted)``; ranks with fewer batches repeat a batch with ``counted=False`` until
    ``n_batches`` (the most any rank has), because FSDP2 forwards are collectives all ranks join.
    """
    mine = list(range(rank, len(dataset), world_size))
    for start in range(0, n_batches * batch_size, batch_size):
        ids = mine[start : start + batch_size]
        yield collate_fn([dataset[i] for i in (ids or [0])]), bool(ids)


def eval_batch_count(n_examples: int, batch_size: int, rank: int, world_size: int) -> int:
    return -(-len(range(rank, n_examples, world_size)) // batch_size)
