"""LoRA against a direct computation of its equation, for every layer type it wraps."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import LoraConfig, get_peft_model


class Net(nn.Module):
    """One module of each supported type, applied in sequence where shapes allow."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 6)
        self.gpt = Conv1D(5, 6)  # (in=6, out=5), weight stored (in, out)
        self.c1 = nn.Conv1d(5, 4, kernel_size=3, padding=1)
        self.c2 = nn.Conv2d(4, 3, kernel_size=(3, 2), stride=1, padding=1)

    def forward(self, ids):
        h = self.gpt(self.lin(self.emb(ids)))  # (b, t, 5)
        h = self.c1(h.transpose(1, 2))  # (b, 4, t)
        return self.c2(h.unsqueeze(-1))  # (b, 3, t', w')


def direct(net, peft, ids, scale):
    """The LoRA equation written out with plain tensors, layer by layer."""
    lay = {k: peft.base_model.model.get_submodule(k) for k in ("emb", "lin", "gpt", "c1", "c2")}
    A = {k: (l.lora_embedding_A["default"] if k == "emb" else l.lora_A["default"].weight) for k, l in lay.items()}
    B = {k: (l.lora_embedding_B["default"] if k == "emb" else l.lora_B["default"].weight) for k, l in lay.items()}
    h = net.emb.weight[ids] + scale["emb"] * (A["emb"].T[ids] @ B["emb"].T)
    h = h @ net.lin.weight.T + net.lin.bias + scale["lin"] * (h @ A["lin"].T @ B["lin"].T)
    h = h @ net.gpt.weight + net.gpt.bias + scale["gpt"] * (h @ A["gpt"].T @ B["gpt"].T)
    x = h.transpose(1, 2)
    h = net.c1(x) + scale["c1"] * F.conv1d(F.conv1d(x, A["c1"], padding=1), B["c1"])
    x = h.unsqueeze(-1)
    return net.c2(x) + scale["c2"] * F.conv2d(F.conv2d(x, A["c2"], padding=1), B["c2"])


def make(use_rslora=False, **kw):
    torch.manual_seed(0)
    net = Net()
    ref = Net()
    ref.load_state_dict(net.state_dict())
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["emb", "lin", "gpt", "c1", "c2"],
                     init_lora_weights=False, use_rslora=use_rslora, **kw)
    return ref, get_peft_model(net, cfg)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_every_layer_type_matches_the_equation(use_rslora):
    ref, peft = make(use_rslora)
    ids = torch.randint(0, 20, (2, 7))
    s = 6 / math.sqrt(4) if use_rslora else 6 / 4
    expected = direct(ref, peft, ids, dict.fromkeys(("emb", "lin", "gpt", "c1", "c2"), s))
    torch.testing.assert_close(peft(ids), expected, atol=1e-5, rtol=1e-5)


def test_gradients_match_the_equation():
    ref, peft = make()
    ids = torch.randint(0, 20, (2, 7))
    peft(ids).square().sum().backward()
    ours = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    for p in peft.parameters():
        p.grad = None
    direct(ref, peft, ids, dict.fromkeys(("emb", "lin", "gpt", "c1", "c2"), 1.5)).square().sum().backward()
    for n, p in peft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[n], p.grad, atol=1e-4, rtol=1e-4)


def test_merged_weights_equal_base_plus_scaled_product():
    ref, peft = make()
    peft.merge_adapter()
    m = peft.base_model.model
    lin, gpt = m.lin, m.gpt
    expected = ref.lin.weight + 1.5 * lin.lora_B["default"].weight @ lin.lora_A["default"].weight
    torch.testing.assert_close(lin.base_layer.weight, expected)
    expected = ref.gpt.weight + 1.5 * (gpt.lora_B["default"].weight @ gpt.lora_A["default"].weight).T
    torch.testing.assert_close(gpt.base_layer.weight, expected)


def test_patterns_set_rank_and_alpha_per_module():
    _, peft = make(rank_pattern={"lin": 2, "c.": 3}, alpha_pattern={"gpt": 10})
    m = peft.base_model.model
    assert (m.lin.r["default"], m.c1.r["default"], m.c2.r["default"], m.gpt.r["default"]) == (2, 3, 3, 4)
    assert m.lin.lora_A["default"].weight.shape == (2, 8)
    assert m.lin.scaling["default"] == 6 / 2 and m.gpt.scaling["default"] == 10 / 4
    _, rs = make(use_rslora=True, rank_pattern={"lin": 9})
    assert rs.base_model.model.lin.scaling["default"] == pytest.approx(6 / 3)


def test_default_init_is_kaiming_a_and_zero_b_and_gaussian_is_normal():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(512, 512))
    peft = get_peft_model(lin, LoraConfig(r=64, target_modules=["0"]))
    a, b = peft.base_model.model[0].lora_A["default"].weight, peft.base_model.model[0].lora_B["default"].weight
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(512)  # kaiming-uniform with a=sqrt(5) on fan_in 512
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    g = get_peft_model(nn.Sequential(nn.Linear(512, 512)), LoraConfig(r=64, target_modules=["0"], init_lora_weights="gaussian"))
    ga = g.base_model.model[0].lora_A["default"].weight
    assert ga.std().item() == pytest.approx(1 / 64, rel=0.05)


def test_dropout_only_touches_the_low_rank_path():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16))
    peft = get_peft_model(net, LoraConfig(r=4, target_modules=["0"], lora_dropout=0.5, init_lora_weights=False))
    layer = peft.base_model.model[0]
    x = torch.randn(64, 16)
    peft.train()
    torch.manual_seed(1)
    out = peft(x)
    torch.manual_seed(1)
    mask_x = F.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + layer.scaling["default"] * mask_x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    torch.testing.assert_close(out, expected)
    peft.eval()
    assert torch.equal(peft(x), peft(x))


def test_bias_modes_train_the_right_biases(tmp_path):
    from tiny_models import tiny_bert

    for mode, expect in (("none", 0), ("lora_only", 2 * 2), ("all", None)):
        peft = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query", "value"], bias=mode))
        biases = [n for n, p in peft.named_parameters() if p.requires_grad and n.endswith("bias")]
        total = sum(1 for n, _ in tiny_bert().named_parameters() if n.endswith("bias"))
        assert len(biases) == (total if expect is None else expect)
        peft.save_pretrained(tmp_path / mode)
        from safetensors.torch import load_file
        saved = load_file(tmp_path / mode / "adapter_model.safetensors")
        assert sum(k.endswith("bias") for k in saved) == len(biases)


def test_bad_config_values_name_the_field():
    for kwargs, field in ((dict(r=0), "r="), (dict(lora_dropout=1.0), "lora_dropout="),
                          (dict(bias="some"), "bias="), (dict(init_lora_weights="xavier"), "init_lora_weights="),
                          (dict(task_type="CLS"), "task_type=")):
        with pytest.raises(ValueError, match=field):
            LoraConfig(target_modules=["q"], **kwargs)
