"""Tiny random-initialised models of three families, built deterministically, for fast tests."""
from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


# family -> (builder, LoRA targets, task type, forward inputs builder, output getter)
FAMILIES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM"),
    "bert": (tiny_bert, ["query", "value", "dense"], "SEQ_CLS"),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], "CAUSAL_LM"),
}


def model_inputs(seed: int = 1, batch: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
