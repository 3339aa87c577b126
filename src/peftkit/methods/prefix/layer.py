"""Prefix tuning (Li & Liang, 2021): trained keys and values prepended in every attention layer.

With ``L`` layers, ``H`` key/value heads of width ``hd`` (``token_dim = H * hd``) and prefix
length ``p``, each layer ``l`` attends over the prefix and then the sequence:

    attn_l(x) = softmax(q [Pk_l ; K_l]^T / sqrt(hd) + [0_p ; mask]) [Pv_l ; V_l]   # per head
    Z = prefix table, (p, L * 2 * token_dim);  Z[:, j] for j = (2l + {0: key, 1: value}, head, hd)

    prefix_projection=False (P-tuning v2):  Z is trained directly, nn.Embedding(p, L*2*token_dim)
    prefix_projection=True:                  Z = W2 tanh(W1 E + b1) + b2, E: (p, token_dim) trained,
                                             W1: token_dim -> encoder_hidden_size -> L*2*token_dim

The prefix reaches the model as a filled key/value cache (``past_key_values``; ``inputs.py``), so
the model's own attention does the math above and numbers the real tokens from ``p`` on, as
HF PEFT's does. Init: PyTorch's (Z or E N(0, 1), linears uniform); ``init_weights="zero"`` zeroes
Z (or W2, b2). No init leaves the output unchanged (zero keys still take softmax weight);
``disable_adapter`` gives the exact base model. The base model stays frozen.

Saving folds the MLP away as HF PEFT does: the file holds ``prompt_embeddings = Z`` only. Loaded for
inference the layer holds Z itself; the MLP cannot be recovered from it, so a trainable load of a
projected prefix is refused with the fix (train Z on directly with ``prefix_projection=False``).

The engine wraps the input embedding with :class:`PrefixEmbedding`, which only holds the prefix
encoders (so trainability, saving, deleting and disabling work as for every layer) and passes the
embedding through unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.methods.prompt.layer import InputEmbedding, encoder_tensors, folded_output

class PrefixEncoder(nn.Module):
    """Z above; attribute names as in HF PEFT (``embedding``, ``transform``)."""

    def __init__(self, config: Any, folded: bool) -> None:
        super().__init__()
        p, d, width = config.num_virtual_tokens, config.token_dim, config.num_layers * 2 * config.token_dim
        self.projected = config.prefix_projection and not folded
        self.embedding = nn.Embedding(p, d if self.projected else width)  # E (p, d) or Z (p, L*2*d)
        last = self.embedding
        if self.projected:
            h = config.encoder_hidden_size
            self.transform = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, width))
            last = self.transform[-1]
        if config.init_weights == "zero":
            for tensor in last.parameters():
                nn.init.zeros_(tensor)

    def forward(self) -> torch.Tensor:
        """(1, p, L * 2 * token_dim): Z, computed once per forward for the whole batch."""
        table = self.embedding.weight.unsqueeze(0)  # (1, p, d) or (1, p, L*2*d)
        return self.transform(table) if self.projected else table


class PrefixEmbedding(InputEmbedding):
    """Holds one prefix encoder per adapter (the anchor on the input embeddings; see above)."""

    def add_adapter(self, name: str, config: Any, key: str) -> None:
        encoder = PrefixEncoder(config, folded=config.inference_mode)
        self.prompt_encoder[name] = encoder.to(self.base_layer.weight.device)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Z as the file holds it, or (projected, training) E and the MLP, which no file holds."""
        encoder = self.prompt_encoder[name]
        return encoder_tensors(encoder, table_only=not encoder.projected)

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return folded_output(self.prompt_encoder[name])  # Z: (p, L*2*d)

    def prefix(self, name: str) -> torch.Tensor:
        return self.prompt_encoder[name]()

    def virtual_tokens(self, name: str) -> int:
        return self.prompt_encoder[name].embedding.num_embeddings
