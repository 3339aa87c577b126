"""Memory formulas against what PyTorch actually allocates and saves, on tiny Llama and BERT models.

Weights, gradients and AdamW states must match tensor bytes after one real step exactly. Activations
are checked against the bytes autograd saves (``saved_tensors_hooks``, each storage counted once,
parameters excluded): per block within 1% (the difference between an L+1- and an L-block model), and
for the whole model within 10% (what the formula leaves out: rotary tables, masks, buffers).
"""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, get_peft_model
from peftkit.analysis import activations as act
from peftkit.analysis.memory import (MemoryOptions, adam_state_bytes, measure, nf4_bytes, quantizable,
                                     weight_bytes)

BATCH, SEQ = 2, 24


def llama(layers: int):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def bert(layers: int, dropout: float = 0.1):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=64, intermediate_size=112,
                                                    num_hidden_layers=layers, num_attention_heads=4,
                                                    max_position_embeddings=64, hidden_dropout_prob=dropout,
                                                    attention_probs_dropout_prob=dropout))


BERT_TARGETS = ["query", "value", "output.dense"]
BUILD = {"llama": (llama, ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM"),
         "bert": (bert, BERT_TARGETS, "SEQ_CLS"),
         "bert-no-dropout": (lambda layers: bert(layers, dropout=0.0), BERT_TARGETS, "SEQ_CLS")}


def prepared(family: str, layers: int, lora: bool):
    build, targets, task = BUILD[family]
    model = build(layers).train()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task))
    return model


def batch(family: str) -> dict:
    ids = torch.randint(0, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    labels = ids if family == "llama" else torch.zeros(BATCH, dtype=torch.long)  # bert*: one class per row
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def saved_bytes(model, inputs: dict) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


def estimate(model, family: str, checkpointing: bool = False) -> act.ActivationBytes:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shape = act.BlockShape.from_config(base.config)
    return act.activation_bytes(shape, act.read_training(model, shape.style), BATCH, SEQ, 4, checkpointing)


@pytest.mark.parametrize("family", ["llama", "bert", "bert-no-dropout"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_formula_per_block_matches_saved_tensors(family, lora):
    small, large = prepared(family, 1, lora), prepared(family, 2, lora)
    measured = saved_bytes(large, batch(family)) - saved_bytes(small, batch(family))
    predicted = estimate(large, family).blocks / 2
    assert predicted == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_formula_per_block_in_bf16_for_llama(lora):
    """A bf16 base under bf16 autocast (LoRA factors stay fp32): RMSNorm's fp32 upcast is in the formula."""
    models = [prepared("llama", layers, lora) for layers in (1, 2)]
    for model in models:
        (model.get_base_model() if lora else model).to(torch.bfloat16)
        for p in model.parameters():
            p.data = p.data.float() if p.requires_grad and lora else p.data
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = saved_bytes(models[1], batch("llama")) - saved_bytes(models[0], batch("llama"))
    shape = act.BlockShape.from_config(models[1].config)
    predicted = act.activation_bytes(shape, act.read_training(models[1], "llama"), BATCH, SEQ, 2).blocks / 2
    assert predicted == pytest.approx(measured, rel=0.03)  # LoRA: the fp32 factors' small copies are bf16 here


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_formula_for_the_whole_model_within_ten_percent(family, lora):
    model = prepared(family, 4, lora)
    found = estimate(model, family)
    assert found.blocks + found.outside == pytest.approx(saved_bytes(model, batch(family)), rel=0.10)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_gradient_checkpointing_keeps_only_block_inputs(family):
    small, large = prepared(family, 1, True), prepared(family, 2, True)
    for model in (small, large):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    measured = saved_bytes(large, batch(family)) - saved_bytes(small, batch(family))
    found = estimate(large, family, checkpointing=True)
    assert found.blocks / 2 == pytest.approx(measured, rel=0.01)
    assert found.recompute == pytest.approx(estimate(large, family).blocks / 2)


def one_adamw_step(model, family: str) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch(family)).loss.backward()
    optimizer.step()
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"weights": sum(t.untyped_storage().nbytes() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()),
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None),
            "optimizer": sum(t.numel() * t.element_size() for t in states)}


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_weights_gradients_and_adamw_states_equal_allocated_bytes(family, lora):
    model = prepared(family, 2, lora)
    shape = act.BlockShape.from_config((model.get_base_model() if lora else model).config)
    estimate_ = measure(model, "x", shape, MemoryOptions(batch_size=BATCH, seq_len=SEQ, dtype="fp32"))
    measured = one_adamw_step(model, family)
    assert estimate_.weights == measured["weights"]
    assert estimate_.gradients == measured["gradients"]
    assert estimate_.optimizer == measured["optimizer"]


def test_weight_bytes_of_a_half_precision_base_with_fp32_adapters():
    model = get_peft_model(llama(2).to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    lora = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in lora} == {torch.float32}
    base = [p for p in model.parameters() if not p.requires_grad]
    expected = 2 * sum(p.numel() for p in base) + 4 * sum(p.numel() for p in lora) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert weight_bytes(model, four_bit=False, double_quant=False) == expected


def test_nf4_bytes_per_parameter():
    n = 4096 * 4096
    assert nf4_bytes(n, double_quant=False) / n == pytest.approx(0.5 + 4 / 64)
    assert nf4_bytes(n, double_quant=True) / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-6)
    assert nf4_bytes(100, double_quant=False) == 50 + 4 * 2  # partial blocks round up


def test_four_bit_base_quantizes_block_linears_but_not_the_head():
    model = get_peft_model(llama(2), LoraConfig(r=4, target_modules=["q_proj"]))
    quant = quantizable(model)
    assert len(quant) == 2 * 7  # seven linears per block; lm_head and the LoRA factors are not quantized
    full = weight_bytes(model, four_bit=False, double_quant=False)
    saved = sum(4 * w.numel() - nf4_bytes(w.numel(), False) for w in quant)
    assert weight_bytes(model, four_bit=True, double_quant=False) == full - saved


def test_eight_bit_adam_states():
    assert adam_state_bytes(100, "adamw-8bit") == adam_state_bytes(100, "adamw") == 804  # small: fp32 states
    assert adam_state_bytes(8192, "paged-adamw-8bit") == 2 * (8192 + 4 * 32) + 4
