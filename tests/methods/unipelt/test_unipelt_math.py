"""UniPELT against direct computations: each gate by hand (LoRA per token, adapter per token, prefix
per example and layer inside the attention), gates at 1 and gates=False equal to the plain methods,
one file with the gates, training, and errors.

The contract suite (tests/test_contract.py, row in case.py) covers switching, save/load, names,
disabling, requires_grad, deleting and config round trips over three families.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from methods.prefix.test_prefix_math import attention_by_hand
from peftkit import (BottleneckConfig, LoraConfig, PeftModel, PrefixTuningConfig, UniPeltConfig, get_peft_model,
                     get_peft_model_state_dict, set_peft_model_state_dict)
from peftkit.engine.layer import AdapterLayer
from peftkit.methods.adapter.layer import BottleneckLayer
from peftkit.methods.lora.layer import LoraLinear
from peftkit.methods.prefix.layer import PrefixEmbedding
from peftkit.methods.unipelt.gates import GatedBottleneckLayer, GatedLoraLinear, PrefixGateLayer
from tiny_models import FAMILIES, lm_losses, logits, model_inputs, tiny_bert, tiny_llama

P = 3


def unipelt(family: str = "llama", seed: int = 0, gates: bool = True, **parts):
    builder, _, task = FAMILIES[family]
    options = dict(lora={"r": 2, "init_lora_weights": False}, prefix_tuning={"num_virtual_tokens": P},
                   adapter={"reduction_factor": 4, "init_weights": False})
    options.update(parts)
    torch.manual_seed(seed + 100)
    return get_peft_model(builder(seed), UniPeltConfig(task_type=task, gates=gates, **options))


def layers(model, kind):
    return {k: l for k, l in model.base_model.adapter_layers() if type(l) is kind}


def sigmoid_gate(linear, x):
    return torch.sigmoid(x @ linear.weight.T + linear.bias)


# -- each gate by hand -----------------------------------------------------------------------------
def test_lora_gate_scales_the_update_per_token_as_computed_by_hand():
    model = unipelt("llama")
    key, layer = next(iter(layers(model, GatedLoraLinear).items()))
    assert key.endswith("self_attn.base_layer.q_proj")  # inside the prefix gate around the attention
    x = torch.randn(2, 5, layer.in_features)
    a, b, g = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_gate["default"]
    want = layer.base_layer(x) + sigmoid_gate(g, x) * layer.scaling["default"] * (x @ a.T @ b.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)
    assert sigmoid_gate(g, x).shape == (2, 5, 1)


def test_adapter_gate_scales_the_adapter_per_token_as_computed_by_hand():
    model = unipelt("llama")
    layer = next(iter(layers(model, GatedBottleneckLayer).values()))
    x = torch.randn(2, 5, layer.base_layer.in_features)
    h = layer.base_layer(x)
    down, up, g = layer.adapter_down["default"], layer.adapter_up["default"], layer.adapter_gate["default"]
    want = h + sigmoid_gate(g, h) * F.linear(F.relu(F.linear(h, down.weight, down.bias)), up.weight, up.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)


def test_prefix_gate_scales_each_layers_prefix_values_by_its_mean_input_as_computed_by_hand():
    model, x = unipelt("llama"), model_inputs(batch=3, length=7)
    config = model.base_model.parts["default"][1][1]  # the prefix part's PrefixTuningConfig, sizes filled
    z = next(iter(layers(model, PrefixEmbedding).values())).prompt_encoder["default"]().detach()[0]  # (p, L*2*d)
    heads, hd, d = config.num_attention_heads, config.token_dim // config.num_attention_heads, config.token_dim
    seen = {}
    for index, block in enumerate(model.get_base_model().model.layers):
        assert isinstance(block.self_attn, PrefixGateLayer)
        block.self_attn.register_forward_hook(
            lambda m, args, kwargs, out, i=index: seen.__setitem__(i, (kwargs, out[0])), with_kwargs=True)
    logits(model, x)
    for index, block in enumerate(model.get_base_model().model.layers):
        kwargs, out = seen[index]
        hidden, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
        g = sigmoid_gate(block.self_attn.prefix_gate["default"], hidden.mean(dim=1))  # (b, 1): per example
        pk = z[:, 2 * index * d:(2 * index + 1) * d].view(P, heads, hd).permute(1, 0, 2)[None].expand(3, -1, -1, -1)
        pv = z[:, (2 * index + 1) * d:(2 * index + 2) * d].view(P, heads, hd).permute(1, 0, 2)[None]
        with torch.no_grad():
            want = attention_by_hand(block.self_attn.base_layer, hidden, cos, sin, pk, g[:, :, None, None] * pv,
                                     x["attention_mask"])
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(g, torch.ones_like(g))


@pytest.mark.parametrize("family, attention", [("llama", "sdpa"), ("llama", "eager"), ("bert", "sdpa"),
                                               ("bert", "eager"), ("gpt2", "sdpa")])
def test_prefix_gate_mean_skips_padding_so_a_padded_batch_gets_the_same_gates(family, attention):
    """The prefix gate's mean runs over real tokens only: the same rows, right-padded with other
    tokens, give the same gate in every layer (read from the mask the attention module is given:
    boolean under sdpa, additive under eager, absent for BERT without padding)."""
    builder, _, task = FAMILIES[family]
    base = builder(0)
    base.set_attn_implementation(attention)
    model = get_peft_model(base, UniPeltConfig(task_type=task, prefix_tuning={"num_virtual_tokens": P}))
    gates = {}
    for key, layer in layers(model, PrefixGateLayer).items():
        layer.prefix_gate["default"].register_forward_hook(
            lambda m, args, out, k=key: gates.setdefault(k, []).append(torch.sigmoid(out)))
    plain = model_inputs(batch=2, length=4)
    padded = {"input_ids": torch.cat([plain["input_ids"], torch.tensor([[5, 9], [63, 1]])], dim=1),
              "attention_mask": torch.cat([plain["attention_mask"], torch.zeros(2, 2, dtype=torch.long)], dim=1)}
    logits(model, plain), logits(model, padded)
    assert len(gates) == 2
    for key, (alone, with_padding) in gates.items():
        assert alone.shape == (2, 1)
        torch.testing.assert_close(with_padding, alone, atol=1e-5, rtol=1e-5, msg=key)


# -- gates at 1, and no gates, are the plain methods -----------------------------------------------
def plain_methods(family, source):
    """The base with plain LoRA, prefix and adapter adapters, all active, holding ``source``'s parts' tensors."""
    builder, _, task = FAMILIES[family]
    opts = source.peft_config["default"]
    model = get_peft_model(builder(0), PrefixTuningConfig(task_type=task, **opts.prefix_tuning), adapter_name="p")
    model.add_adapter("l", LoraConfig(task_type=task, **opts.lora))
    model.add_adapter("a", BottleneckConfig(task_type=task, **opts.adapter))
    model.set_adapter(["p", "l", "a"])
    copy_part_tensors(source, model)
    return model


def copy_part_tensors(source, target):
    """Each plain layer gets the composite's tensors of the same module (LoRA, prefix, adapter)."""
    theirs = {k.replace(".base_layer.", ".", 1) if isinstance(l, (LoraLinear,)) else k: l
              for k, l in source.base_model.adapter_layers()}
    with torch.no_grad():
        for key, layer in target.base_model.adapter_layers():
            for name in layer.adapter_names():
                if key in theirs and name in ("p", "l", "a") and not hasattr(layer, "modules_to_save"):
                    for local, tensor in layer.adapter_tensors(name).items():
                        tensor.copy_(theirs[key].adapter_tensors("default")[local])


