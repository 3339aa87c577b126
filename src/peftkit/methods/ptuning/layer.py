"""P-tuning (Liu et al., 2021): virtual tokens produced by a trained prompt encoder, at the input.

For input ids ``x`` (batch, n), frozen word embeddings ``E`` and a trained table ``V`` (p, d):

    P = f(V)                             # (p, d), the prompt encoder applied to the whole table
    inputs_embeds = [P ; E[x]]           # then exactly as prompt tuning (mask, labels, token types)

    MLP  (encoder_reparameterization_type="MLP"):
        f(V) = W3 relu(W2 relu(W1 V + b1) + b2) + b3            # d -> h -> h -> d
    LSTM (encoder_reparameterization_type="LSTM"):
        H = BiLSTM(V)                                            # (p, 2h), encoder_num_layers layers,
                                                                 #   encoder_dropout between layers
        f(V) = W2 relu(W1 H + b1) + b2                           # 2h -> 2h -> d

``h`` is ``encoder_hidden_size``. Init: PyTorch's defaults (``V`` N(0, 1), linears and LSTM
uniform); the base model stays frozen. No init leaves the output unchanged (any prepended token
changes what the model attends over); ``disable_adapter`` gives the exact base model.

Saving folds the encoder away as HF PEFT does: the file holds ``prompt_embeddings = f(V)`` (p, d)
only. Loaded for inference (``inference_mode``) the layer holds that table and uses it as the
prompt; the encoder cannot be recovered from it, so a trainable load is refused with the fix
(train the folded prompt on as prompt tuning). The prompt enters through prompt tuning's input
machinery (``methods/prompt/inputs.py``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.methods.prompt.layer import InputEmbedding, encoder_tensors, folded_output

class PromptEncoder(nn.Module):
    """``f(V)`` above; attribute names as in HF PEFT (``embedding``, ``mlp_head``, ``lstm_head``).

    ``folded``: only the table (loaded for inference), used as the prompt as it is.
    """

    def __init__(self, config: Any, folded: bool) -> None:
        super().__init__()
        d, h, p = config.token_dim, config.encoder_hidden_size, config.num_virtual_tokens
        self.embedding = nn.Embedding(p, d)  # V: (p, d)
        self.kind = "FOLDED" if folded else config.encoder_reparameterization_type
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        elif self.kind == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self) -> torch.Tensor:
        """(1, p, d): the prompt, computed once per forward for the whole batch."""
        table = self.embedding.weight.unsqueeze(0)  # (1, p, d)
        if self.kind == "LSTM":
            return self.mlp_head(self.lstm_head(table)[0])  # (1, p, 2h) -> (1, p, d)
        if self.kind == "MLP":
            return self.mlp_head(table)  # (1, p, d)
        return table


class PromptEncoderEmbedding(InputEmbedding):
    """Holds one prompt encoder per adapter; the prompt enters through prompt tuning's inputs.py."""

    def add_adapter(self, name: str, config: Any, key: str) -> None:
        encoder = PromptEncoder(config, folded=config.inference_mode)
        self.prompt_encoder[name] = encoder.to(self.base_layer.weight.device)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Folded: the file's table. Training: the encoder's own tensors, which no file holds."""
        encoder = self.prompt_encoder[name]
        return encoder_tensors(encoder, table_only=encoder.kind == "FOLDED")

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """HF's file: the prompt ``f(V)`` (p, d), computed in eval mode (no dropout)."""
        return folded_output(self.prompt_encoder[name])

    def prompt(self, name: str, batch: int) -> torch.Tensor:
        """(batch, p, d): the encoder runs once, its output is shared by every row."""
        return self.prompt_encoder[name]().expand(batch, -1, -1)

    def virtual_tokens(self, name: str) -> int:
        return self.prompt_encoder[name].embedding.num_embeddings
