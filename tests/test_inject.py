"""inject_adapter_in_model: the same layers, tensors and keys as get_peft_model's inner model and
as HF PEFT's function of the same name; input-level methods refused."""
from __future__ import annotations

import warnings

import pytest
import torch

import peftkit
from tiny_models import logits, model_inputs, tiny_bert, tiny_llama

hf_peft = pytest.importorskip("peft")

CONFIGS = {
    "LoraConfig": dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "IA3Config": dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
}


def build(lib, config_name):
    return getattr(lib, config_name)(**CONFIGS[config_name])


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_same_model_as_get_peft_model(config_name):
    torch.manual_seed(0)
    injected = peftkit.inject_adapter_in_model(build(peftkit, config_name), tiny_llama(), adapter_name="x")
    torch.manual_seed(0)
    wrapped = peftkit.get_peft_model(tiny_llama(), build(peftkit, config_name), adapter_name="x")
    inner = wrapped.get_base_model()
    assert type(injected).__name__ == "LlamaForCausalLM"
    ours, theirs = injected.state_dict(), inner.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    grads = {n: p.requires_grad for n, p in injected.named_parameters()}
    assert grads == {n: p.requires_grad for n, p in inner.named_parameters()} and any(grads.values())
    torch.testing.assert_close(logits(injected, model_inputs()), logits(wrapped, model_inputs()), atol=0, rtol=0)
    with torch.no_grad():
        base = tiny_llama()(**model_inputs()).logits
    assert (base - logits(injected, model_inputs())).abs().max() > 1e-4


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_keys_and_trainable_tensors_as_hf(config_name):
    ours = peftkit.inject_adapter_in_model(build(peftkit, config_name), tiny_llama())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf_peft.inject_adapter_in_model(build(hf_peft, config_name), tiny_llama())
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs)


def test_modules_to_save_and_a_second_adapter():
    model = tiny_bert()
    config = peftkit.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"])
    peftkit.inject_adapter_in_model(config, model)
    keys = model.state_dict().keys()
    assert "classifier.modules_to_save.default.weight" in keys
    peftkit.inject_adapter_in_model(peftkit.LoraConfig(r=2, target_modules=["value"]), model, adapter_name="other")
    assert any(k.endswith("value.lora_A.other.weight") for k in model.state_dict())


@pytest.mark.parametrize("config", [
    peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    peftkit.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    peftkit.PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
], ids=lambda c: type(c).__name__)
def test_prompt_learning_refused_without_touching_the_model(config):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="acts on the model's inputs .* use get_peft_model"):
        peftkit.inject_adapter_in_model(config, model)
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_not_a_config_refused():
    with pytest.raises(TypeError, match="must be a PeftConfig"):
        peftkit.inject_adapter_in_model({"r": 4}, tiny_llama())
