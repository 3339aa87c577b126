"""Prefix tuning interop with Hugging Face PEFT (a test-only dependency), both directions.

An adapter trained a few steps and saved by one library loads in the other with the same outputs
(with and without the reparameterization MLP, which both fold into ``prompt_embeddings`` on saving);
both write the same keys, shapes and config fields; ``generate`` agrees token for token.
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
    return make_adapter(lib, family, "PrefixTuningConfig", **overrides)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("src,dst", DIRECTIONS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trained_adapter_loads_with_identical_outputs(family, src, dst, projection, tmp_path):
    model = make(src, family, prefix_projection=projection)
    train(model)
    model.save_pretrained(tmp_path)
    loaded, x = load(dst, family, tmp_path), inputs(family)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(loaded, x), logits(FAMILIES[family][0](), x), atol=1e-4)


@pytest.mark.parametrize("src,dst", DIRECTIONS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_agrees_token_for_token(family, src, dst, tmp_path):
    model = make(src, family)
    train(model)
    model.save_pretrained(tmp_path)
    other, x = load(dst, family, tmp_path), model_inputs(batch=2, length=5)
    x["attention_mask"][0, :2] = 0
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(other.generate(**x, **kwargs), model.generate(**x, **kwargs))


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_trainable_parameters_keys_shapes_and_config(family, projection, tmp_path):
    built = {lib: make(lib, family, prefix_projection=projection, encoder_hidden_size=12) for lib in LIBS}
    keys = assert_same_layout_as_hf(built, tmp_path, "PrefixTuningConfig")
    assert "prompt_embeddings" in keys
