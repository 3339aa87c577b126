"""Packed rows compute exactly what their sequences compute alone (fp32, CPU), with and without
patch_model: every token's logits, the batch loss, and the LoRA gradients.

The references are direct: each sequence run by itself (logits), the token-weighted sum of its
cross-entropies (loss), and the same sequences in a right-padded batch with an attention mask
(gradients). A packing that does not restart position_ids must fail the logits check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_gpt2, tiny_llama

import peftkit
from peftkit.data import IGNORE_INDEX, CausalLMCollator, FeatureDataset
from peftkit.data.packing import PackedCollator, pack_dataset
from peftkit.kernels import patch_model

LENGTHS = [7, 3, 11, 5, 9, 14, 4, 6]  # several sequences per row at max_length 16, one near-full row
MAX_LENGTH = 16
PAD = 0


def sequences(vocab: int, seed: int = 0) -> FeatureDataset:
    """Random token sequences; the first 1..3 labels of each are -100 (a prompt, as Q/A data has)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        prompt = 1 + i % 3
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return FeatureDataset(out)


def smollm2_shaped(seed: int = 0):
    """SmolLM2-135M's architecture (hidden 576, 9 query / 3 KV heads of 64, RoPE theta 1e5, tied
    embeddings) cut to 2 layers and a 1,024-token vocabulary, randomly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


MODELS = {
    "llama-sdpa": (lambda: tiny_llama(attn_implementation="sdpa"), 64),
    "llama-eager": (lambda: tiny_llama(attn_implementation="eager"), 64),
    "smollm2-shaped": (smollm2_shaped, 1024),
}


def build(name: str, patched: bool):
    make, vocab = MODELS[name]
    model = make()
    if patched:
        report = patch_model(model)
        assert report.rope and report.rms_norm and report.causal_lm_loss  # the fused paths are in play
    return model, vocab


def packed_logit_error(model, data: FeatureDataset, packed, batch: dict) -> float:
    """Largest |logit(packed row) - logit(sequence alone)| over every token of every sequence.

    Called without labels: patch_model's causal-LM forward forms no logits when it has labels.
    """
    with torch.no_grad():
        rows = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (rows, longest, vocab)
        worst = 0.0
        for r, group in enumerate(packed.groups):
            offset = 0
            for i in group:
                ids = torch.tensor([data[i]["input_ids"]])
                alone = model(input_ids=ids).logits[0]  # (n, vocab)
                worst = max(worst, float((rows[r, offset : offset + len(alone)] - alone).abs().max()))
                offset += len(alone)
    return worst


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "patch_model"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_token_of_a_packed_row_has_the_logits_of_its_sequence_alone(name, patched):
    model, vocab = build(name, patched)
    data = sequences(vocab)
    packed = pack_dataset(data, MAX_LENGTH)
    assert max(len(g) for g in packed.groups) >= 3 and len(packed) < len(data)  # real packing happened
    batch = PackedCollator(PAD)(list(packed.rows))
    assert len({len(r["input_ids"]) for r in packed.rows}) > 1  # and rows were padded
    assert packed_logit_error(model, data, packed, batch) < 1e-5


def test_gpt2_packed_rows_match_too():
    """Another family (learned absolute positions, Conv1D projections) through the same mask path."""
    model = tiny_gpt2()
    data = sequences(64)
    packed = pack_dataset(data, MAX_LENGTH)
    assert packed_logit_error(model, data, packed, PackedCollator(PAD)(list(packed.rows))) < 1e-5


@pytest.mark.parametrize("wrong", ["positions not restarted", "cache left on"])
def test_the_logits_check_fails_on_a_wrong_packing(wrong):
    model, vocab = build("llama-sdpa", patched=False)
    data = sequences(vocab)
    packed = pack_dataset(data, MAX_LENGTH)
    batch = PackedCollator(PAD)(list(packed.rows))
    if wrong == "positions not restarted":
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    else:  # transformers skips its packed-sequence check when a cache exists
        batch["use_cache"] = True
    assert packed_logit_error(model, data, packed, batch) > 1e-3


def token_weighted_reference(model, data: FeatureDataset) -> torch.Tensor:
    """sum over sequences of the summed next-token cross-entropy / number of target tokens."""
    total, count = torch.zeros(()), 0
    for example in data:
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
        logits = model(input_ids=ids).logits[0]  # (n, vocab); position t predicts label t+1
        total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((labels[1:] != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "patch_model"])
@pytest.mark.parametrize("name", ["llama-sdpa", "smollm2-shaped"])
def test_packed_batch_loss_is_the_token_weighted_loss_of_its_sequences(name, patched):
    model, vocab = build(name, patched)
    data = sequences(vocab)
    packed = pack_dataset(data, MAX_LENGTH)
    with torch.no_grad():
        loss = model(**PackedCollator(PAD)(list(packed.rows))).loss
        reference = token_weighted_reference(model, data)
        padded = model(**CausalLMCollator(PAD)(list(data))).loss
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    assert loss.item() == pytest.approx(padded.item(), abs=1e-5)


def lora_model(name: str, patched: bool):
    """LoRA on every projection with B randomised, so both factors get a non-zero gradient."""
    base, vocab = build(name, patched=False)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"])
    model = peftkit.get_peft_model(base, config)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    if patched:
        patch_model(model)
    return model, vocab


def lora_grads(model, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "patch_model"])
@pytest.mark.parametrize("name", ["llama-sdpa", "smollm2-shaped"])
def test_lora_gradients_of_a_packed_batch_equal_the_padded_batch(name, patched):
    model, vocab = lora_model(name, patched)
    data = sequences(vocab)
    packed = pack_dataset(data, MAX_LENGTH)
    from_packed = lora_grads(model, PackedCollator(PAD)(list(packed.rows)))
    from_padded = lora_grads(model, CausalLMCollator(PAD)(list(data)))
    assert len(from_packed) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for n, g in from_packed.items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(g, from_padded[n], rtol=1e-4, atol=1e-6, msg=n)
