"""P-tuning interop with Hugging Face PEFT (a test-only dependency), both directions.

An adapter trained a few steps (MLP or LSTM encoder) and saved by one library loads in the other
with the same outputs: both fold the encoder into ``prompt_embeddings`` on saving; both write the
same keys, shapes and config fields; ``generate`` agrees token for token.
"""
from __future__ import annotations


import pytest
import torch

import peftkit as pk
from hf_interop import assert_same_layout_as_hf, load, padded_inputs as inputs, train
from hf_interop import make as make_adapter
from tiny_models import FAMILIES, logits, model_inputs

hf = pytest.importorskip("peft")

LIBS = {"hf": hf, "pk": pk}
DIRECTIONS = [("hf", "pk"), ("pk", "hf")]


def make(lib: str, family: str, **overrides):
    return make_adapter(lib, family, "PromptEncoderConfig", **overrides)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("src,dst", DIRECTIONS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trained_adapter_loads_with_identical_outputs(family, src, dst, encoder, tmp_path):
    model = make(src, family, encoder_reparameterization_type=encoder, encoder_hidden_size=16)
    train(model)
    model.save_pretrained(tmp_path)
    loaded, x = load(dst, family, tmp_path), inputs(family)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=0)
    base, ours = logits(FAMILIES[family][0](), x), logits(loaded, x)
    assert not torch.allclose(ours[:, -base.shape[1]:] if ours.dim() == 3 else ours, base, atol=1e-4)


@pytest.mark.parametrize("src,dst", DIRECTIONS)
def test_generate_agrees_token_for_token(src, dst, tmp_path):
    model = make(src, "llama")
    train(model)
    model.save_pretrained(tmp_path)
    other, x = load(dst, "llama", tmp_path), model_inputs(batch=2, length=5)
    x["attention_mask"][0, :2] = 0
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(other.generate(**x, **kwargs), model.generate(**x, **kwargs))


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_trainable_parameters_keys_shapes_and_config(family, encoder, tmp_path):
    kwargs = dict(encoder_reparameterization_type=encoder, encoder_hidden_size=12, encoder_dropout=0.1)
    built = {lib: make(lib, family, **kwargs) for lib in LIBS}
    keys = assert_same_layout_as_hf(built, tmp_path, "PromptEncoderConfig")
    assert keys == {"prompt_embeddings": (4, 32)} | (
        {"base_model.classifier.weight": (2, 32), "base_model.classifier.bias": (2,)} if family == "bert" else {})