def force_gates_open(model):
    with torch.no_grad():
        for _, layer in model.base_model.adapter_layers():
            for table in ("lora_gate", "adapter_gate", "prefix_gate"):
                for gate_linear in getattr(layer, table, {}).values():
                    gate_linear.weight.zero_()
                    gate_linear.bias.fill_(100.0)  # sigmoid(100) is 1.0 in float32


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gates_at_one_give_exactly_the_plain_methods_together(family):
    model, x = unipelt(family), model_inputs()
    gated = logits(model, x)
    force_gates_open(model)
    reference = logits(plain_methods(family, model), x)
    assert not torch.allclose(gated, reference, atol=1e-4)  # the gates did act
    torch.testing.assert_close(logits(model, x), reference, atol=1e-5, rtol=1e-5)


def test_without_gates_the_parts_are_the_plain_method_layers():
    model, x = unipelt("llama", gates=False), model_inputs()
    kinds = {type(l) for _, l in model.base_model.adapter_layers()}
    assert kinds == {LoraLinear, PrefixEmbedding, BottleneckLayer}
    torch.testing.assert_close(logits(model, x), logits(plain_methods("llama", model), x), atol=1e-5, rtol=1e-5)


# -- file, training, generate -----------------------------------------------------------------------
def test_one_file_holds_every_part_and_the_gates_and_reloads_exactly(tmp_path):
    model, x = unipelt("bert"), model_inputs()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "UNIPELT" and config["gates"] is True
    assert config["lora"] == {"r": 2, "lora_alpha": 16, "init_lora_weights": False}
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    for part in ("prompt_embeddings", "attention.self.prefix_gate.weight", "attention.self.base_layer.query.lora_gate.weight",
                 "attention.self.base_layer.value.lora_A.weight", "output.dense.adapter_gate.bias", "classifier.weight"):
        assert any(k.endswith(part) for k in keys), part
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_delete_then_re_add_under_the_same_name():
    model, x = unipelt("llama"), model_inputs()
    adapted, base = logits(model, x), logits(tiny_llama(0), x)
    config, tensors = UniPeltConfig.from_dict(model.peft_config["default"].to_dict()), get_peft_model_state_dict(model)
    model.add_adapter("other", config)
    model.delete_adapter("default")
    assert all("default" not in l.adapter_names() for _, l in model.base_model.adapter_layers())
    model.delete_adapter("other")
    assert not any(isinstance(m, AdapterLayer) for m in model.get_base_model().modules())
    assert torch.equal(logits(model, x), base)
    model.add_adapter("default", config)
    set_peft_model_state_dict(model, tensors)
    model.set_adapter("default")
    assert torch.equal(logits(model, x), adapted)


