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


def lm_losses(model, inputs: dict, steps: int = 20, lr: float = 0.05) -> list[float]:
    """Train ``model``'s trainable tensors with Adam on the next-token loss of ``inputs``; the losses."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


class LinearConv1DNet(torch.nn.Module):
    """x (batch, 8) -> logits (batch, 4) through an nn.Linear ("lin") and a GPT-2 Conv1D ("gpt",
    (in, out) weight); returns a dict with the cross-entropy loss when labels are given."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(8, 16)
        self.gpt = Conv1D(4, 16)  # in=16, out=4

    def forward(self, x, labels=None):
        logits = self.gpt(torch.relu(self.lin(x)))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}
