"""Prompt tuning against a direct computation: forward, labels, inits, generate, training.

The contract suite (tests/test_contract.py, row in case.py) covers switching, save/load, names,
disabling, requires_grad, deleting, config round trips and checkpointing; these tests cover what
is particular to a method that acts at the input.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from methods.prompt.helpers import WORDS, direct, save_tokenizer
from peftkit import PeftModel, PromptTuningConfig, get_peft_model
from tiny_models import FAMILIES, lm_losses, logits, model_inputs, tiny_llama

P = 4


def build(family: str, seed: int = 0, **overrides):
    builder, _, task = FAMILIES[family]
    return get_peft_model(builder(seed), PromptTuningConfig(**{"num_virtual_tokens": P, "task_type": task, **overrides}))


def padded_inputs(family: str) -> dict:
    x = model_inputs(batch=3, length=7)
    x["attention_mask"][1, :3] = 0  # a left-padded row: the mask must survive the extension
    if family == "bert":
        x["token_type_ids"] = torch.randint(0, 2, x["input_ids"].shape, generator=torch.Generator().manual_seed(3))
    return x


def prompt_of(model, name: str = "default") -> torch.Tensor:
    layer = next(l for _, l in model.base_model.adapter_layers() if name in getattr(l, "prompt_encoder", {}))
    return layer.prompt_encoder[name].weight.detach()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_equals_base_on_prompt_then_embeddings(family):
    model, x = build(family), padded_inputs(family)
    want = direct(FAMILIES[family][0](0), prompt_of(model), x).logits
    got = logits(model, x)
    assert got.shape == want.shape  # causal LMs return p + n positions, as HF's do
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_loss_ignores_the_virtual_tokens(family):
    model, x = build(family), padded_inputs(family)
    labels = x["input_ids"].clone()
    with torch.no_grad():
        loss = model(**x, labels=labels).loss
    prefixed = torch.cat([torch.full((3, P), -100), labels], dim=1)
    want = direct(FAMILIES[family][0](0), prompt_of(model), x, labels=prefixed).loss
    torch.testing.assert_close(loss, want, atol=0, rtol=0)


def test_inputs_embeds_and_positional_input_ids_work():
    model, x = build("llama"), model_inputs()
    want = logits(model, x)
    embeds = model.get_input_embeddings()(x["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=x["attention_mask"]).logits, want)
        torch.testing.assert_close(model(x["input_ids"], attention_mask=x["attention_mask"]).logits, want)


def test_position_ids_are_dropped_with_a_warning():
    model, x = build("llama"), model_inputs()
    with pytest.warns(UserWarning, match="position_ids are ignored"):
        got = logits(model, {**x, "position_ids": torch.arange(7).expand(3, -1)})
    torch.testing.assert_close(got, logits(model, x), atol=0, rtol=0)


@pytest.mark.parametrize("text,ids", [("the cat sat", [1, 2, 3, 1]), ("classify this review on a mat", [7, 8, 9, 4])])
def test_text_init_is_the_embeddings_of_the_text_repeated_or_cut(text, ids, tmp_path):
    tokenizer = save_tokenizer(tmp_path / "tok")
    model = build("llama", prompt_tuning_init="TEXT", prompt_tuning_init_text=text, tokenizer_name_or_path=tokenizer)
    table = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(prompt_of(model), table[ids], atol=0, rtol=0)


def test_sample_vocab_init_rows_are_vocabulary_embeddings():
    model = build("gpt2", prompt_tuning_init="SAMPLE_VOCAB")
    table = model.get_input_embeddings().weight.detach()
    for row in prompt_of(model):
        assert (table == row).all(dim=1).any()


def test_text_adapter_loads_without_its_tokenizer(tmp_path):
    """Loading skips the init (the file holds the prompt), so the tokenizer need not exist any more."""
    tokenizer = save_tokenizer(tmp_path / "tok")
    model = build("llama", prompt_tuning_init="TEXT", prompt_tuning_init_text="the cat", tokenizer_name_or_path=tokenizer)
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "tok" / "tokenizer.json").unlink()
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, model_inputs()), logits(model, model_inputs()), atol=0, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_equals_greedy_decoding_by_hand(family, use_cache):
    model, x = build(family), model_inputs(batch=2, length=5)
    out = model.generate(**x, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], x["input_ids"])
    ids = x["input_ids"]
    for _ in range(4):  # no cache: the prompt is prepended to the whole sequence each time
        step = logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -1].argmax(-1)
        ids = torch.cat([ids, step[:, None]], dim=1)
    assert torch.equal(out, ids)
    assert "prepare_inputs_for_generation" not in vars(model.get_base_model())  # the patch was undone


def test_disabled_adapter_generates_as_the_base_model():
    model, x = build("llama"), model_inputs(batch=2, length=5)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with model.disable_adapter():
        off = model.generate(**x, **kwargs)
    assert torch.equal(off, tiny_llama(0).generate(**x, **kwargs))


def test_only_the_prompt_trains_and_the_loss_falls():
    model = get_peft_model(tiny_llama(0, initializer_range=0.2), PromptTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"))
    x = model_inputs(batch=4, length=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.model.embed_tokens.prompt_encoder.default.weight"]
    losses = lm_losses(model, x, lr=0.1)
    assert losses[-1] < 0.9 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"base tensor {n} changed"


def test_merge_mixed_batches_and_two_prompts_are_refused_with_reasons():
    model, x = build("llama"), model_inputs(batch=2)
    model.add_adapter("other", PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="mixed batch"):
        model(**x, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="mixed batch"):
        model.generate(**x, adapter_names=["default", "other"], max_new_tokens=2)
    with pytest.raises(ValueError, match="cannot be active together"):
        model.set_adapter(["default", "other"])
    model.set_adapter("other")
    assert logits(model, x).shape[1] == 2 + 7
    assert isinstance(model.unload(), type(tiny_llama()))


def test_prompt_and_lora_adapters_share_a_model():
    from peftkit import LoraConfig

    model, x = build("llama"), model_inputs()
    prompt_only = logits(model, x)
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    model.set_adapter(["default", "lora"])
    both = logits(model, x)
    assert both.shape == prompt_only.shape and not torch.allclose(both, prompt_only)
    model.set_adapter("default")
    assert torch.equal(logits(model, x), prompt_only)


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens"),
    (dict(token_dim=-1), "token_dim"),
    (dict(prompt_tuning_init="ZEROS"), "prompt_tuning_init"),
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"), "tokenizer_name_or_path"),
    (dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="tok"), "prompt_tuning_init_text"),
    (dict(tokenizer_kwargs={"use_fast": True}), "tokenizer_kwargs"),
    (dict(task_type="SEQ_2_SEQ_LM"), "task_type"),
    (dict(num_transformer_submodules=2), "num_transformer_submodules"),
])
def test_config_errors_name_field_value_and_what_is_allowed(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: expected "):
        PromptTuningConfig(**kwargs)


def test_config_fills_sizes_from_the_model_as_hf_does():
    config = build("gpt2").peft_config["default"]
    assert (config.token_dim, config.num_transformer_submodules, config.num_attention_heads, config.num_layers) == (32, 1, 4, 2)
    assert config.peft_type == "PROMPT_TUNING" and len(WORDS) < 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PromptTuningConfig.from_dict(config.to_dict())
