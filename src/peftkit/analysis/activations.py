"""Activation memory of one training step: the tensors autograd keeps from forward for backward.

Counted per token (batch x sequence) and per transformer block, in bytes, for the two block styles
peftkit's bundled models use, following what PyTorch + transformers actually save (measured with
``torch.autograd.graph.saved_tensors_hooks`` in tests/analysis/test_activations.py). ``d`` is the
compute dtype's byte size, ``h`` the hidden size, ``i`` the MLP width, ``a`` the attention heads,
``kv`` the key/value width (kv heads x head dim), ``s`` the sequence length. A linear layer keeps
its input only when its weight trains or it carries an adapter (plus ``r * d`` for the adapter's
``x A^T``); several linears reading one tensor share it ("slots" below).

Llama-style block (RMSNorm computed in fp32, SDPA, gated SiLU MLP), per token:
    norms        2 x (4h + 4)              fp32 input and 1/rms; + h*d each if the norm weight trains
    slots        h*d (q/k/v input) + h*d (gate/up input) + i*d (down input), when used;
                 o_proj reads SDPA's output buffer, which is counted below
    attention    (2h + 2kv) * d + 4a       q, k, v, output, fp32 log-sum-exp
    MLP          3i * d                    gate output, SiLU output, up output
BERT-style block (LayerNorm, attention with dropout in the math path, GELU MLP), per token:
    slots        h*d (q/k/v), h*d (attention output dense), h*d (intermediate), i*d (output dense)
    attention    3h*d + 3*a*s*d            q, k, v; softmax, dropout mask, dropped probabilities
                 (without attention dropout: 4h*d + 4a, SDPA's flash path: q, k, v, out, lse,
                 and the attention output dense reads SDPA's output buffer)
    LayerNorms   2 x (h*d + 8)             input, fp32 mean and rstd
    dropout      2 x h*d                   masks after attention output and MLP output (p > 0)
    GELU         i*d                       its input
Outside the blocks: the final norm, the head's input if the head trains, the fp32 log-softmax of
the logits for a causal LM (vocab x 4 bytes per token), token indices (8 bytes) for trained
embeddings, BERT's embedding LayerNorm and dropout mask.
Gradient checkpointing keeps only each block's input (h*d per token per block); backward then
recomputes one block at a time, so one block's activations are alive on top (``recompute``).
Checked (tests/analysis/test_memory.py): both styles in fp32 to 1% per block, and the Llama style
in bf16 under autocast to 3%. Not modelled: BERT under bf16 autocast, which runs LayerNorm and
softmax in fp32 and so keeps about 40% more than this formula's bf16 figure (measured on a tiny
BERT); rotary cos/sin tables and attention masks (per position, not per token and block); the first
block saving less when nothing before it trains; LoRA dropout (which copies its input); prompt
tuning's extra virtual tokens; and the own saved tensors of methods other than linear adapters,
approximated by their input (what a LoRA-style layer keeps).
Per block, independent of tokens: peftkit's fused LoRA node keeps its scaled B^T (r x out values
per adapted linear).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from peftkit.engine.layer import AdapterLayer
from peftkit.engine.targets import is_linear

BERT_STYLE = ("bert", "roberta", "xlm-roberta", "electra", "camembert")
FP32 = 4
LAYER_ZERO = re.compile(r"(^|\.)(layers|layer|h|blocks)\.0\.")


@dataclass(frozen=True)
class BlockShape:
    style: str  # "llama" or "bert"
    hidden: int
    intermediate: int
    heads: int
    kv: int  # key/value width: kv heads x head dim
    layers: int
    vocab: int
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    @classmethod
    def from_config(cls, config) -> "BlockShape":
        need = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
        missing = [k for k in need if getattr(config, k, None) is None]
        if missing:
            raise ValueError(f"activation estimates need a Llama- or BERT-style config; model type "
                             f"{config.model_type!r} lacks {missing}")
        h, heads = config.hidden_size, config.num_attention_heads
        kv = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or h // heads)
        style = "bert" if config.model_type in BERT_STYLE else "llama"
        return cls(style, h, config.intermediate_size, heads, kv, config.num_hidden_layers, config.vocab_size,
                   getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0,
                   getattr(config, "hidden_dropout_prob", 0.0) or 0.0)


@dataclass
class Training:
    """What trains in one block (read from a model, full or adapted) and outside it."""

    slots: dict[str, int] = field(default_factory=dict)  # slot -> summed adapter width (0: weight trains)
    norms: bool = False  # norm weights train
    embeddings: bool = False
    head: bool = False
    factor_values: int = 0  # r x out per adapted linear: the scaled B^T a fused LoRA node keeps



LLAMA_SLOTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
               "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
BERT_SLOTS = {"query": "attn_in", "key": "attn_in", "value": "attn_in", "attention.output.dense": "o_in",
              "intermediate.dense": "mlp_in", "output.dense": "down_in"}


def slot_of(key: str, style: str) -> str | None:
    table = BERT_SLOTS if style == "bert" else LLAMA_SLOTS
    for suffix, slot in sorted(table.items(), key=lambda kv: -len(kv[0])):  # longest suffix first
        if key == suffix or key.endswith("." + suffix):
            return slot
    return None


def adapter_width(layer: AdapterLayer) -> int | None:
    """The narrow side of a trainable adapter's 2-D tensors (LoRA's r), 0 for vectors, None if frozen."""
    base = set(map(id, layer.base_layer.parameters()))
    tensors = [p for p in layer.parameters() if p.requires_grad and id(p) not in base]
    if not tensors:
        return None
    return max((min(p.shape) for p in tensors if p.dim() == 2), default=0)


def read_training(model: nn.Module, style: str) -> Training:
    """Which slots of block 0 keep their input, whether norms, embeddings and head train."""
    found = Training()
    for key, module in model.named_modules():
        if LAYER_ZERO.search(key):
            _read_module(found, key, module, style)
    found.embeddings = any(p.requires_grad for m in model.modules() if isinstance(m, nn.Embedding)
                           for p in m.parameters(recurse=False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found.head = head is not None and any(p.requires_grad for p in head.parameters())
    return found


def _read_module(found: Training, key: str, module: nn.Module, style: str) -> None:
    if isinstance(module, AdapterLayer):
        width = adapter_width(module)
        slot = slot_of(key, style)
        if width is not None and slot:
            found.slots[slot] = found.slots.get(slot, 0) + width
            found.factor_values += width * getattr(module.base_layer, "out_features", 0)
        return
    if is_linear(module) and module.weight.requires_grad and slot_of(key, style):
        found.slots.setdefault(slot_of(key, style), 0)
    if "norm" in type(module).__name__.lower() and any(p.requires_grad for p in module.parameters(recurse=False)):
        found.norms = True


def block_bytes(shape: BlockShape, trains: Training, seq: int, d: int) -> float:
    """Saved bytes per token for one block."""
    return (_llama_block if shape.style == "llama" else _bert_block)(shape, trains, seq, d)


def _slot_bytes(shape: BlockShape, trains: Training, d: int, o_in_shared: bool) -> int:
    width = {"attn_in": shape.hidden, "o_in": 0 if o_in_shared else shape.hidden, "mlp_in": shape.hidden,
             "down_in": shape.intermediate}
    return sum((width[slot] + extra) * d for slot, extra in trains.slots.items())


def _llama_block(shape: BlockShape, trains: Training, seq: int, d: int) -> float:
    h, i, kv, a = shape.hidden, shape.intermediate, shape.kv, shape.heads
    norms = 2 * (FP32 * h + FP32 + (h * d if trains.norms else 0))
    attention = (2 * h + 2 * kv) * d + FP32 * a
    return norms + _slot_bytes(shape, trains, d, o_in_shared=True) + attention + 3 * i * d


def _bert_block(shape: BlockShape, trains: Training, seq: int, d: int) -> float:
    h, i, a = shape.hidden, shape.intermediate, shape.heads
    if shape.attention_dropout > 0:
        attention = 3 * h * d + 3 * a * seq * d
    else:
        attention = 4 * h * d + FP32 * a
    dropout = 2 * h * d if shape.hidden_dropout > 0 else 0
    layer_norms = 2 * (h * d + 2 * FP32)
    shared = shape.attention_dropout == 0  # SDPA's output buffer is then the output dense's input
    return _slot_bytes(shape, trains, d, o_in_shared=shared) + attention + dropout + layer_norms + i * d


def outside_bytes(shape: BlockShape, trains: Training, d: int) -> float:
    """Saved bytes per token outside the blocks (embeddings, final norm, head, loss)."""
    h = shape.hidden
    indices = 8 if trains.embeddings else 0
    if shape.style == "bert":
        return indices + h * d + 2 * FP32 + (h * d if shape.hidden_dropout > 0 else 0)
    final_norm = FP32 * h + FP32 + (h * d if trains.norms else 0)
    return indices + final_norm + (h * d if trains.head else 0) + FP32 * shape.vocab + 8


@dataclass(frozen=True)
class ActivationBytes:
    blocks: float  # all blocks, as kept through forward
    outside: float
    recompute: float  # one block's activations, alive while backward recomputes it (checkpointing)

    @property
    def peak(self) -> float:
        return self.blocks + self.outside + self.recompute


def activation_bytes(shape: BlockShape, trains: Training, batch: int, seq: int, d: int,
                     checkpointing: bool = False) -> ActivationBytes:
    tokens = batch * seq
    block = block_bytes(shape, trains, seq, d) * tokens + trains.factor_values * d
    outside = outside_bytes(shape, trains, d) * tokens
    if checkpointing:
        return ActivationBytes(shape.layers * shape.hidden * d * tokens, outside, block)
    return ActivationBytes(shape.layers * block, outside, 0.0)
