"""get_layer_status / get_model_status against HF PEFT's on the same model, and the irregular states they report."""
import dataclasses

import peft
import pytest
import torch
from tiny_models import tiny_llama

import peftkit
from peftkit.quant import QuantConfig, quantize_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
# HF names its layer classes differently ("lora.Linear"); every other field must agree.
COMPARED = [f.name for f in dataclasses.fields(peftkit.TunerLayerStatus) if f.name != "module_type"]


def both(**lora):
    config = dict(r=4, target_modules=TARGETS, modules_to_save=["lm_head"], **lora)
    ours = peftkit.get_peft_model(tiny_llama(seed=0), peftkit.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(**config))
    for model in (ours, theirs):
        model.add_adapter("other", type(model.peft_config["default"])(**config))
    return ours, theirs


def fields(status, names):
    return {name: getattr(status, name) for name in names}


def test_layer_status_equals_hf_peft_field_by_field():
    ours, theirs = both()
    got, want = ours.get_layer_status(), theirs.get_layer_status()
    assert [s.name for s in got] == [s.name for s in want]
    for g, w in zip(got, want):
        assert fields(g, COMPARED) == fields(w, COMPARED), g.name
    assert {s.module_type for s in got} == {"lora.LoraLinear", "engine.ModulesToSave"}


def test_model_status_equals_hf_peft_in_each_state():
    ours, theirs = both()
    skip = {"adapter_model_type"}  # LoraModel vs the engine's AdapterModel
    names = [f.name for f in dataclasses.fields(peftkit.TunerModelStatus) if f.name not in skip]

    def check():
        assert fields(ours.get_model_status(), names) == fields(theirs.get_model_status(), names)

    check()
    for model in (ours, theirs):
        model.set_adapter("other")
    check()
    with ours.disable_adapter(), theirs.disable_adapter():
        # (HF also switches requires_grad off while disabled; peftkit leaves what trains alone)
        assert ours.get_model_status().enabled is theirs.get_model_status().enabled is False
        assert [s.enabled for s in ours.get_layer_status()] == [s.enabled for s in theirs.get_layer_status()]
    for model in (ours, theirs):
        model.merge_adapter()
    check()
    # lm_head's trained copy cannot be merged, so "other" stays unmerged there: HF and we both say so
    assert ours.get_model_status().merged_adapters == "irregular"


def test_irregular_states_are_named():
    ours, _ = both()
    layers = [layer for _, layer in ours.base_model.adapter_layers()]
    layers[0].disabled = True  # one layer left disabled
    layers[1].merge(["default"])  # one adapter merged in one layer only
    next(iter(layers[2].adapter_tensors("default").values())).requires_grad_(False)
    status = ours.get_model_status()
    assert status.enabled == "irregular" and status.merged_adapters == "irregular"
    assert status.requires_grad["default"] == "irregular" and status.requires_grad["other"] is False
    assert status.active_adapters == ["default"]


def test_quantized_base_and_plain_injected_models():
    base = quantize_model(tiny_llama(seed=0), QuantConfig(bnb_4bit_compute_dtype="float32"))
    status = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, target_modules=TARGETS)).get_model_status()
    assert status.quantization_backend == "peftkit 4bit" and status.num_adapter_layers == 2 * len(TARGETS)
    plain = peftkit.inject_adapter_in_model(peftkit.LoraConfig(r=4, target_modules=TARGETS), tiny_llama(seed=0))
    layers = peftkit.get_layer_status(plain)
    assert layers[0].name == "model.layers.0.self_attn.q_proj" and layers[0].devices == {"default": ["cpu"]}
    assert peftkit.get_model_status(plain).adapter_model_type == "None"


def test_a_model_without_adapter_layers_is_refused():
    with pytest.raises(ValueError, match="no adapter layers"):
        peftkit.get_layer_status(torch.nn.Linear(2, 2))
