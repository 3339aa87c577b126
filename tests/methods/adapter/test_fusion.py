"""AdapterFusion against its equations written out by hand, per token and per adapter:

    a_i = s_i up_i(act(down_i(h))),  q = W_Q h + b_Q,  k_i = W_K a_i + b_K,  v_i = W_V a_i + b_V
    w_i = exp(q . k_i / T) / sum_j exp(q . k_j / T),    h' = h + sum_i w_i v_i
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import BottleneckConfig, FusionConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.engine.layer import BASE
from peftkit.methods.adapter.layer import BottleneckLayer
from peftkit.registry import get_method, list_methods
from tiny_models import model_inputs, tiny_bert

MEMBERS = ["a", "b", "c"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 12)

    def forward(self, x):
        return self.lin(x)


def fused_net(temperature=1.0, init_std=0.5, **fusion):
    """Three random adapters (different scalings and activations) on one Linear, fused as "f"."""
    torch.manual_seed(0)
    peft = get_peft_model(Net(), BottleneckConfig(target_modules=["lin"], init_weights=False, reduction_factor=4),
                          adapter_name="a")
    peft.add_adapter("b", BottleneckConfig(target_modules=["lin"], init_weights=False, scaling=0.5, non_linearity="tanh"))
    peft.add_adapter("c", BottleneckConfig(target_modules=["lin"], init_weights=False, bottleneck_size=5))
    peft.add_fusion(MEMBERS, name="f", temperature=temperature, init_std=init_std, **fusion)
    peft.set_adapter("f")
    return peft


def layer(peft, key="lin") -> BottleneckLayer:
    return peft.base_model.model.get_submodule(key)


def member_output(lay, h, name):
    """s * (W_up act(W_down h + b_down) + b_up) with plain tensors."""
    down, up = lay.adapter_down[name], lay.adapter_up[name]
    act = {"relu": F.relu, "tanh": torch.tanh}[lay.non_linearity[name]]
    return lay.scaling[name] * (act(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)


def by_hand(lay, h, name, members, temperature):
    """h + sum_i w_i v_i, looping over tokens' adapters explicitly (no stacked matmuls)."""
    fusion = lay.adapter_fusion[name]
    q = h @ fusion.query.weight.T + fusion.query.bias  # (..., d)
    outs = [member_output(lay, h, m) for m in members]
    keys = [a @ fusion.key.weight.T + fusion.key.bias for a in outs]
    values = [a @ fusion.value.weight.T + fusion.value.bias for a in outs]
    scores = [(q * k).sum(-1) / temperature for k in keys]  # each (...,)
    top = torch.stack(scores).max(0).values
    exps = [torch.exp(s - top) for s in scores]
    total = sum(exps)
    return h + sum((e / total).unsqueeze(-1) * v for e, v in zip(exps, values)), [e / total for e in exps]


def test_fused_output_is_the_per_token_softmax_over_adapters():
    peft = fused_net(temperature=0.7)
    lay, x = layer(peft), torch.randn(2, 5, 8)
    h = x @ lay.base_layer.weight.T + lay.base_layer.bias
    expected, weights = by_hand(lay, h, "f", MEMBERS, 0.7)
    torch.testing.assert_close(peft(x), expected, atol=1e-5, rtol=1e-5)
    spread = torch.stack(weights).amax(0) - torch.stack(weights).amin(0)
    assert spread.max() > 0.2, "the test needs attention weights far from uniform to mean anything"


