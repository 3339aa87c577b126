"""Prompt tuning (Lester et al., 2021): a trainable soft prompt prepended to the input embeddings.

For input ids ``x`` (batch, n) and word embeddings ``E`` (frozen), the model sees

    inputs_embeds = [P ; E[x]]          # (batch, p + n, d), P: (p, d) shared by every row
    attention_mask = [1_p ; mask]       # (batch, p + n)
    labels = [-100_p ; labels]          # token-level labels only: the loss skips virtual tokens
    token_type_ids = [0_p ; types]      # BERT-style encoders; position ids are dropped (HF does so)

``P`` is an ``nn.Embedding(p, d)`` per adapter and the only adapter tensor; the base model stays
frozen. Init: RANDOM is N(0, 1) (``nn.Embedding``'s); TEXT is ``E`` of the tokenised init text,
repeated and cut to ``p``; SAMPLE_VOCAB is ``E`` of ``p`` uniformly drawn token ids.

There is no identity init: prepending any vector changes the sequence the model attends over.
``disable_adapter`` gives the exact base model instead.

The engine wraps the input embedding with :class:`PromptEmbedding`, which only holds the prompts
(so trainability, saving, deleting and disabling work as for every layer) and passes the embedding
through unchanged; the prompt is prepended by ``inputs.py`` at the model's input, where the
attention mask and labels are visible too.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peftkit.engine.layer import AdapterLayer

FILE_KEY = "prompt_embeddings"  # HF's key, at the top level of the file (no module path)


class InputEmbedding(AdapterLayer):
    """What the input-level wrappers (prompt tuning, P-tuning, prefix tuning) share: they stand where
    ``get_input_embeddings()`` looks, pass the embedding through unchanged, never merge, and hold one
    module per adapter in ``prompt_encoder`` (HF's attribute name) whose file tensor is a top-level
    ``prompt_embeddings``. Each method adds how the module is built and what it produces."""

    can_merge = False
    top_level_keys = True  # adapter_tensors keys are file keys as they are
    file_tensors = (FILE_KEY,)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_encoder = nn.ModuleDict()

    def delete_adapter(self, name: str) -> None:
        del self.prompt_encoder[name]

    def adapter_names(self) -> list[str]:
        return list(self.prompt_encoder.keys())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    # Callers of get_input_embeddings() read these off the wrapper.
    weight = property(lambda self: self.base_layer.weight)
    num_embeddings = property(lambda self: self.base_layer.num_embeddings)
    embedding_dim = property(lambda self: self.base_layer.embedding_dim)
    padding_idx = property(lambda self: self.base_layer.padding_idx)


def encoder_tensors(encoder: nn.Module, table_only: bool) -> dict[str, torch.Tensor]:
    """An encoder's trainable tensors: its table under the file key when that is all it trains
    (folded, or no reparameterization), else its own parameters, which no file holds."""
    if table_only:
        return {FILE_KEY: encoder.embedding.weight}
    return {f"prompt_encoder.{k}": t for k, t in encoder.named_parameters()}


def folded_output(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """What HF's file holds for an encoder: its output (1, p, X)[0], computed in eval mode."""
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        table = encoder()[0]
    encoder.train(was_training)
    return {FILE_KEY: table}


class PromptEmbedding(InputEmbedding):
    """Holds one soft prompt (an ``nn.Embedding(p, d)``) per adapter."""

    def add_adapter(self, name: str, config: Any, key: str) -> None:
        embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)  # (p, d), N(0, 1)
        embedding.to(self.base_layer.weight.device)
        if not config.inference_mode and config.prompt_tuning_init != "RANDOM":
            with torch.no_grad():
                embedding.weight.copy_(self.base_layer(initial_ids(config, self.base_layer)).float())
        self.prompt_encoder[name] = embedding

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {FILE_KEY: self.prompt_encoder[name].weight}

    def prompt(self, name: str, batch: int) -> torch.Tensor:
        """(batch, p, d): the same prompt for every row."""
        weight = self.prompt_encoder[name].weight  # (p, d)
        return weight.unsqueeze(0).expand(batch, -1, -1)

    def virtual_tokens(self, name: str) -> int:
        return self.prompt_encoder[name].num_embeddings


def initial_ids(config: Any, embeddings: nn.Embedding) -> torch.Tensor:
    """(p,) token ids whose embeddings start the prompt (TEXT or SAMPLE_VOCAB)."""
    p, device = config.num_virtual_tokens, embeddings.weight.device
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, embeddings.num_embeddings, (p,), device=device)
    ids = text_ids(config.prompt_tuning_init_text, config.tokenizer_name_or_path, config.tokenizer_kwargs)
    return repeat_to(ids, p, device)


def repeat_to(ids: list[int], p: int, device: torch.device | str) -> torch.Tensor:
    """(p,) ids: repeated, then cut to p."""
    return torch.tensor((ids * math.ceil(p / len(ids)))[:p], dtype=torch.long, device=device)


def text_ids(text: str, tokenizer_name_or_path: str, tokenizer_kwargs: dict | None = None) -> list[int]:
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path, **kwargs)
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise ValueError(f"the init text {text!r} tokenises to no tokens with {tokenizer_name_or_path!r}; "
                         "use a longer text")
    return list(ids)
