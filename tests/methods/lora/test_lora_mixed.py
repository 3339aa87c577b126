"""Mixed-adapter batches through the stacked path (methods/lora/mixed.py) against the per-row equation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.engine.layer import BASE, additive_mixed_forward
from peftkit.methods.lora import mixed

RANKS = {"a": 2, "b": 4, "c": 8}


def three_adapters(dtype=torch.float32):
    """One linear (12 -> 10) with three adapters of different ranks and scalings (rsLoRA on one)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10)).to(dtype)
    model = None
    for name, r in RANKS.items():
        config = LoraConfig(r=r, lora_alpha=3 * r + 1, target_modules=["0"], init_lora_weights=False,
                            use_rslora=name == "c")
        if model is None:
            model = get_peft_model(net, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model, model.base_model.model[0]


def per_row(layer, x, names):
    """y_b = x_b W^T + bias + s_i (x_b A_i^T) B_i^T, one row at a time."""
    rows = []
    for b, name in enumerate(names):
        base = layer.base_layer
        y = torch.nn.functional.linear(x[b], base.weight.to(x.dtype), base.bias.to(x.dtype))
        if name in layer.r:
            a, bb = layer.lora_A[name].weight, layer.lora_B[name].weight
            y = y + layer.scaling[name] * (x[b] @ a.t().to(x.dtype)) @ bb.t().to(x.dtype)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("path", ["all_at_once", "by_row"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_stacked_path_equals_the_equation(path, tokens, monkeypatch):
    monkeypatch.setattr(mixed, "_DENSE_TOKENS_X_ADAPTERS", 10**9 if path == "all_at_once" else 0)
    model, layer = three_adapters()
    names = ["c", BASE, "a", "b", "a", "not_on_this_layer"]
    x = torch.randn(len(names), tokens, 12)
    layer.batch_adapter_names = names
    with torch.no_grad():
        got = layer(x)
    assert layer.stacked_mixed_batch()
    torch.testing.assert_close(got, per_row(layer, x, names), atol=1e-6, rtol=1e-6)


def test_expanded_rows_and_bf16():
    model, layer = three_adapters(torch.bfloat16)
    names = ["b", "a", BASE]
    x = torch.randn(6, 5, 12, dtype=torch.bfloat16)  # generate with 2 beams: each name covers 2 rows
    layer.batch_adapter_names = names
    with torch.no_grad():
        got = layer(x)
    want = per_row(layer, x.float(), [n for n in names for _ in range(2)])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)
    layer.batch_adapter_names = ["a", "b", "c", "a"]
    with pytest.raises(ValueError, match="4 entries but the batch has 6 rows"):
        layer(x)


def test_gradients_equal_the_per_adapter_loop():
    model, layer = three_adapters()
    model.train()
    for name, p in layer.named_parameters():
        p.requires_grad_(name.startswith("lora_"))  # train all three at once
    names = ["a", "c", BASE, "a"]
    x = torch.randn(4, 3, 12)
    layer.batch_adapter_names = names
    grads = []
    for forward in (layer.forward, lambda x: additive_mixed_forward(layer, x)):
        out = forward(x)
        out.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
        layer.zero_grad()
    assert set(grads[0]) == set(grads[1]) == {f"lora_{f}.{n}.weight" for f in "AB" for n in ("a", "c")}
    for key in grads[1]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-5, rtol=1e-5)


def test_stack_is_built_once_per_call_and_sees_updates_in_the_next():
    model, layer = three_adapters()
    x = torch.randn(3, 2, 12)
    names = ["a", "b", "c"]
    with torch.no_grad():
        layer.batch_adapter_names = names
        layer(x)
        first = layer.mixed_stack
        layer(x)
        assert layer.mixed_stack is first  # reused while the same call's names are set
        layer.lora_B["a"].weight.add_(1.0)  # e.g. an optimizer step between two calls
        layer.batch_adapter_names = list(names)  # the engine sets a new list per call
        got = layer(x)
    assert layer.mixed_stack is not first
    torch.testing.assert_close(got, per_row(layer, x, names), atol=1e-6, rtol=1e-6)


def test_dropout_in_training_takes_the_loop_and_merged_adapters_refuse():
    model, layer = three_adapters()
    model.add_adapter("d", LoraConfig(r=2, target_modules=["0"], lora_dropout=0.5))
    layer.batch_adapter_names = ["d", "a"]
    model.train()
    assert not layer.stacked_mixed_batch()
    model.eval()
    assert layer.stacked_mixed_batch()
    layer.batch_adapter_names = None
    model.base_model.merge_adapter(["a"])
    layer.batch_adapter_names = ["a", "b"]
    with pytest.raises(ValueError, match="unmerge_adapter"):
        layer(torch.randn(2, 12))
