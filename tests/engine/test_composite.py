"""The engine's composite adapters (``MethodSpec.parts``) with a part whose method has every training
hook: a test-only composite of AdaLoRA and a bottleneck adapter must train exactly as the two
methods do as separate adapters of one model (extra loss, rank allocation after each step, training
state in checkpoints), its hooks reading the part's own config through a ``PartView``; and a part's
``load_fix`` speaks for its own tensors when a MAM or UniPELT file does not fit."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from peftkit import AdaLoraConfig, BottleneckConfig, MamConfig, PeftModel, UniPeltConfig, get_peft_model
from peftkit import registry
from peftkit.config import CompositeConfig
from peftkit.methods import adalora, adapter
from peftkit.methods.adalora.layer import AdaLoraLinear
from tiny_models import logits, model_inputs, tiny_bert, tiny_llama

ADALORA = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 6, "target_modules": ["q_proj", "v_proj"],
           "lora_alpha": 8}
ADAPTER = {"placement": "pfeiffer", "reduction_factor": 4, "init_weights": False}


@dataclass
class PairConfig(CompositeConfig):
    adalora: dict | None = None
    adapter: dict | None = None

    def __post_init__(self) -> None:
        self.peft_type = "TEST_PAIR"
        super().__post_init__()

    @classmethod
    def part_types(cls):
        return {"adalora": (AdaLoraConfig, ADALORA, {}), "adapter": (BottleneckConfig, ADAPTER, {})}


PAIR = registry.MethodSpec(name="test_pair", peft_type="TEST_PAIR", config_cls=PairConfig, hf_format=False,
                           parts=lambda c, m: [(adalora.SPEC, c.make_part("adalora")), (adapter.SPEC, c.make_part("adapter"))])


@pytest.fixture
def models(monkeypatch):
    """(composite "default", the same parts as adapters "a" and "b" of one model, both active), equal tensors."""
    monkeypatch.setitem(registry._METHODS, "test_pair", PAIR)
    torch.manual_seed(0)
    pair = get_peft_model(tiny_llama(0), PairConfig(task_type="CAUSAL_LM"))
    apart = get_peft_model(tiny_llama(0), AdaLoraConfig(task_type="CAUSAL_LM", **ADALORA), adapter_name="a")
    apart.add_adapter("b", BottleneckConfig(task_type="CAUSAL_LM", **ADAPTER))
    apart.set_adapter(["a", "b"])
    with torch.no_grad():
        for key, layer in pair.base_model.adapter_layers():
            other = apart.base_model.model.get_submodule(key)
            name = "a" if isinstance(layer, AdaLoraLinear) else "b"
            for local, tensor in layer.adapter_tensors("default").items():
                other.adapter_tensors(name)[local].copy_(tensor)
    return pair, apart


def train(model, steps):
    x = model_inputs(batch=2, length=6)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(1, steps + 1):
        extra = model.adapter_loss()
        (model(**x, labels=x["input_ids"]).loss + extra).backward()
        opt.step()
        model.after_optimizer_step(step)
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return model(**x).logits


def test_a_composite_trains_exactly_as_its_parts_as_separate_adapters(models):
    pair, apart = models
    assert torch.equal(pair.adapter_loss(), apart.adapter_loss())  # AdaLoRA's orthogonality penalty
    torch.testing.assert_close(train(pair, 5), train(apart, 5), atol=1e-6, rtol=1e-6)
    masks = [layer.lora_E["default"] for layer in pair.base_model.model.modules() if isinstance(layer, AdaLoraLinear)]
    assert sum(int((m != 0).sum()) for m in masks) < 4 * len(masks)  # the allocator pruned, through the part


def test_training_state_is_keyed_by_part_and_restores(models):
    pair, _ = models
    train(pair, 3)
    state = pair.training_state()
    assert list(state) == ["default"] and list(state["default"]) == [0]  # only the AdaLoRA part has state
    fresh = get_peft_model(tiny_llama(0), PairConfig(task_type="CAUSAL_LM"))
    fresh.load_training_state(state)
    assert repr(fresh.training_state()) == repr(state)


# -- a part's load_fix -----------------------------------------------------------------------------
@pytest.mark.parametrize("composite, builder, task", [
    (MamConfig, tiny_llama, "CAUSAL_LM"), (UniPeltConfig, tiny_bert, "SEQ_CLS")])
def test_a_part_that_does_not_fit_gives_its_methods_fix_which_works(tmp_path, composite, builder, task):
    """A projected prefix part cannot train on from its folded file: the message is prefix tuning's
    own (MethodSpec.load_fix), told where the composite keeps the part's options, and that works."""
    get_peft_model(builder(0), composite(task_type=task, prefix_tuning={"num_virtual_tokens": 2,
                                                                        "prefix_projection": True})).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="prefix_projection MLP is folded away") as err:
        PeftModel.from_pretrained(builder(0), tmp_path, is_trainable=True)
    assert f"prefix_tuning dict instead: config = {composite.__name__}.from_pretrained(folder)" in str(err.value)
    config = composite.from_pretrained(tmp_path)
    config.prefix_tuning["prefix_projection"] = False
    trained = PeftModel.from_pretrained(builder(0), tmp_path, is_trainable=True, config=config)
    frozen = PeftModel.from_pretrained(builder(0), tmp_path)
    torch.testing.assert_close(logits(trained, model_inputs()), logits(frozen, model_inputs()), atol=0, rtol=0)
    assert any("prompt_encoder" in n for n, p in trained.named_parameters() if p.requires_grad)


def test_a_part_whose_tensors_fit_adds_no_fix_of_its_own(tmp_path):
    """A misfit elsewhere (the adapter part's width) keeps the generic fix: the prefix part's
    load_fix is asked only about its own tensors."""
    config = MamConfig(task_type="CAUSAL_LM", prefix_tuning={"num_virtual_tokens": 2, "prefix_projection": True},
                       parallel_adapter={"reduction_factor": 4})
    get_peft_model(tiny_llama(0), config).save_pretrained(tmp_path)
    other = MamConfig.from_pretrained(tmp_path)
    other.parallel_adapter["reduction_factor"] = 2
    with pytest.raises(ValueError, match="adapter_down.weight: file has shape") as err:
        PeftModel.from_pretrained(tiny_llama(0), tmp_path, config=other)
    assert "fix: load it onto the base model it was trained on" in str(err.value)