def test_every_part_and_gate_trains_and_the_loss_falls():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0, initializer_range=0.2),
                           UniPeltConfig(task_type="CAUSAL_LM", prefix_tuning={"num_virtual_tokens": P}))
    x = model_inputs(batch=4, length=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = lm_losses(model, x, lr=0.02)
    assert losses[-1] < 0.8 * losses[0], losses
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # every adapter tensor moved, no base tensor
    assert any("_gate." in n for n, p in model.named_parameters() if p.requires_grad)


def test_generate_runs_and_disabled_generates_as_the_base():
    model, x = unipelt("llama"), model_inputs(batch=2, length=4)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    first = model.generate(**x, **kwargs)
    assert first.shape == (2, 7) and torch.equal(model.generate(**x, **kwargs), first)
    with model.disable_adapter():
        assert torch.equal(model.generate(**x, **kwargs), tiny_llama(0).generate(**x, **kwargs))


def test_merge_is_refused_and_changes_nothing():
    model, x = unipelt("llama"), model_inputs()
    before = logits(model, x)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(logits(model, x), before)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(lora={"rank": 8}), r"lora has unknown option\(s\) \['rank'\]: LoraConfig takes"),
    (dict(lora={"bias": "all"}), r"lora\['bias'\]='all' is invalid: expected 'none'"),
    (dict(adapter={"placement": "parallel"}), r"adapter\['placement'\]='parallel' is invalid"),
    (dict(prefix_tuning={"num_virtual_tokens": 0}), r"prefix_tuning: num_virtual_tokens=0 is invalid"),
    (dict(gates="yes"), r"gates='yes' is invalid"),
])
def test_bad_options_fail_on_construction_naming_the_part(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UniPeltConfig(**kwargs)


def test_parts_that_clash_on_a_module_are_refused_and_change_nothing():
    base = tiny_llama(0)
    config = UniPeltConfig(task_type="CAUSAL_LM", lora={"target_modules": ["down_proj"]})
    with pytest.raises(ValueError, match="gated lora and gated adapter parts of this unipelt adapter both target "
                                         "module 'model.layers.0.mlp.down_proj'"):
        get_peft_model(base, config)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
