"""Bottleneck adapters against their equation written out with plain tensors.

    h' = h + s * (W_up act(W_down h + b_down) + b_up),    h = the target module's output
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import BottleneckConfig, PeftModel, get_peft_model
from peftkit.methods.adapter.layer import BottleneckLayer
from tiny_models import model_inputs, tiny_bert, tiny_gpt2, tiny_llama

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Net(nn.Module):
    """An nn.Linear then a GPT-2 Conv1D, each of which gets an adapter on its output."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = nn.Linear(8, 12)
        self.gpt = Conv1D(10, 12)  # (in=12, out=10), weight stored (in, out)

    def forward(self, x):
        return self.gpt(self.lin(x))


def make_net(**kw):
    torch.manual_seed(0)
    net, ref = Net(), Net()
    ref.load_state_dict(net.state_dict())
    kw = {"target_modules": ["lin", "gpt"], "init_weights": False, **kw}
    return ref, get_peft_model(net, BottleneckConfig(**kw))


def adapted(peft, name="default"):
    """{module name: (down, up)} of one adapter, found through the layers that own them."""
    return {k: (l.adapter_down[name], l.adapter_up[name]) for k, l in peft.base_model.adapter_layers()
            if isinstance(l, BottleneckLayer) and name in l.adapter_names()}


def direct(h, down, up, act, s):
    """The equation with plain tensors: h + s * (W_up act(W_down h + b_down) + b_up)."""
    inner = ACTS[act](h @ down.weight.T + down.bias)  # (..., m)
    return h + s * (inner @ up.weight.T + up.bias)  # (..., d)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_linear_and_conv1d_match_the_equation(act):
    ref, peft = make_net(non_linearity=act, scaling=0.5, reduction_factor=4)
    parts, x = adapted(peft), torch.randn(2, 5, 8)
    h = direct(F.linear(x, ref.lin.weight, ref.lin.bias), *parts["lin"], act, 0.5)
    h = direct(h @ ref.gpt.weight + ref.gpt.bias, *parts["gpt"], act, 0.5)
    torch.testing.assert_close(peft(x), h, atol=1e-6, rtol=1e-6)


def test_bottleneck_width_follows_reduction_factor_or_fixed_size():
    _, peft = make_net(reduction_factor=4)
    assert {k: tuple(d.weight.shape) for k, (d, _) in adapted(peft).items()} == {"lin": (3, 12), "gpt": (2, 10)}
    _, peft = make_net(bottleneck_size=5)
    assert {k: tuple(u.weight.shape) for k, (_, u) in adapted(peft).items()} == {"lin": (12, 5), "gpt": (10, 5)}


def test_fresh_adapter_is_the_identity():
    ref, peft = make_net(init_weights=True)
    for _, up in adapted(peft).values():
        assert not up.weight.any() and not up.bias.any()
    x = torch.randn(2, 5, 8)
    assert torch.equal(peft(x), ref(x))


def adapted_keys(model, placement):
    peft = get_peft_model(model, BottleneckConfig(placement=placement))
    return sorted(k for k, l in peft.base_model.adapter_layers() if isinstance(l, BottleneckLayer))


