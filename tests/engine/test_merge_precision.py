"""Merging rounds once, in float32, and reports the error; tied weights are untied first."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from tiny_models import model_inputs, tiny_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_is_one_rounding_of_the_exact_sum(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64)).to(dtype)
    original = net[0].weight.detach().clone()
    peft = get_peft_model(net, LoraConfig(r=8, target_modules=["0"], init_lora_weights=False))
    layer = peft.base_model.model[0]
    exact = original.float() + layer.delta_weight("default")
    peft.merge_adapter()
    assert torch.equal(layer.base_layer.weight, exact.to(dtype))
    reported = peft.base_model.last_merge_error
    assert reported == pytest.approx((exact.to(dtype).float() - exact).abs().max().item())
    peft.unmerge_adapter()
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    # Unmerging rounds twice (the merged value, then the difference): within one unit in the last
    # place of the larger of the two magnitudes involved.
    back = layer.base_layer.weight.float()
    bound = ulp * (exact.abs() + original.float().abs()) + 1e-12
    assert ((back - original.float()).abs() <= bound).all()


def test_merging_into_a_tied_head_leaves_the_embeddings_alone():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.detach().clone()
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    x = model_inputs()
    with torch.no_grad():
        before = peft(**x).logits
    with pytest.warns(UserWarning, match="tied"):
        plain = peft.merge_and_unload()
    assert torch.equal(plain.model.embed_tokens.weight, embed)
    assert plain.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(plain(**x).logits, before, atol=1e-5, rtol=1e-5)
