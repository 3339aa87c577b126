"""(IA)^3 against its equation written out with plain tensors, for every layer type it wraps.

    output scaling (attention):   h = l * (W x + b)
    input scaling (feed-forward): h = W (l * x) + b
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import IA3Config, get_peft_model

NAMES = ("lin", "lin_ff", "gpt", "gpt_ff", "conv", "conv_ff")
FEEDFORWARD = ["lin_ff", "gpt_ff", "conv_ff"]


class Net(nn.Module):
    """Each supported layer type twice (output scaled, input scaled), applied in sequence."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = nn.Linear(8, 6)
        self.lin_ff = nn.Linear(6, 6)
        self.gpt = Conv1D(5, 6)  # (in=6, out=5), weight stored (in, out)
        self.gpt_ff = Conv1D(4, 5)  # (in=5, out=4)
        self.conv = nn.Conv2d(4, 6, kernel_size=3, padding=1)
        self.conv_ff = nn.Conv2d(6, 4, kernel_size=(3, 1), padding=(1, 0), groups=2)

    def forward(self, x):
        h = self.gpt_ff(self.gpt(self.lin_ff(self.lin(x))))  # (b, t, 4)
        h = self.conv(h.transpose(1, 2).unsqueeze(-1))  # (b, 6, t, 1)
        return self.conv_ff(h)  # (b, 4, t, 1)


def make(init=False, **kw):
    torch.manual_seed(0)
    net, ref = Net(), Net()
    ref.load_state_dict(net.state_dict())
    cfg = IA3Config(target_modules=list(NAMES), feedforward_modules=FEEDFORWARD, init_ia3_weights=init, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is corrected per layer type
        return ref, get_peft_model(net, cfg)


def vectors(peft, name="default"):
    m = peft.base_model.model
    return {k: m.get_submodule(k).ia3_l[name] for k in NAMES}


def direct(ref, l, x):
    """The (IA)^3 equations with plain tensors, layer by layer."""
    h = l["lin"].flatten() * F.linear(x, ref.lin.weight, ref.lin.bias)  # output scaled, bias too
    h = F.linear(l["lin_ff"].flatten() * h, ref.lin_ff.weight, ref.lin_ff.bias)  # input scaled
    h = l["gpt"].flatten() * (h @ ref.gpt.weight + ref.gpt.bias)
    h = (l["gpt_ff"].flatten() * h) @ ref.gpt_ff.weight + ref.gpt_ff.bias
    h = h.transpose(1, 2).unsqueeze(-1)  # (b, 4, t, 1)
    h = l["conv"].view(1, -1, 1, 1) * F.conv2d(h, ref.conv.weight, ref.conv.bias, padding=1)
    h = l["conv_ff"].view(1, -1, 1, 1) * h
    return F.conv2d(h, ref.conv_ff.weight, ref.conv_ff.bias, padding=(1, 0), groups=2)


def test_vectors_have_hf_shapes_and_start_at_one():
    _, peft = make(init=True)
    shapes = {k: tuple(v.shape) for k, v in vectors(peft).items()}
    assert shapes == {"lin": (6, 1), "lin_ff": (1, 6), "gpt": (5, 1), "gpt_ff": (1, 5),
                      "conv": (1, 6, 1, 1), "conv_ff": (1, 6, 1, 1)}
    assert all(torch.equal(v, torch.ones_like(v)) for v in vectors(peft).values())
    x = torch.randn(2, 7, 8)
    ref, _ = make()
    assert torch.equal(peft(x), ref(x))


def test_every_layer_type_matches_the_equation():
    ref, peft = make()
    x = torch.randn(2, 7, 8)
    torch.testing.assert_close(peft(x), direct(ref, vectors(peft), x), atol=1e-5, rtol=1e-5)


def test_conv3d_scales_output_or_input_channels():
    for feedforward in ([], ["0"]):
        torch.manual_seed(0)
        conv = nn.Conv3d(3, 5, kernel_size=2)
        weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
        peft = get_peft_model(nn.Sequential(conv), IA3Config(target_modules=["0"], feedforward_modules=feedforward,
                                                             init_ia3_weights=False))
        l = peft.base_model.model[0].ia3_l["default"]
        x = torch.randn(2, 3, 4, 4, 4)
        expected = F.conv3d(l * x, weight, bias) if feedforward else l * F.conv3d(x, weight, bias)
        assert l.shape == ((1, 3, 1, 1, 1) if feedforward else (1, 5, 1, 1, 1))
        torch.testing.assert_close(peft(x), expected, atol=1e-5, rtol=1e-5)


def test_gradients_match_the_equation():
    ref, peft = make()
    x = torch.randn(2, 7, 8)
    peft(x).square().sum().backward()
    ours = {k: v.grad.clone() for k, v in vectors(peft).items()}
    assert all(g.abs().sum() > 0 for g in ours.values())
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in vectors(peft).items()}
    direct(ref, leaves, x).square().sum().backward()
    for k in NAMES:
        torch.testing.assert_close(ours[k], leaves[k].grad, atol=1e-4, rtol=1e-4, msg=k)
    assert all(p.grad is None for n, p in peft.named_parameters() if "ia3_l" not in n)