@pytest.mark.parametrize("builder, houlsby, pfeiffer", [
    (tiny_llama, ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
     ["model.layers.{i}.mlp.down_proj"]),
    (tiny_bert, ["bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"],
     ["bert.encoder.layer.{i}.output.dense"]),
    (tiny_gpt2, ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"], ["transformer.h.{i}.mlp.c_proj"]),
], ids=["llama", "bert", "gpt2"])
def test_placements_pick_the_sublayer_outputs(builder, houlsby, pfeiffer):
    def per_block(names):
        return sorted(n.format(i=i) for n in names for i in range(2))
    assert adapted_keys(builder(), "houlsby") == per_block(houlsby)
    assert adapted_keys(builder(), "pfeiffer") == per_block(pfeiffer)


def test_explicit_targets_win_over_placement_and_unknown_models_say_what_to_set():
    peft = get_peft_model(tiny_llama(), BottleneckConfig(placement="houlsby", target_modules=["up_proj"]))
    assert all(k.endswith("up_proj") for k, _ in peft.base_model.adapter_layers())
    with pytest.raises(ValueError, match="target_modules.*'down_proj'"):
        get_peft_model(Net(), BottleneckConfig())


# AdapterDrop ----------------------------------------------------------------------------------
def drop_model(**kw):
    torch.manual_seed(3)
    return get_peft_model(tiny_llama(), BottleneckConfig(placement="houlsby", init_weights=False, **kw))


def block_outputs(peft, x):
    """Each adapter wrapper's (input, output) during one forward pass, by module name."""
    seen, hooks = {}, []
    for key, layer in peft.base_model.adapter_layers():
        hooks.append(layer.register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, (i[0], o))))
    with torch.no_grad():
        peft(**model_inputs())
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("drop", [dict(adapter_drop=[0]), dict(adapter_drop_lowest=1)])
def test_adapter_drop_skips_exactly_the_dropped_blocks(drop):
    peft = drop_model(**drop)
    for key, (x, out) in block_outputs(peft, model_inputs()).items():
        layer = peft.base_model.model.get_submodule(key)
        h = layer.base_layer(x)
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        expected = h if ".layers.0." in key else direct(h, down, up, "relu", 1.0)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_adapter_drop_equals_adapting_only_the_kept_blocks():
    dropped = drop_model(adapter_drop=[0])
    kept = drop_model(layers_to_transform=[1])
    source = dropped.state_dict()
    kept.load_state_dict({k: source[k] for k in kept.state_dict() if ".adapter_" in k}, strict=False)
    x = model_inputs()
    torch.testing.assert_close(dropped(**x).logits, kept(**x).logits, atol=0, rtol=0)


def test_adapter_drop_mode_follows_train_and_eval():
    full, x = drop_model(), model_inputs()
    only_train = drop_model(adapter_drop=[0, 1], adapter_drop_mode="inference")
    with torch.no_grad():
        only_train.train()
        assert torch.equal(only_train(**x).logits, full.train()(**x).logits)
        only_train.eval()
        with only_train.disable_adapter():
            base = only_train(**x).logits
        assert torch.equal(only_train(**x).logits, base)
    only_eval = drop_model(adapter_drop=[0, 1], adapter_drop_mode="train")
    with torch.no_grad():
        assert torch.equal(only_eval.eval()(**x).logits, full.eval()(**x).logits)


# training, files, merging, config ------------------------------------------------------------------
def test_only_the_adapter_weights_train():
    peft = get_peft_model(tiny_llama(), BottleneckConfig(placement="houlsby"))
    expected = {f"base_model.model.model.layers.{i}.{m}.adapter_{part}.default.{t}"
                for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")
                for part in ("down", "up") for t in ("weight", "bias")}
    assert {n for n, p in peft.named_parameters() if p.requires_grad} == expected


def test_loss_falls_on_a_tiny_model():
    # With the default init (std 0.02) the frozen head after the final norm caps |logits| near 0.6,
    # whatever the adapters do; std 0.2 gives the frozen model room to fit the batch.
    torch.manual_seed(0)
    peft = get_peft_model(tiny_llama(initializer_range=0.2), BottleneckConfig(placement="houlsby", reduction_factor=4))
    x = model_inputs(batch=4, length=12)
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft.train()
    losses = []
    for _ in range(30):
        loss = peft(**x, labels=x["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_save_load_is_exact_and_uses_the_documented_keys(tmp_path):
    from safetensors.torch import load_file

    peft, x = drop_model(), model_inputs()
    peft.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight" in keys and len(keys) == 16
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["placement"] == "houlsby"
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(**x).logits, peft(**x).logits)


def test_merging_is_refused_and_changes_nothing():
    peft, x = drop_model(), model_inputs()
    before = peft(**x).logits
    for call in (peft.merge_adapter, peft.merge_and_unload):
        with pytest.raises(ValueError, match="'default' cannot be merged.*unload"):
            call()
    assert torch.equal(peft(**x).logits, before)
    assert torch.equal(peft.unload()(**x).logits, tiny_llama()(**x).logits)


@pytest.mark.parametrize("field, value, allowed", [
    ("placement", "middle", "'houlsby' or 'pfeiffer'"), ("non_linearity", "swish", "relu"),
    ("reduction_factor", 0, ">= 1"), ("bottleneck_size", 2.5, "int or None"), ("scaling", "big", "float"),
    ("adapter_drop", [-1], "block indices"), ("adapter_drop_lowest", -2, ">= 0"),
    ("adapter_drop_mode", "never", "both"),
])
def test_bad_config_values_name_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field}=.*expected.*{allowed}"):
        BottleneckConfig(**{field: value})

