"""patch_model on a tiny Llama: same loss and gradients as the unpatched model."""

import copy

import pytest
import torch
from tiny_models import tiny_llama

from peftkit import LoraConfig, get_peft_model
from peftkit.kernels import patch_model, unpatch_model


def _batch(seed=3, batch=2, length=9, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_report_names_the_llama_modules():
    report = patch_model(tiny_llama())
    assert len(report.rms_norm) == 5 and len(report.mlp) == 2 and report.causal_lm_loss == [""]
    assert report.rope == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "5 RMSNorm, 2 MLP, 2 RoPE, 1 causal-LM loss" in str(report)


def test_an_unpatched_model_beside_a_patched_one_is_unchanged():
    plain, other = tiny_llama(), tiny_llama()
    batch = _batch()
    before = plain(**batch).logits
    patch_model(other)
    torch.testing.assert_close(plain(**batch).logits, before, rtol=0, atol=0)


def test_full_model_same_loss_and_grads():
    plain = tiny_llama().train()
    patched = copy.deepcopy(plain)
    patch_model(patched)
    out_a, grads_a = _loss_and_grads(plain, _batch())
    out_b, grads_b = _loss_and_grads(patched, _batch())
    assert out_b.logits is None
    torch.testing.assert_close(out_b.loss, out_a.loss)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


@pytest.mark.parametrize("patch_first", [True, False])
def test_lora_model_same_loss_and_adapter_grads(patch_first):
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    plain = get_peft_model(tiny_llama(), config).train()
    patched_base = tiny_llama()
    if patch_first:
        patch_model(patched_base)
    patched = get_peft_model(patched_base, copy.deepcopy(config)).train()
    patched.load_state_dict(plain.state_dict())
    if not patch_first:
        patch_model(patched)
    out_a, grads_a = _loss_and_grads(plain, _batch())
    out_b, grads_b = _loss_and_grads(patched, _batch())
    torch.testing.assert_close(out_b.loss, out_a.loss)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_without_labels_and_after_unpatch_logits_come_back():
    model = tiny_llama()
    patch_model(model)
    batch = _batch()
    labels = batch.pop("labels")
    assert model(**batch).logits.shape == (2, 9, 64)
    assert model(**batch, labels=labels, return_dict=False)[0].ndim == 0
    unpatch_model(model)
    assert model(**batch, labels=labels).logits is not None


def test_unmasked_rows_skip_mask_building_and_keep_the_loss(monkeypatch):
    from transformers import masking_utils

    plain = tiny_llama(attn_implementation="sdpa").train()
    patched = copy.deepcopy(plain)
    patch_model(patched)
    built, original = [], masking_utils._preprocess_mask_arguments
    monkeypatch.setattr(masking_utils, "_preprocess_mask_arguments",
                        lambda *a, **k: built.append(1) or original(*a, **k))
    batch = {k: v for k, v in _batch().items() if k != "attention_mask"}  # plain causal rows
    out_a, grads_a = _loss_and_grads(plain, batch)
    out_b, grads_b = _loss_and_grads(patched, batch)
    assert len(built) == 1 and out_b.logits is None  # the unpatched model built its mask; we did not
    torch.testing.assert_close(out_b.loss, out_a.loss)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    patched(**_batch())  # with an attention_mask the family's own mask is built
    assert len(built) == 2