def test_two_active_adapters_multiply_their_vectors():
    ref, peft = make()
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.add_adapter("other", IA3Config(target_modules=list(NAMES), feedforward_modules=FEEDFORWARD,
                                            init_ia3_weights=False))
    peft.base_model.set_adapter(["default", "other"])
    a, b = vectors(peft), vectors(peft, "other")
    x = torch.randn(2, 7, 8)
    expected = direct(ref, {k: a[k] * b[k] for k in NAMES}, x)
    torch.testing.assert_close(peft(x), expected, atol=1e-5, rtol=1e-5)


def grouped_columns(weight, l, groups):
    """Scale each kernel weight[o, j] of a grouped conv by l of the input channel it reads."""
    out = weight.clone()
    out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
    for o in range(weight.shape[0]):
        for j in range(in_per_group):
            out[o, j] = weight[o, j] * l.flatten()[(o // out_per_group) * in_per_group + j]
    return out


def test_merge_scales_rows_or_columns_and_unmerge_restores():
    ref, peft = make()
    x = torch.randn(2, 7, 8)
    before = peft(x)
    l, m = vectors(peft), peft.base_model.model
    peft.merge_adapter()
    with torch.no_grad():
        want = {
            "lin": (ref.lin.weight * l["lin"], ref.lin.bias * l["lin"].flatten()),  # rows and bias
            "lin_ff": (ref.lin_ff.weight * l["lin_ff"], ref.lin_ff.bias),  # columns, bias unchanged
            "gpt": (ref.gpt.weight * l["gpt"].T, ref.gpt.bias * l["gpt"].flatten()),  # (in, out): columns
            "gpt_ff": (ref.gpt_ff.weight * l["gpt_ff"].T, ref.gpt_ff.bias),  # (in, out): rows
            "conv": (ref.conv.weight * l["conv"].view(-1, 1, 1, 1), ref.conv.bias * l["conv"].flatten()),
            "conv_ff": (grouped_columns(ref.conv_ff.weight, l["conv_ff"], 2), ref.conv_ff.bias),
        }
    for k, (weight, bias) in want.items():
        torch.testing.assert_close(m.get_submodule(k).base_layer.weight, weight, msg=k)
        torch.testing.assert_close(m.get_submodule(k).base_layer.bias, bias, msg=k)
    torch.testing.assert_close(peft(x), before, atol=1e-5, rtol=1e-5)
    peft.unmerge_adapter()
    for k in NAMES:
        torch.testing.assert_close(m.get_submodule(k).base_layer.weight, ref.get_submodule(k).weight, msg=k)
        torch.testing.assert_close(m.get_submodule(k).base_layer.bias, ref.get_submodule(k).bias, msg=k)
    torch.testing.assert_close(peft(x), before, atol=1e-5, rtol=1e-5)


def test_unmerge_refuses_a_zero_scale_and_changes_nothing():
    _, peft = make()
    layer = peft.base_model.model.lin
    with torch.no_grad():
        layer.ia3_l["default"][2, 0] = 0.0
    with pytest.warns(UserWarning, match="cannot be unmerged"):
        peft.merge_adapter()
    weight, bias = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    with pytest.raises(ValueError, match="cannot unmerge adapter 'default'.*1 entries"):
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, weight) and torch.equal(layer.base_layer.bias, bias)
    assert layer.merged_adapters == ["default"]
    x = torch.randn(2, 7, 8)
    plain = peft.merge_and_unload()  # no division needed: still fine
    assert torch.isfinite(plain(x)).all()


def test_model_unmerge_is_all_or_nothing_when_one_layer_refuses():
    _, peft = make()
    m = peft.base_model.model
    with torch.no_grad():
        m.get_submodule(NAMES[-1]).ia3_l["default"].view(-1)[0] = 0.0  # the last layer refuses
    with pytest.warns(UserWarning, match="cannot be unmerged"):
        peft.merge_adapter()
    merged = {k: m.get_submodule(k).base_layer.weight.clone() for k in NAMES}
    with pytest.raises(ValueError, match="no weights were changed"):
        peft.unmerge_adapter()
    for k in NAMES:  # the layers before it were not unmerged either
        assert torch.equal(m.get_submodule(k).base_layer.weight, merged[k]), k
        assert m.get_submodule(k).merged_adapters == ["default"], k


def test_mixed_batch_rows_use_their_own_vectors():
    ref, peft = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.add_adapter("other", IA3Config(target_modules=list(NAMES), feedforward_modules=FEEDFORWARD,
                                            init_ia3_weights=False))
    x = torch.randn(3, 7, 8)
    with peft.base_model.batch_adapters(["other", "__base__", "default"]):
        mixed = peft(x)
    torch.testing.assert_close(mixed[0:1], direct(ref, vectors(peft, "other"), x[0:1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1:2], ref(x[1:2]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[2:3], direct(ref, vectors(peft), x[2:3]), atol=1e-5, rtol=1e-5)


def test_half_precision_base_keeps_its_dtype():
    _, peft = make()
    peft.to(torch.bfloat16)
    x = torch.randn(2, 7, 8, dtype=torch.bfloat16)
    assert peft(x).dtype == torch.bfloat16


def test_feedforward_modules_match_as_hf_does():
    cfg = IA3Config(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"])
    assert cfg.is_feedforward("bert.encoder.layer.0.output.dense")
    assert cfg.is_feedforward("bert.encoder.layer.0.attention.output.dense")  # plain suffix, as HF
    assert not cfg.is_feedforward("bert.encoder.layer.0.attention.self.key")
    regex = IA3Config(target_modules=["key", "dense"], feedforward_modules=r".*\.\d+\.output\.dense")
    assert regex.is_feedforward("bert.encoder.layer.0.output.dense")
    assert not regex.is_feedforward("bert.encoder.layer.0.attention.output.dense")
    plain = IA3Config(target_modules=r".*_proj", feedforward_modules=["proj"])
    assert plain.is_feedforward("model.layers.0.mlp.down_proj")  # not a dotted suffix, still a match


def test_random_init_is_standard_normal():
    peft = get_peft_model(nn.Sequential(nn.Linear(4, 4096)), IA3Config(target_modules=["0"], feedforward_modules=[],
                                                                      init_ia3_weights=False))
    l = peft.base_model.model[0].ia3_l["default"]
    assert abs(l.mean().item()) < 0.1 and l.std().item() == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_modules=["k", "v"], feedforward_modules=["wo"]), r"feedforward_modules=\['wo'\].*subset.*not in it: \['wo'\]"),
    (dict(target_modules=["k"], feedforward_modules=[1]), r"feedforward_modules=\[1\] is invalid: expected list\[str\] or str"),
    (dict(target_modules=["k"], feedforward_modules=[], init_ia3_weights="yes"), "init_ia3_weights="),
    (dict(target_modules=["k"], feedforward_modules=[], task_type="CLS"), "task_type="),
])
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IA3Config(**kwargs)


def test_unset_targets_take_hf_defaults_or_say_what_to_set():
    from tiny_models import tiny_bert, tiny_llama

    llama = get_peft_model(tiny_llama(), IA3Config())
    cfg = llama.peft_config["default"]
    assert (cfg.target_modules, cfg.feedforward_modules) == (["k_proj", "v_proj", "down_proj"], ["down_proj"])
    bert = get_peft_model(tiny_bert(), IA3Config(target_modules=["query", "value"]))
    assert bert.peft_config["default"].feedforward_modules == []  # defaults stay inside the targets
    with pytest.raises(ValueError, match="no IA3 default for model type None.*k_proj"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), IA3Config())


def test_embeddings_are_refused_with_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="'0' is a Embedding, which ia3 cannot adapt"):
        get_peft_model(model, IA3Config(target_modules=["0", "1"], feedforward_modules=[]))
    assert isinstance(model[1], nn.Linear)
