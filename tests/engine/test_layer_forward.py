"""The start every adapter layer's forward shares (``engine.layer.route_forward``): the base alone
while adapters are disabled, the mixed-batch path (refused while an adapter is merged), or the
layer's own math; and the layers that used to repeat it inline now go through it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.engine import layer as engine_layer
from peftkit.engine.layer import AdapterLayer, route_forward
from peftkit.methods.adapter import layer as adapter_layer
from peftkit.methods.dora import layer as dora_layer
from peftkit.methods.ia3 import layer as ia3_layer
from peftkit.methods.partial import layer as partial_layer
from tiny_models import logits, model_inputs, tiny_llama


class Base(nn.Module):
    def forward(self, x, k):
        return x * k


class Stub(AdapterLayer):
    def adapter_names(self) -> list[str]:
        return ["a"]


def calls(layer, x):
    seen = []
    out = route_forward(layer, lambda x, k: seen.append(("own", k)) or x + 1,
                        lambda x, k: seen.append(("mixed", k)) or x + 2, x, (), {"k": 3})
    return out, seen


def test_route_forward_picks_base_own_or_mixed_and_refuses_a_mixed_batch_over_a_merge():
    layer, x = Stub(Base()), torch.ones(2)
    assert calls(layer, x)[1] == [("own", 3)]
    layer.batch_adapter_names = ["a", "__base__"]
    assert calls(layer, x)[1] == [("mixed", 3)]
    layer.disabled = True
    out, seen = calls(layer, x)
    assert seen == [] and torch.equal(out, 3 * x)  # the base alone (with its arguments), also in a mixed batch
    layer.disabled, layer.merged_adapters = False, ["a"]
    with pytest.raises(ValueError, match="mixed-adapter batches need unmerged adapters; call unmerge_adapter"):
        calls(layer, x)


@pytest.mark.parametrize("module, config", [
    (dora_layer, pk.DoraConfig(target_modules=["q_proj"], init_lora_weights=False)),
    (ia3_layer, pk.IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False)),
    (adapter_layer, pk.BottleneckConfig(target_modules=["q_proj"], init_weights=False)),
    (partial_layer, pk.PartialConfig(num_top_layers=1, init_partial_weights=False)),
    (engine_layer, pk.BitFitConfig(target_modules=["q_proj"], init_bitfit_weights=False)),  # additive_forward
], ids=["dora", "ia3", "bottleneck", "partial", "additive"])
def test_each_layer_starts_its_forward_with_route_forward(monkeypatch, module, config):
    model, x = pk.get_peft_model(tiny_llama(), config), model_inputs()
    want = logits(model, x)
    routed = []

    def spy(layer, own, mixed, *rest):
        routed.append(type(layer).__name__)
        return route_forward(layer, own, mixed, *rest)

    monkeypatch.setattr(module, "route_forward", spy)
    assert torch.equal(logits(model, x), want)
    assert routed, "no layer went through route_forward"
