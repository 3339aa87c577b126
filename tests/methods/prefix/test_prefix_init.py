"""Prefix init from real words: the prefix is the frozen model's own keys and values for a text, so
at step 0 the adapted model equals the base model reading [text ; input]."""
from __future__ import annotations

import json

import pytest
import torch

from methods.prompt.helpers import save_tokenizer
from peftkit import PeftModel, PrefixTuningConfig, get_peft_model
from peftkit.methods.prefix.init import init_from_ids
from tiny_models import tiny_bert, tiny_llama

P = 5


def prefixed(seed=0, **overrides):
    return get_peft_model(tiny_llama(seed), PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM", **overrides))


def test_init_from_ids_equals_the_base_model_reading_the_text_first():
    model, ids = prefixed(), torch.tensor([3, 9, 4, 1, 7])
    x = torch.randint(0, 64, (2, 6))
    init_from_ids(model.base_model, "default", ids)
    base = tiny_llama(0).eval()
    model.eval()
    with torch.no_grad():
        want = base(input_ids=torch.cat([ids.expand(2, -1), x], dim=1)).logits[:, P:]
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and it is a real change: not the base model on x alone
        assert (got - base(input_ids=x).logits).abs().max() > 1e-3


def test_text_config_tokenises_repeats_to_p_and_is_not_saved(tmp_path):
    tokenizer = save_tokenizer(tmp_path / "tok")
    model = prefixed(prefix_init_text="the cat sat", tokenizer_name_or_path=tokenizer)
    reference = prefixed()
    init_from_ids(reference.base_model, "default", torch.tensor([1, 2, 3, 1, 2]))  # "the cat sat" = 1 2 3, repeated
    x = torch.randint(0, 64, (2, 4))
    torch.testing.assert_close(model(input_ids=x).logits, reference(input_ids=x).logits, atol=0, rtol=0)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "prefix_init_text" not in saved and "tokenizer_name_or_path" not in saved
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter")  # no tokenizer needed to load
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6, rtol=1e-6)


def test_bad_combinations_and_encoders_are_refused_and_leave_no_trace(tmp_path):
    with pytest.raises(ValueError, match="prefix_projection"):
        PrefixTuningConfig(prefix_init_text="the cat", prefix_projection=True)
    with pytest.raises(ValueError, match="init_weights"):
        PrefixTuningConfig(prefix_init_text="the cat", init_weights="zero")
    tokenizer = save_tokenizer(tmp_path / "tok")
    model = get_peft_model(tiny_bert(0), PrefixTuningConfig(num_virtual_tokens=P, task_type="SEQ_CLS"))
    config = PrefixTuningConfig(num_virtual_tokens=P, task_type="SEQ_CLS", prefix_init_text="the cat",
                                tokenizer_name_or_path=tokenizer)
    with pytest.raises(ValueError, match="decoder models"):
        model.add_adapter("text", config)
    assert "text" not in model.peft_config
