"""Padding-free packing: several tokenised causal-LM examples per row, none attending to another.

A packed row concatenates examples ``s_1, ..., s_m`` (their ``input_ids`` and ``labels`` as
``build_causal_lm_dataset`` made them) into at most ``max_length`` tokens and gives each its own
positions, restarting at 0:

    input_ids    = s_1 ++ s_2 ++ ... ++ s_m
    position_ids = 0..|s_1|-1 ++ 0..|s_2|-1 ++ ... ++ 0..|s_m|-1
    labels       = labels(s_j) with its first entry set to -100, concatenated

The model shifts labels by one, so without that -100 the last token of ``s_j`` would be trained to
predict the first token of ``s_{j+1}``; with it, a row's targets are exactly the union of its
examples' targets when each runs alone (whose first label is never a target), and the mean loss of
a packed batch is the token-weighted mean of its examples' losses.

Attention stays inside each example because transformers (5.x) reads the restarting
``position_ids`` when a batch has *no* ``attention_mask`` and no cache: ``create_causal_mask``
finds where positions stop increasing by one and builds a block-diagonal causal mask (SDPA,
eager, flex), and flash-attention turns the same positions into per-example sequence lengths. So
packed batches carry no ``attention_mask``, and they carry ``use_cache=False``: Llama-style models
default to ``config.use_cache=True`` and then open a ``DynamicCache`` even in training (unless
gradient checkpointing is on), and with a cache present the packed-sequence check is skipped and
every token attends to all earlier tokens of its row. A model that ignores position_ids for
masking (prefix tuning's cached prefix, prompt tuning's virtual tokens at the row start, a family
without that detection) would silently attend across examples; ``check_packing_support`` runs a
tiny packed probe through the model and refuses such a model before training starts.

Choices:

* **Best-fit decreasing** groups the examples: longest first, each into the open row with the
  least room that still fits it (oldest row on ties), else a new row. It is deterministic (a
  function of the lengths alone, so every rank and every resume packs the same rows), packs as
  tightly as first-fit decreasing (at most 11/9 of the optimal row count + 1), and with rows kept
  in buckets by free space each placement is a bisection. Packing in the shuffled order (greedy
  next-fit) wastes more of each row and would tie the rows to one seed. The rows are made once;
  the trainer's seeded per-epoch shuffle then orders rows, as it orders examples unpacked.
* Under torchrun every rank packs the whole training set the same way and the loader then shards
  the rows (packing before sharding): the global order of rows, and so the run, is the same at
  every world size, and a resume at another world size continues it; packing per shard would make
  the rows depend on the number of processes.
* An example longer than ``max_length`` keeps a row of its own; cutting it is the builder's job
  (``build_causal_lm_dataset(max_length=...)``), which already truncated it.
* Rows of one batch are right-padded to the batch's longest row rather than joined into one long
  row: SDPA on a block-diagonal mask still computes the full (L x L) score matrix of a row, so one
  row of ``batch x max_length`` tokens would do ``batch`` times the attention work of ``batch`` rows;
  best-fit rows are nearly full, so the padding left is small (``benchmarks/packing.py`` measures
  it). Padding gets labels -100 and a position run of its own from 0, so it forms a separate
  (ignored) sequence, and sits at the row's end, which causal attention never lets earlier tokens see.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from heapq import heappop, heappush

import torch
from torch.utils.data import Dataset

from .batching import IGNORE_INDEX, check_multiple, padded_length, pad_right, pad_token_id
from .causal_lm import CausalLMCollator

# Forward arguments of every packed batch: no cache, so transformers looks for packed sequences.
PACKED_FORWARD_ARGS = {"use_cache": False}


def pack_lengths(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: indices of ``lengths`` grouped into rows of total length <= ``max_length``.

    Each row lists its indices in placement order (longest first); an index whose length alone
    exceeds ``max_length`` gets a row to itself.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 token, got {max_length}")
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free tokens -> heap of the open rows with exactly that room
    rooms: list[int] = []  # sorted keys of by_room
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        k = bisect_left(rooms, n)
        if k == len(rooms):  # no open row fits: start one
            row, room = len(rows), max_length
            rows.append([])
        else:
            room = rooms[k]
            row = heappop(by_room[room])  # the oldest of the fullest rows that fit
            if not by_room[room]:
                del by_room[room], rooms[k]
        rows[row].append(i)
        if room - n > 0:
            _open(by_room, rooms, room - n, row)
    return rows


def _open(by_room: dict[int, list[int]], rooms: list[int], room: int, row: int) -> None:
    if room not in by_room:
        by_room[room] = []
        insort(rooms, room)
    heappush(by_room[room], row)


def packed_row(examples: list[dict]) -> dict:
    """One row from examples with ``input_ids`` and ``labels``: concatenated, positions restarting."""
    row = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        ids, labels = list(example["input_ids"]), list(example["labels"])
        if len(ids) != len(labels) or not ids:
            raise ValueError(f"an example to pack has {len(ids)} input_ids and {len(labels)} labels; packing "
                             "needs equal, non-zero lengths, as build_causal_lm_dataset makes them")
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] + labels[1:]  # nothing predicts across the boundary
        row["position_ids"] += list(range(len(ids)))
    return row


class PackedDataset(Dataset):
    """Packed rows (dicts of int lists with ``position_ids``); indexing returns one row.

    ``groups[r]`` lists the indices of the source examples in row ``r``, in row order.
    """

    def __init__(self, rows: list[dict], groups: list[list[int]], max_length: int):
        self.rows, self.groups, self.max_length = rows, groups, max_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    @property
    def n_examples(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def n_tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


def pack_dataset(dataset, max_length: int) -> PackedDataset:
    """Pack a causal-LM dataset (e.g. ``build_causal_lm_dataset``'s) into rows of <= ``max_length`` tokens."""
    if len(dataset) == 0:
        raise ValueError("cannot pack an empty dataset; give it at least one example")
    examples = [dataset[i] for i in range(len(dataset))]
    missing = [k for k in ("input_ids", "labels") if k not in examples[0]]
    if missing:
        raise ValueError(f"packing needs causal-LM examples with input_ids and labels; the first example lacks "
                         f"{missing} (it has {sorted(examples[0])}); build it with build_causal_lm_dataset")
    groups = pack_lengths([len(e["input_ids"]) for e in examples], max_length)
    return PackedDataset([packed_row([examples[i] for i in g]) for g in groups], groups, max_length)


def is_packed(dataset) -> bool:
    """Whether ``dataset``'s examples are packed rows (they carry ``position_ids``)."""
    return isinstance(dataset, PackedDataset) or (
        dataset is not None and len(dataset) > 0 and isinstance(dataset[0], dict) and "position_ids" in dataset[0])


@dataclass(frozen=True)
class PackedCollator:
    """Batches packed rows (right-padded, no attention_mask) and plain examples (``CausalLMCollator``).

    One collator serves a packed training set and its unpacked evaluation set. A packed batch is
    ``input_ids``, ``labels`` and ``position_ids``, each ``(batch, longest row)``, and
    ``use_cache=False``; each row's padding continues its ``position_ids`` with a run of its own
    from 0 and its labels with -100.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __post_init__(self) -> None:
        check_multiple(self.pad_to_multiple_of)

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to_multiple_of: int = 1) -> PackedCollator:
        return cls(pad_token_id(tokenizer), pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        packed, multiple = ["position_ids" in f for f in features], self.pad_to_multiple_of
        if not any(packed):
            return CausalLMCollator(self.pad_token_id, multiple)(features)
        if not all(packed):
            raise ValueError(f"a batch mixes {sum(packed)} packed rows with {len(packed) - sum(packed)} plain "
                             "examples; pack the whole dataset with pack_dataset")
        length = padded_length([f["input_ids"] for f in features], multiple)
        positions = [list(f["position_ids"]) + list(range(length - len(f["position_ids"]))) for f in features]
        return {
            "input_ids": pad_right([f["input_ids"] for f in features], self.pad_token_id, multiple),
            "labels": pad_right([f["labels"] for f in features], IGNORE_INDEX, multiple),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            **PACKED_FORWARD_ARGS,
        }


# Largest |packed - alone| / max|alone| over the probe's logits that still counts as equal: float
# rounding only (fp32, TF32 matmuls, bf16/fp16 autocast); attending across the boundary changes the
# logits by far more (measured: tens of percent on SmolLM2).
PROBE_TOLERANCE = {torch.float32: 5e-3, torch.float64: 1e-6}
HALF_PROBE_TOLERANCE = 5e-2
PROBE_TOKENS = 6


@torch.no_grad()
def check_packing_support(model: torch.nn.Module, dataset) -> float:
    """Refuse a model that lets packed examples attend to each other; return the probe's error.

    Runs two short sequences ``a``, ``b`` (tokens of the dataset's first row) as one packed row
    ``a ++ b`` with positions restarting, and ``b`` alone, and compares ``b``'s logits. Call it in
    the autocast the training uses; the model's train/eval mode is restored.
    """
    ids = list(dataset[0]["input_ids"])
    a = [ids[i % len(ids)] for i in range(PROBE_TOKENS)]
    b = [ids[(len(ids) - 1 - i) % len(ids)] for i in range(PROBE_TOKENS)]
    was_training = model.training
    model.eval()
    try:
        alone = _probe_logits(model, b, list(range(len(b))))
        packed = _probe_logits(model, a + b, list(range(len(a))) + list(range(len(b))))[:, len(a):]
    finally:
        model.train(was_training)
    error = _relative_error(packed, alone)
    tolerance = PROBE_TOLERANCE.get(alone.dtype, HALF_PROBE_TOLERANCE)
    if not error <= tolerance:
        raise ValueError(
            f"{_model_name(model)} does not keep packed sequences apart: a sequence packed after another gets "
            f"logits {error:.2g} (relative) away from the same sequence alone (tolerance {tolerance:g}), so it "
            "attends across the boundary. Packing needs a model whose attention masks from position_ids with no "
            "attention_mask (transformers 5 decoders with sdpa/eager/flash attention) and a method that adds no "
            "tokens or cached prefix (not prefix, prompt or p-tuning); train this one without packing")
    return error


def _relative_error(packed: torch.Tensor, alone: torch.Tensor) -> float:
    """max |packed - alone| / max |alone|; infinite when the shapes differ (tokens were added)."""
    if packed.shape != alone.shape:
        return float("inf")
    return float((packed.float() - alone.float()).abs().max() / alone.float().abs().max().clamp_min(1e-12))


def _probe_logits(model: torch.nn.Module, ids: list[int], positions: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                **PACKED_FORWARD_ARGS)
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if logits is None:
        raise ValueError(f"{_model_name(model)} returned no logits for the packing probe; packing needs a "
                         "causal LM that returns logits when called without labels")
    return logits


def _model_name(model: torch.nn.Module) -> str:
    base = getattr(model, "get_base_model", None)
    return type(base() if base is not None else model).__name__