def test_fresh_fusion_is_the_mean_of_its_members_plus_h():
    peft = fused_net(init_std=0.02)
    fusion = layer(peft).adapter_fusion["f"]
    assert torch.allclose(fusion.value.weight, torch.eye(12), atol=1e-5) and not torch.equal(fusion.value.weight, torch.eye(12))
    assert all(not p.bias.any() for p in (fusion.query, fusion.key, fusion.value))
    assert 0.01 < fusion.query.weight.std() < 0.03 and 0.01 < fusion.key.weight.std() < 0.03
    lay, x = layer(peft), torch.randn(4, 8)
    h = lay.base_layer(x)
    mean = h + sum(member_output(lay, h, m) for m in MEMBERS) / 3
    with torch.no_grad():
        out = peft(x)
        torch.testing.assert_close(out, by_hand(lay, h, "f", MEMBERS, 1.0)[0], atol=1e-6, rtol=1e-6)
        assert (out - mean).abs().max() < 1e-3  # q . k_i near 0: near-uniform weights
        fusion.query.weight.zero_()  # the limit of the init: exactly uniform weights
        torch.testing.assert_close(peft(x), mean, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_fusion_projections():
    peft = fused_net()
    own = {id(t) for t in layer(peft).adapter_tensors("f").values()}
    assert {id(p) for p in peft.parameters() if p.requires_grad} == own
    peft(torch.randn(3, 8)).pow(2).sum().backward()
    for name, param in peft.named_parameters():
        if id(param) in own:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def bert_members(**fusion):
    """Tiny BERT with adapters a and b (Houlsby placement) and their fusion "f", active."""
    torch.manual_seed(0)
    peft = get_peft_model(tiny_bert(), BottleneckConfig(task_type="SEQ_CLS", placement="houlsby", init_weights=False),
                          adapter_name="a")
    peft.add_adapter("b", BottleneckConfig(task_type="SEQ_CLS", placement="houlsby", init_weights=False))
    peft.add_fusion(["a", "b"], name="f", init_std=0.3, **fusion)
    peft.set_adapter("f")
    return peft


def train(peft, steps=3):
    peft.train()
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    x = model_inputs()
    for step in range(1, steps + 1):
        extra = peft.adapter_loss()
        (peft(**x).logits.pow(2).mean() + (0 if extra is None else extra)).backward()
        opt.step()
        peft.after_optimizer_step(step)
        opt.zero_grad()
    peft.eval()


def test_training_a_fusion_changes_it_and_its_head_only():
    peft = bert_members()
    before = {n: p.detach().clone() for n, p in peft.named_parameters()}
    train(peft)
    changed = {n for n, p in peft.named_parameters() if not torch.equal(p, before[n])}
    fusion_and_head = {n for n in before if ".adapter_fusion.f." in n or ".modules_to_save.f." in n}
    assert changed == fusion_and_head and len(fusion_and_head) == 4 * 6 + 2


def test_switching_disabling_and_mixed_batches():
    peft, x = bert_members(), model_inputs()
    with torch.no_grad():
        fused = peft(**x).logits
        with peft.disable_adapter():
            torch.testing.assert_close(peft(**x).logits, tiny_bert()(**x).logits, atol=0, rtol=0)
        peft.set_adapter("a")
        alone = peft(**x).logits
        assert not torch.allclose(alone, fused, atol=1e-4)
        peft.set_adapter("f")
        assert torch.equal(peft(**x).logits, fused)
        mixed = peft(**x, adapter_names=["f", "a", BASE]).logits
    torch.testing.assert_close(mixed[0], fused[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[1], alone[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[2], tiny_bert()(**x).logits[2], atol=1e-6, rtol=1e-6)


def test_a_member_active_beside_its_fusion_counts_once_and_trains_inside_it():
    """set_adapter([fusion, member]) unfreezes the member; its output reaches h' only through the
    fusion. An active adapter outside the fusion adds its output as usual."""
    peft = fused_net()
    peft.add_adapter("d", BottleneckConfig(target_modules=["lin"], init_weights=False))
    lay, x = layer(peft), torch.randn(3, 8)
    with torch.no_grad():
        peft.set_adapter("f")
        fused = peft(x)
        peft.set_adapter(["f", "a"])
        assert torch.equal(peft(x), fused)
        peft.set_adapter(["f", "d"])
        torch.testing.assert_close(peft(x), fused + member_output(lay, lay.base_layer(x), "d"), atol=1e-6, rtol=1e-6)
    peft.set_adapter(["f", "a"])
    peft(x).pow(2).sum().backward()
    grads = {n: p.grad for n, p in peft.named_parameters() if ".adapter_" in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".f." in n or ".a." in n)
    assert all(g is None for n, g in grads.items() if not (".f." in n or ".a." in n))


def test_save_load_round_trip_is_exact(tmp_path):
    from safetensors.torch import load_file

    peft, x = bert_members(), model_inputs()
    train(peft)
    peft.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "f" / "adapter_model.safetensors"))
    assert len(keys) == 2 * 2 * 6 + 2 and "base_model.model.bert.encoder.layer.0.output.dense.adapter_fusion.value.weight" in keys
    saved = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTER_FUSION" and saved["adapter_names"] == ["a", "b"]
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", "b")
    loaded.load_adapter(tmp_path / "f", "f")
    loaded.set_adapter("f")
    assert torch.equal(loaded(**x).logits, peft(**x).logits)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_loading_a_fusion_without_its_members_names_them(tmp_path):
    peft = bert_members()
    peft.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\['a', 'b'\] are not bottleneck adapters.*load_adapter"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path / "f")
    partial = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", adapter_name="a")
    with pytest.raises(ValueError, match=r"\['b'\] are not bottleneck adapters"):
        partial.load_adapter(tmp_path / "f", "f")
    assert list(partial.peft_config) == ["a"] and not any(layer.adapter_fusion for _, layer in
                                                          partial.base_model.adapter_layers() if isinstance(layer, BottleneckLayer))


def test_fusion_refuses_members_on_different_layers_or_of_other_methods():
    torch.manual_seed(0)
    peft = get_peft_model(tiny_bert(), BottleneckConfig(task_type="SEQ_CLS", placement="houlsby"), adapter_name="a")
    peft.add_adapter("p", BottleneckConfig(task_type="SEQ_CLS", placement="pfeiffer"))
    peft.add_adapter("lora", LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    with pytest.raises(ValueError, match="'a' and 'p': they sit on different layers.*attention.output.dense"):
        peft.add_fusion(["a", "p"], name="f")
    with pytest.raises(ValueError, match=r"\['lora'\] are not bottleneck adapters.*\['a', 'p'\]"):
        peft.add_fusion(["a", "lora"], name="f")
    peft.add_adapter("a2", BottleneckConfig(task_type="SEQ_CLS", placement="houlsby"))
    peft.add_fusion(["a", "a2"], name="f")
    with pytest.raises(ValueError, match=r"\['f'\] are not bottleneck adapters"):
        peft.add_fusion(["f", "a"], name="g")
    assert "g" not in peft.peft_config


def test_members_cannot_be_deleted_under_a_fusion_and_merging_is_refused():
    peft, x = bert_members(), model_inputs()
    before = peft(**x).logits
    with pytest.raises(ValueError, match="'a' is a member of fusion 'f'.*delete_adapter\\('f'\\) first"):
        peft.delete_adapter("a")
    with pytest.raises(ValueError, match="'f' cannot be merged"):
        peft.merge_adapter()
    assert torch.equal(peft(**x).logits, before) and set(peft.peft_config) == {"a", "b", "f"}
    peft.delete_adapter("f")
    assert not any(".adapter_fusion." in n or ".modules_to_save.f." in n for n, _ in peft.named_parameters())
    peft.delete_adapter("a")
    assert set(peft.peft_config) == {"b"}


def test_temperature_anneals_in_training_and_eval_uses_the_end_value():
    peft = bert_members(temperature=0.5, temperature_start=2.0, anneal_steps=4)
    fusion = peft.base_model.model.get_submodule("bert.encoder.layer.0.output.dense").adapter_fusion["f"]
    assert (fusion.train_temperature, fusion.temperature) == (2.0, 0.5)
    train(peft, steps=2)
    assert fusion.train_temperature == pytest.approx(2.0 + 0.5 * (0.5 - 2.0))
    state = peft.training_state()
    train(peft, steps=5)
    assert fusion.train_temperature == 0.5
    peft.load_training_state(state)
    assert fusion.train_temperature == pytest.approx(1.25)
    lay, h = peft.base_model.model.get_submodule("bert.encoder.layer.0.output.dense"), torch.randn(2, 3, 32)
    with torch.no_grad():
        lay.eval()
        torch.testing.assert_close(lay.fused_output(h, "f") + h, by_hand(lay, h, "f", ["a", "b"], 0.5)[0])
        lay.train()
        torch.testing.assert_close(lay.fused_output(h, "f") + h, by_hand(lay, h, "f", ["a", "b"], 1.25)[0])


def test_value_regularization_is_the_distance_of_w_v_from_identity():
    peft = bert_members(value_regularization=0.3)
    assert bert_members().adapter_loss() is None
    layers = [l for _, l in peft.base_model.adapter_layers() if isinstance(l, BottleneckLayer)]
    with torch.no_grad():
        for lay in layers:
            lay.adapter_fusion["f"].value.weight.add_(torch.randn(32, 32) * 0.1)
    expected = 0.3 * sum(((l.adapter_fusion["f"].value.weight - torch.eye(32)) ** 2).sum() for l in layers)
    torch.testing.assert_close(peft.adapter_loss(), expected)


def test_adapter_drop_leaves_dropped_members_out_of_the_softmax():
    torch.manual_seed(0)
    kw = dict(task_type="SEQ_CLS", init_weights=False)
    peft = get_peft_model(tiny_bert(), BottleneckConfig(adapter_drop=[1], **kw), adapter_name="a")
    peft.add_adapter("b", BottleneckConfig(adapter_drop=[0, 1], **kw))
    peft.add_fusion(["a", "b"], name="f", init_std=0.5)
    peft.set_adapter("f")
    block = "bert.encoder.layer.{}.output.dense"
    first, second = (peft.base_model.model.get_submodule(block.format(i)) for i in (0, 1))
    x, h = torch.randn(2, 3, 48), torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(first.fused_output(h, "f") + h, by_hand(first, h, "f", ["a"], 1.0)[0])
        assert second.fused_output(h, "f") is None and torch.equal(second(x), second.base_layer(x))


@pytest.mark.parametrize("field, value, allowed", [
    ("adapter_names", ["a"], "at least two"), ("adapter_names", ["a", "a"], "distinct"),
    ("temperature", 0, "> 0"), ("temperature_start", -1.0, "None or a number > 0"),
    ("anneal_steps", 0, "when temperature_start is set"), ("init_std", 0.0, "> 0"),
    ("value_noise", -1e-3, ">= 0"), ("use_bias", "yes", "bool"), ("value_regularization", -1, ">= 0"),
])
def test_bad_config_values_name_the_field_and_what_is_allowed(field, value, allowed):
    kwargs = {"adapter_names": ["a", "b"], field: value}
    if field == "anneal_steps":
        kwargs["temperature_start"] = 2.0
    with pytest.raises(ValueError, match=f"{field}=.*expected.*{allowed}"):
        FusionConfig(**kwargs)


def test_fusion_loads_by_peft_type_but_is_not_a_method_to_apply_to_a_plain_model():
    assert "fusion" not in list_methods() and "adapter" in list_methods()
    assert get_method("fusion").config_cls is FusionConfig
    config = FusionConfig(adapter_names=["a", "b"], temperature=0.5)
    assert FusionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
