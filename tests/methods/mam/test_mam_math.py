"""The MAM adapter and the parallel adapter against direct computations, and the composite engine
behaviour they rely on: one adapter name over two methods' parts, one file, errors.

The contract suite (tests/test_contract.py, row in case.py) covers switching, save/load, names,
disabling, requires_grad, deleting and config round trips over three families.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftkit import (BottleneckConfig, MamConfig, PeftConfig, PeftModel, PrefixTuningConfig, get_peft_model,
                     get_peft_model_state_dict, set_peft_model_state_dict)
from peftkit.engine.layer import AdapterLayer
from peftkit.methods.adapter.parallel import ParallelAdapterLayer
from peftkit.methods.prefix.layer import PrefixEmbedding
from tiny_models import FAMILIES, lm_losses, logits, model_inputs, tiny_bert, tiny_gpt2, tiny_llama

P = 3


def mam(family: str = "llama", seed: int = 0, **adapter):
    builder, _, task = FAMILIES[family]
    torch.manual_seed(seed + 100)
    config = MamConfig(task_type=task, prefix_tuning={"num_virtual_tokens": P},
                       parallel_adapter={"reduction_factor": 4, "init_weights": False, **adapter})
    return get_peft_model(builder(seed), config)


def layers(model, kind):
    return {k: l for k, l in model.base_model.adapter_layers() if isinstance(l, kind)}


def prefix_table(model, name="default"):
    return next(iter(layers(model, PrefixEmbedding).values())).prompt_encoder[name].embedding.weight


def ffn_by_hand(block, x, down, up, s):
    """s * up(relu(down(x))) added beside the block, for a block computing FFN(x) (Llama, GPT-2)."""
    return block(x) + s * F.linear(F.relu(F.linear(x, down.weight, down.bias)), up.weight, up.bias)


def bert_output_by_hand(block, h, x, down, up, s):
    """BertOutput with a parallel adapter: LN(dropout(dense(h)) + x + s * up(relu(down(x))))."""
    return block.LayerNorm(block.dropout(block.dense(h)) + x + s * F.linear(F.relu(F.linear(x, down.weight, down.bias)), up.weight, up.bias))


def reference(family, model):
    """The prefix method alone with MAM's prefix table, and each FFN block patched by hand."""
    builder, _, task = FAMILIES[family]
    ref = get_peft_model(builder(0), PrefixTuningConfig(num_virtual_tokens=P, task_type=task))
    with torch.no_grad():
        prefix_table(ref).copy_(prefix_table(model))
        if task == "SEQ_CLS":
            ref.base_model.model.classifier.modules_to_save["default"].load_state_dict(
                model.base_model.model.classifier.modules_to_save["default"].state_dict())
    for key, layer in layers(model, ParallelAdapterLayer).items():
        block = ref.base_model.model.get_submodule(key)
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        if family == "bert":
            block.forward = lambda h, x, b=block, d=down, u=up: bert_output_by_hand(b, h, x, d, u, 4.0)
        else:
            block.forward = lambda x, b=block, d=down, u=up: ffn_by_hand(type(b).forward.__get__(b), x, d, u, 4.0)
    return ref


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_is_the_prefix_method_with_the_ffn_adapter_added_by_hand(family):
    model, x = mam(family), model_inputs()
    assert len(layers(model, ParallelAdapterLayer)) == 2 and len(layers(model, PrefixEmbedding)) == 1
    torch.testing.assert_close(logits(model, x), logits(reference(family, model), x), atol=1e-6, rtol=1e-6)


def test_a_fresh_ffn_adapter_leaves_exactly_the_prefix_method():
    model = mam("llama", init_weights=True)
    ref = get_peft_model(tiny_llama(0), PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"))
    with torch.no_grad():
        prefix_table(ref).copy_(prefix_table(model))
    assert torch.equal(logits(model, model_inputs()), logits(ref, model_inputs()))


def test_defaults_follow_the_paper_scaled_to_the_model():
    config = MamConfig()
    assert config.prefix_tuning == {"num_virtual_tokens": 30}
    assert config.parallel_adapter == {"reduction_factor": 2, "scaling": 4.0, "non_linearity": "relu"}
    model = get_peft_model(tiny_llama(0), MamConfig(task_type="CAUSAL_LM"))
    layer = next(iter(layers(model, ParallelAdapterLayer).values()))
    assert layer.adapter_down["default"].weight.shape == (16, 32) and layer.scaling["default"] == 4.0  # d/2, s=4
    assert prefix_table(model).shape[0] == 30


def test_one_file_holds_both_parts_and_reloads_exactly(tmp_path):
    model, x = mam("bert"), model_inputs()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MAM" and config["prefix_tuning"] == {"num_virtual_tokens": P}
    assert config["parallel_adapter"]["reduction_factor"] == 4 and config["modules_to_save"] == ["classifier"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "prompt_embeddings" in keys
    assert {k for k in keys if "adapter_down.weight" in k} == {
        f"base_model.model.bert.encoder.layer.{i}.output.adapter_down.weight" for i in range(2)}
    assert isinstance(PeftConfig.from_pretrained(tmp_path), MamConfig)
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert "MAM" in (tmp_path / "README.md").read_text()


def test_disable_delete_and_re_add_under_the_same_name():
    model, x = mam("gpt2"), model_inputs()
    adapted, base = logits(model, x), logits(tiny_gpt2(0), x)
    with model.disable_adapter():
        assert torch.equal(logits(model, x), base)
    config, tensors = MamConfig.from_dict(model.peft_config["default"].to_dict()), get_peft_model_state_dict(model)
    model.add_adapter("keep", BottleneckConfig(placement="parallel", task_type="CAUSAL_LM"))
    model.delete_adapter("default")
    assert model.peft_config.keys() == {"keep"} and not layers(model, PrefixEmbedding)
    assert not any(".default" in n for n in model.state_dict())
    assert torch.equal(logits(model, x), base)  # "keep" starts with up = 0
    model.add_adapter("default", config)
    set_peft_model_state_dict(model, tensors)
    model.set_adapter("default")
    assert torch.equal(logits(model, x), adapted)


def test_only_the_parts_train_and_the_loss_falls():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0, initializer_range=0.2),
                           MamConfig(task_type="CAUSAL_LM", prefix_tuning={"num_virtual_tokens": P}))
    x = model_inputs(batch=4, length=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_encoder.default." in n or ".adapter_down.default." in n
                             or ".adapter_up.default." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = lm_losses(model, x, lr=0.02)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_generate_runs_with_the_prefix_part():
    model, x = mam("llama"), model_inputs(batch=2, length=4)
    out = model.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)
    with model.disable_adapter():
        assert torch.equal(model.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0),
                           tiny_llama(0).generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0))


