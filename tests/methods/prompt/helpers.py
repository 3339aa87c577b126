"""Shared pieces of the prompt-tuning tests: a word-level tokenizer folder and a direct forward."""
from __future__ import annotations

import torch

WORDS = ["[UNK]", "the", "cat", "sat", "on", "a", "mat", "classify", "this", "review"]


def save_tokenizer(folder) -> str:
    """A tiny word-level tokenizer (ids 0..9, below every tiny model's vocab of 64), saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(str(folder))
    return str(folder)


def direct(base, prompt: torch.Tensor, inputs: dict, **extra):
    """The base model on [P ; E[x]] with the mask (and token types) extended by hand."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, p = ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.expand(batch, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([torch.ones(batch, p, dtype=mask.dtype), mask], dim=1)
    if "token_type_ids" in inputs:
        extra["token_type_ids"] = torch.cat([torch.zeros(batch, p, dtype=torch.long), inputs["token_type_ids"]], 1)
    with torch.no_grad():
        return base(inputs_embeds=embeds, attention_mask=mask, **extra)
