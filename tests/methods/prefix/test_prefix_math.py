"""Prefix tuning against a direct computation: attention over [prefix ; keys] by hand, the
reparameterization MLP, folding on save, the mask, generate, training and errors.

The contract suite (tests/test_contract.py, row in case.py) covers switching, save/load, names,
disabling, requires_grad, deleting and config round trips; HF interop is in test_prefix_interop.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from peftkit import PeftConfig, PeftModel, PrefixTuningConfig, PTuningV2Config, get_peft_model
from tiny_models import FAMILIES, lm_losses, logits, model_inputs, tiny_bert, tiny_llama

P = 4


def build(family: str = "llama", seed: int = 0, **overrides):
    builder, _, task = FAMILIES[family]
    torch.manual_seed(seed + 100)
    return get_peft_model(builder(seed), PrefixTuningConfig(**{"num_virtual_tokens": P, "task_type": task, **overrides}))


def encoder(model, name: str = "default"):
    layer = next(l for _, l in model.base_model.adapter_layers() if name in getattr(l, "prompt_encoder", {}))
    return layer.prompt_encoder[name]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_by_hand(attn, hidden, cos, sin, pk, pv, mask):
    """Llama attention over [prefix ; sequence]: prefix keys are used as stored (no rotation)."""
    b, n, _ = hidden.shape
    hd = attn.head_dim
    q = attn.q_proj(hidden).view(b, n, -1, hd).transpose(1, 2)  # (b, H, n, hd)
    k = attn.k_proj(hidden).view(b, n, -1, hd).transpose(1, 2)  # (b, KV, n, hd)
    v = attn.v_proj(hidden).view(b, n, -1, hd).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (b, KV, p + n, hd)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (b, H, p + n, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (b, H, n, p + n)
    p = pk.shape[2]
    causal = torch.ones(n, p + n, dtype=torch.bool).tril(diagonal=p)  # query i sees the prefix and j <= i
    allowed = causal[None] & torch.cat([torch.ones(b, p, dtype=torch.bool), mask.bool()], 1)[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = scores.softmax(-1) @ v  # (b, H, n, hd)
    return attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def test_every_layer_attends_over_the_prefix_then_the_keys_as_computed_by_hand():
    model, x = build("llama"), model_inputs(batch=3, length=7)
    x["attention_mask"][1, :3] = 0
    config = model.peft_config["default"]
    z = encoder(model)().detach()[0]  # (p, L*2*d)
    heads, hd = config.num_attention_heads, config.token_dim // config.num_attention_heads
    seen = {}
    for index, block in enumerate(model.get_base_model().model.layers):
        block.self_attn.register_forward_hook(
            lambda m, args, kwargs, out, i=index: seen.__setitem__(i, (kwargs, out[0])), with_kwargs=True)
    logits(model, x)
    base = model.get_base_model()
    for index, block in enumerate(base.model.layers):
        kwargs, out = seen[index]
        hidden, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
        want_cos, _ = base.model.rotary_emb(hidden, torch.arange(P, P + 7)[None])  # real tokens numbered from p
        torch.testing.assert_close(cos, want_cos.expand_as(cos))
        pk = z[:, (2 * index) * config.token_dim:(2 * index + 1) * config.token_dim].view(P, heads, hd)
        pv = z[:, (2 * index + 1) * config.token_dim:(2 * index + 2) * config.token_dim].view(P, heads, hd)
        pk, pv = (t.permute(1, 0, 2)[None].expand(3, -1, -1, -1) for t in (pk, pv))  # (b, KV, p, hd)
        with torch.no_grad():
            want = attention_by_hand(block.self_attn, hidden, cos, sin, pk, pv, x["attention_mask"])
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_the_mask_is_widened_so_padding_is_ignored_and_the_prefix_seen():
    model, x = build("bert"), model_inputs(batch=2, length=6)
    x["attention_mask"][0, 4:] = 0  # right padding: BERT pools the first token
    changed = {**x, "input_ids": x["input_ids"].clone()}
    changed["input_ids"][0, 4:] = (changed["input_ids"][0, 4:] + 1) % 64
    torch.testing.assert_close(logits(model, changed)[0], logits(model, x)[0], atol=1e-6, rtol=0)
    before = logits(model, x)
    with torch.no_grad():
        encoder(model).embedding.weight.mul_(2.0)
    assert not torch.allclose(logits(model, x), before, atol=1e-4)  # the prefix is attended to


def test_projection_is_the_two_layer_tanh_mlp_by_hand_and_the_file_holds_its_output(tmp_path):
    model = build("gpt2", prefix_projection=True, encoder_hidden_size=12)
    enc = encoder(model)
    e = enc.embedding.weight.detach()  # (p, d)
    first, last = enc.transform[0], enc.transform[2]
    want = torch.tanh(e @ first.weight.T + first.bias) @ last.weight.T + last.bias  # (p, L*2*d)
    assert want.shape == (P, 2 * 2 * 32)
    torch.testing.assert_close(enc()[0].detach(), want, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == {"prompt_embeddings"}
    torch.testing.assert_close(saved["prompt_embeddings"], want, atol=1e-6, rtol=0)
    loaded = PeftModel.from_pretrained(FAMILIES["gpt2"][0](0), tmp_path)
    assert [n for n, _ in loaded.named_parameters() if "prompt_encoder" in n] == [
        "base_model.model.transformer.wte.prompt_encoder.default.embedding.weight"]  # folded: Z only
    torch.testing.assert_close(logits(loaded, model_inputs()), logits(model, model_inputs()), atol=1e-6, rtol=0)


def test_a_projected_file_is_refused_for_training_with_the_fix_which_works(tmp_path):
    build("llama", prefix_projection=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="prefix_projection MLP is folded away") as err:
        PeftModel.from_pretrained(tiny_llama(0), tmp_path, is_trainable=True)
    assert "prefix_projection=False" in str(err.value)
    config = PrefixTuningConfig.from_pretrained(tmp_path, prefix_projection=False)
    resumed = PeftModel.from_pretrained(tiny_llama(0), tmp_path, is_trainable=True, config=config)
    frozen = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    torch.testing.assert_close(logits(resumed, model_inputs()), logits(frozen, model_inputs()), atol=0, rtol=0)
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == [
        "base_model.model.model.embed_tokens.prompt_encoder.default.embedding.weight"]


@pytest.mark.parametrize("projection", [False, True])
def test_zero_init_gives_zero_prefixes(projection):
    z = encoder(build("llama", init_weights="zero", prefix_projection=projection))().detach()
    assert z.shape == (1, P, 2 * 2 * 16) and not z.any()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_equals_greedy_decoding_by_hand(family, use_cache):
    model, x = build(family), model_inputs(batch=2, length=5)
    out = model.generate(**x, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], x["input_ids"])
    ids = x["input_ids"]
    for _ in range(4):  # no cache: the prefix is put in front of the whole sequence each time
        step = logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -1].argmax(-1)
        ids = torch.cat([ids, step[:, None]], dim=1)
    assert torch.equal(out, ids)
    assert "prepare_inputs_for_generation" not in vars(model.get_base_model())  # the patch was undone


def test_forward_continues_from_the_cache_it_returned():
    model, x = build("llama"), model_inputs(batch=2, length=6)
    full = logits(model, x)
    with torch.no_grad():
        first = model(input_ids=x["input_ids"][:, :4], attention_mask=x["attention_mask"][:, :4], use_cache=True)
        assert first.past_key_values.get_seq_length() == P + 4
        rest = model(input_ids=x["input_ids"][:, 4:], attention_mask=x["attention_mask"],
                     past_key_values=first.past_key_values).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_disabled_adapter_generates_as_the_base_model():
    model, x = build("llama"), model_inputs(batch=2, length=5)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with model.disable_adapter():
        off = model.generate(**x, **kwargs)
    assert torch.equal(off, tiny_llama(0).generate(**x, **kwargs))


@pytest.mark.parametrize("projection", [False, True])
def test_only_the_prefix_trains_and_the_loss_falls(projection):
    model = get_peft_model(tiny_llama(0, initializer_range=0.2),
                           PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM", prefix_projection=projection))
    x = model_inputs(batch=4, length=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all(".prompt_encoder.default." in n for n, p in model.named_parameters() if p.requires_grad)
    losses = lm_losses(model, x, lr=0.05)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_sizes_follow_the_model_with_grouped_query_attention_as_hf_does():
    config = build("llama").peft_config["default"]  # 4 query heads, 2 key/value heads of width 8
    assert (config.token_dim, config.num_attention_heads, config.num_layers, config.encoder_hidden_size) == (16, 2, 2, 16)
    config = build("bert").peft_config["default"]
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (32, 4, 2)


def test_ptuning_v2_is_prefix_tuning_without_the_mlp_saved_as_hf_saves_it(tmp_path):
    with pytest.raises(ValueError, match="^prefix_projection=True is invalid"):
        PTuningV2Config(prefix_projection=True)
    torch.manual_seed(100)
    v2 = get_peft_model(tiny_llama(0), PTuningV2Config(num_virtual_tokens=P, task_type="CAUSAL_LM"))
    plain = build("llama")
    torch.testing.assert_close(logits(v2, model_inputs()), logits(plain, model_inputs()), atol=0, rtol=0)
    v2.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is PrefixTuningConfig and config.peft_type == "PREFIX_TUNING" and not config.prefix_projection


def test_merge_mixed_batches_and_two_prefixes_are_refused_with_reasons():
    model, x = build("llama"), model_inputs(batch=2)
    model.add_adapter("other", PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="mixed batch"):
        model(**x, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="cannot be active together"):
        model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(input_ids=x["input_ids"], attention_mask=x["attention_mask"][:, None, None, :])
    assert isinstance(model.unload(), type(tiny_llama()))


def test_prefix_and_lora_adapters_share_a_model():
    from peftkit import LoraConfig

    model, x = build("llama"), model_inputs()
    prefix_only = logits(model, x)
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    model.set_adapter(["default", "lora"])
    assert not torch.allclose(logits(model, x), prefix_only)
    model.set_adapter("default")
    assert torch.equal(logits(model, x), prefix_only)


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens"),
    (dict(init_weights="ones"), "init_weights"),
    (dict(prefix_projection="yes"), "prefix_projection"),
    (dict(encoder_hidden_size=0), "encoder_hidden_size"),
    (dict(token_dim=30, num_attention_heads=4), "token_dim"),
    (dict(task_type="SEQ_2_SEQ_LM"), "task_type"),
    (dict(num_transformer_submodules=2), "num_transformer_submodules"),
])
def test_config_errors_name_field_value_and_what_is_allowed(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: expected "):
        PrefixTuningConfig(**kwargs)


def test_classifier_head_trains_with_the_prefix():
    model = get_peft_model(tiny_bert(0), PrefixTuningConfig(num_virtual_tokens=P, task_type="SEQ_CLS"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"base_model.model.bert.embeddings.word_embeddings.prompt_encoder.default.embedding.weight",
                     "base_model.model.classifier.modules_to_save.default.weight",
                     "base_model.model.classifier.modules_to_save.default.bias"}