def test_merge_is_refused_naming_the_part_that_cannot():
    model, x = mam("llama"), model_inputs()
    before = logits(model, x)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(logits(model, x), before)


# -- the parallel placement on its own -------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parallel_adapter_alone_adds_beside_the_ffn_block_as_computed_by_hand(family):
    builder, _, task = FAMILIES[family]
    model = get_peft_model(builder(0), BottleneckConfig(placement="parallel", init_weights=False, scaling=2.0,
                                                        reduction_factor=4, task_type=task))
    ref = builder(0)
    for key, layer in layers(model, ParallelAdapterLayer).items():
        block, down, up = ref.get_submodule(key), layer.adapter_down["default"], layer.adapter_up["default"]
        if family == "bert":
            block.forward = lambda h, x, b=block, d=down, u=up: bert_output_by_hand(b, h, x, d, u, 2.0)
        else:
            block.forward = lambda x, b=block, d=down, u=up: ffn_by_hand(type(b).forward.__get__(b), x, d, u, 2.0)
    if task == "SEQ_CLS":
        ref.classifier = model.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(logits(model, model_inputs()), logits(ref, model_inputs()), atol=1e-6, rtol=1e-6)


def test_parallel_targets_per_architecture():
    for builder, expected in ((tiny_llama, "model.layers.0.mlp"), (tiny_gpt2, "transformer.h.0.mlp"),
                              (tiny_bert, "bert.encoder.layer.0.output")):
        model = get_peft_model(builder(0), BottleneckConfig(placement="parallel"))
        assert expected in layers(model, ParallelAdapterLayer)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(prefix_tuning={"num_virtual_token": 5}), r"prefix_tuning has unknown option\(s\) \['num_virtual_token'\]"),
    (dict(parallel_adapter={"bottleneck": 8}), r"parallel_adapter has unknown option\(s\) \['bottleneck'\]"),
    (dict(parallel_adapter={"placement": "pfeiffer"}), r"parallel_adapter\['placement'\]='pfeiffer' is invalid"),
    (dict(parallel_adapter={"scaling": "big"}), r"parallel_adapter: scaling='big' is invalid"),
    (dict(prefix_tuning={"task_type": "CAUSAL_LM"}), r"task_type, inference_mode and modules_to_save are set on"),
    (dict(prefix_tuning=[30]), r"prefix_tuning=\[30\] is invalid: expected dict or None"),
])
def test_bad_part_options_fail_on_construction_naming_the_part(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MamConfig(**kwargs)


def test_parts_that_clash_on_a_module_are_refused_and_change_nothing():
    base = tiny_llama(0)
    config = MamConfig(task_type="CAUSAL_LM", prefix_tuning={"num_virtual_tokens": P},
                       parallel_adapter={"target_modules": ["embed_tokens"]})
    with pytest.raises(ValueError, match="prefix and adapter parts of this mam adapter both target module 'model.embed_tokens'"):
        get_peft_model(base, config)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())  # nothing was left wrapped


def test_a_parallel_adapter_on_a_single_linear_says_to_target_the_block():
    with pytest.raises(ValueError, match="target the block, not a single layer"):
        get_peft_model(tiny_llama(0), BottleneckConfig(placement="parallel", target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="no AdapterDrop with placement='parallel'"):
        BottleneckConfig(placement="parallel", adapter_drop_lowest=1)


def test_a_part_option_from_a_newer_version_loads_with_a_warning(tmp_path):
    data = MamConfig(prefix_tuning={"num_virtual_tokens": P}).to_dict()
    data["prefix_tuning"]["a_prefix_option_from_the_future"] = 1
    with pytest.warns(UserWarning, match=r"ignoring unknown prefix_tuning options \['a_prefix_option_from_the_future'\]"):
        assert MamConfig.from_dict(data) == MamConfig(prefix_tuning={"num_virtual_tokens": P})
