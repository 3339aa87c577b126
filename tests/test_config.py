"""Configs built directly in Python are type-checked as files and YAML are: a wrongly typed field
is named (field, value, expected type) on construction, never met later as a TypeError deep
inside; and every default and every usual value (including those HF PEFT code passes) still builds."""
from __future__ import annotations

import dataclasses

import numpy as np
import peft
import pytest

import peftkit as pk
from peftkit.registry import get_method, list_methods


def config_classes() -> dict[str, type]:
    """One registered method per config class (fusion, which composes adapters, included)."""
    found: dict[type, str] = {}
    for name in [*list_methods(), "fusion"]:
        found.setdefault(get_method(name).config_cls, name)
    return {name: cls for cls, name in found.items()}


REQUIRED = {"fusion": {"adapter_names": ["a", "b"]}}  # configs with a field that has no usable default


@pytest.mark.parametrize("method", sorted(config_classes()))
def test_every_field_given_a_wrongly_typed_value_is_named_on_construction(method):
    cls = config_classes()[method]
    required = REQUIRED.get(method, {})
    cls(**required)  # the defaults build
    for field in dataclasses.fields(cls):
        if field.init and field.name not in required and field.name != "peft_type":  # peft_type: set by the class
            with pytest.raises(ValueError, match=f"^{field.name}=<object object at .*> is invalid: expected"):
                cls(**required, **{field.name: object()})


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules=5), "target_modules=5 is invalid: expected list[str] or str or None"),
    (dict(target_modules=["q_proj", 1]), "target_modules=['q_proj', 1] is invalid: expected list[str] or str or None"),
    (dict(lora_dropout="0.1"), "lora_dropout='0.1' is invalid: expected float"),  # was: '<=' not supported
    (dict(rank_pattern={"q_proj": "4"}), "rank_pattern={'q_proj': '4'} is invalid: expected dict[str, int]"),
    (dict(use_rslora="yes"), "use_rslora='yes' is invalid: expected bool"),
])
def test_lora_config_names_the_wrongly_typed_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        pk.LoraConfig(**kwargs)
    assert str(err.value).startswith(message + " (")  # then the field's help: what it means and takes


@pytest.mark.parametrize("kwargs", [
    dict(target_modules="all-linear"), dict(target_modules=r".*\.(q|v)_proj"), dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules={"q_proj", "v_proj"}), dict(target_modules=("q_proj",)), dict(target_modules=None),
    dict(exclude_modules=["k_proj"]), dict(exclude_modules="lm_head"), dict(modules_to_save=("score",)),
    dict(layers_to_transform=0), dict(layers_to_transform=[0, 1], layers_pattern="layers"),
    dict(rank_pattern={"q_proj": 4}, alpha_pattern={r"v_\w+": 16.0, "k_proj": 8}),
    dict(r=16, lora_alpha=32, lora_dropout=0), dict(lora_alpha=np.float64(16.0), lora_dropout=np.float64(0.05)),
    dict(init_lora_weights="gaussian"), dict(init_lora_weights=False), dict(bias="lora_only"), dict(fan_in_fan_out=True),
    dict(task_type=peft.TaskType.CAUSAL_LM), dict(task_type=pk.TaskType.SEQ_CLS), dict(base_model_name_or_path="org/m"),
])
def test_usual_lora_values_still_build(kwargs):
    pk.LoraConfig(**kwargs)


def test_usual_values_of_other_methods_still_build():
    pk.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules={"down_proj"})
    pk.IA3Config(target_modules=r".*\.(k|v)_proj", feedforward_modules=r".*down_proj")
    pk.PromptTuningConfig(prompt_tuning_init=peft.PromptTuningInit.TEXT, prompt_tuning_init_text="Classify:",
                          tokenizer_name_or_path="tok", tokenizer_kwargs={"use_fast": True}, num_virtual_tokens=8)
    pk.BottleneckConfig(placement="houlsby", scaling=2, adapter_drop=(0, 1), bottleneck_size=None)
    pk.AdaLoraConfig(total_step=np.int64(100).item(), rank_pattern={"q_proj.lora_E": [True, False]})
    pk.MamConfig(prefix_tuning={"num_virtual_tokens": 4}, parallel_adapter={"scaling": 2})


def test_numpy_numbers_become_plain_numbers_that_save(tmp_path):
    config = pk.LoraConfig(r=np.int64(8), lora_alpha=np.int32(16), lora_dropout=np.float32(0.25))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.25)
    assert type(config.r) is int and type(config.lora_alpha) is int and type(config.lora_dropout) is float
    config.save_pretrained(tmp_path)
    assert pk.LoraConfig.from_pretrained(tmp_path).r == 8
