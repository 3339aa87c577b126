"""What the classification and causal-LM builders share: a list-backed dataset and right padding.

Examples are tokenised once, unpadded, and padded per batch to the batch's longest example
(dynamic padding): with short review snippets this makes batches several times smaller than padding
everything to ``max_length``.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # labels with this value are skipped by torch.nn.functional.cross_entropy


class FeatureDataset(Dataset):
    """Tokenised examples (dicts of int lists) held in memory; indexing returns one example.

    ``label2id`` is set for classification data, so the eval set and the model config can reuse the
    training set's mapping; it is ``None`` for language-modelling data.
    """

    def __init__(self, features: list[dict], label2id: dict | None = None):
        self.features = features
        self.label2id = label2id

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


def padded_length(sequences: list[list[int]], multiple: int = 1) -> int:
    """The longest sequence's length rounded up to a multiple of ``multiple``."""
    longest = max(len(s) for s in sequences)
    return -(-longest // multiple) * multiple


def pad_right(sequences: list[list[int]], value: int, multiple: int = 1) -> torch.Tensor:
    """Stack int sequences into one ``(batch, length)`` tensor, filling the tail with ``value``; length is
    the longest's, rounded up to a multiple of ``multiple`` (few distinct shapes: CUDA graphs, kernels
    tuned per shape)."""
    length = padded_length(sequences, multiple)
    return torch.tensor([list(s) + [value] * (length - len(s)) for s in sequences], dtype=torch.long)


def attention_mask(sequences: list[list[int]], multiple: int = 1) -> torch.Tensor:
    """1 on real tokens, 0 on right padding: ``(batch, length)`` as ``pad_right`` pads."""
    return pad_right([[1] * len(s) for s in sequences], 0, multiple)


def check_multiple(multiple: int) -> None:
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive int, got {multiple!r}")


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token.

    Decoder-only tokenizers often define no pad token; since padded positions are masked out of
    attention and loss, any real id works, and EOS is the conventional choice.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    raise ValueError(
        f"{type(tokenizer).__name__} has neither a pad nor an EOS token, so batches cannot be padded; "
        "set one first, e.g. tokenizer.pad_token = tokenizer.unk_token"
    )
