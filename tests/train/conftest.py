"""Tiny plain-PyTorch models and data for the trainer tests (no transformers needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyClassifier(nn.Module):
    """x (batch, 4) -> logits (batch, 2); returns {"loss", "logits"} like a transformers model."""

    def __init__(self, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class TinyLM(nn.Module):
    """ids (batch, T) -> logits (batch, T, V); mean next-token loss over labels != -100, like HF."""

    def __init__(self, vocab: int = 11, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.out(self.emb(input_ids))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}


def classification_data(n: int = 64, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def lm_data(n: int = 16, seed: int = 0) -> list[dict]:
    """Sequences of length 6 whose first 1..4 positions are masked out of the loss (varying counts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 11, (6,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 4] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long), "labels": labels})
    return out


@pytest.fixture
def cls_data():
    return classification_data()
