"""DoRA against its equation written out with a directly formed merged weight, and against HF PEFT."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from peftkit import DoraConfig, LoraConfig, PeftConfig, get_peft_model
from peftkit.methods.dora.layer import DoraLinear, row_norm, row_norm_reference
from tiny_models import FAMILIES, logits, model_inputs

S = 6 / 4  # lora_alpha / r below


class Net(nn.Module):
    """A Linear and a GPT-2 Conv1D (weight stored (in, out)) in sequence."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = nn.Linear(8, 6)
        self.gpt = Conv1D(5, 6)  # (in=6, out=5)

    def forward(self, x):
        return self.gpt(torch.tanh(self.lin(x)))


def make(identity=False, **kw):
    torch.manual_seed(0)
    net, ref = Net(), Net()
    ref.load_state_dict(net.state_dict())
    cfg = DoraConfig(r=4, lora_alpha=6, target_modules=["lin", "gpt"], init_lora_weights=identity, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D sets fan_in_fan_out
        peft = get_peft_model(net, cfg)
    return ref, peft


def layers(peft):
    return {k: peft.base_model.model.get_submodule(k) for k in ("lin", "gpt")}


def spread_magnitudes(peft, seed=3):
    """Move m away from its initial value n, so the direction and magnitude both matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(peft).values():
            m = layer.lora_magnitude_vector["default"]
            m.mul_(0.5 + torch.rand(m.shape, generator=g))


def merged_weight(w0, layer, name="default", detach_norm=True):
    """W' = m * (W0 + s B A) / ||W0 + s B A||_row, formed directly; w0 is (out, in)."""
    v = w0 + S * layer.lora_B[name].weight @ layer.lora_A[name].weight  # (out, in)
    n = v.norm(dim=1, keepdim=True)
    n = n.detach() if detach_norm else n
    return layer.lora_magnitude_vector[name][:, None] * v / n


def direct(ref, peft, x):
    lay = layers(peft)
    h = torch.tanh(F.linear(x, merged_weight(ref.lin.weight, lay["lin"]), ref.lin.bias))
    return F.linear(h, merged_weight(ref.gpt.weight.T, lay["gpt"]), ref.gpt.bias)


def test_forward_matches_the_equation():
    ref, peft = make()
    spread_magnitudes(peft)
    x = torch.randn(2, 7, 8)
    torch.testing.assert_close(peft(x), direct(ref, peft, x), atol=1e-5, rtol=1e-5)


def test_gradients_match_autograd_with_the_norm_detached():
    ref, peft = make()
    spread_magnitudes(peft)
    x = torch.randn(2, 7, 8)
    peft(x).square().sum().backward()
    ours = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    assert len(ours) == 6 and all(g.abs().sum() > 0 for g in ours.values())
    peft.zero_grad()
    direct(ref, peft, x).square().sum().backward()
    for n, p in peft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    # The detached norm matters: differentiating through it gives other gradients for A and B.
    peft.zero_grad()
    lay = layers(peft)
    h = torch.tanh(F.linear(x, merged_weight(ref.lin.weight, lay["lin"], detach_norm=False), ref.lin.bias))
    F.linear(h, merged_weight(ref.gpt.weight.T, lay["gpt"], detach_norm=False), ref.gpt.bias).square().sum().backward()
    a = dict(peft.named_parameters())["base_model.model.lin.lora_A.default.weight"]
    assert not torch.allclose(a.grad, ours["base_model.model.lin.lora_A.default.weight"], atol=1e-5)


def test_magnitude_starts_at_the_row_norm():
    ref, peft = make(identity=True)
    lay = layers(peft)
    assert torch.count_nonzero(lay["lin"].lora_B["default"].weight) == 0
    torch.testing.assert_close(lay["lin"].lora_magnitude_vector["default"], ref.lin.weight.norm(dim=1))
    torch.testing.assert_close(lay["gpt"].lora_magnitude_vector["default"], ref.gpt.weight.norm(dim=0))
    x = torch.randn(3, 8)
    assert torch.equal(peft(x), ref(x))
    # With random B the adapter starts as plain LoRA (m = ||W0 + s B A||), as in HF PEFT.
    ref, peft = make(identity=False)
    lin = layers(peft)["lin"]
    v = ref.lin.weight + S * lin.lora_B["default"].weight @ lin.lora_A["default"].weight
    torch.testing.assert_close(lin.lora_magnitude_vector["default"], v.norm(dim=1))


def test_low_memory_norm_equals_the_formed_norm():
    torch.manual_seed(0)
    w0, a, b = torch.randn(40, 24), torch.randn(3, 24), torch.randn(40, 3)
    torch.testing.assert_close(row_norm(w0, a, b, 0.7), row_norm_reference(w0, a, b, 0.7), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row_norm_reference(w0, a, b, 0.7), (w0 + 0.7 * b @ a).norm(dim=1))


def test_merge_folds_the_decomposed_weight_and_unmerge_restores():
    ref, peft = make()
    spread_magnitudes(peft)
    lay = layers(peft)
    x = torch.randn(4, 8)
    before = peft(x)
    peft.merge_adapter()
    torch.testing.assert_close(lay["lin"].base_layer.weight, merged_weight(ref.lin.weight, lay["lin"]).detach())
    torch.testing.assert_close(lay["gpt"].base_layer.weight, merged_weight(ref.gpt.weight.T, lay["gpt"]).detach().T)
    torch.testing.assert_close(peft(x), before, atol=1e-5, rtol=1e-5)
    peft.unmerge_adapter()
    torch.testing.assert_close(lay["lin"].base_layer.weight, ref.lin.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(lay["gpt"].base_layer.weight, ref.gpt.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(peft(x), before, atol=1e-5, rtol=1e-5)


def second_adapter(peft):
    torch.manual_seed(9)
    peft.add_adapter("other", DoraConfig(r=2, lora_alpha=3, target_modules=["lin", "gpt"], init_lora_weights=False))


def test_two_active_adapters_apply_in_turn_and_merge_to_the_same():
    """W' = f_o * (f_d * (W0 + s_d B_d A_d) + s_o B_o A_o): the second rescales the first (HF's order)."""
    ref, peft = make()
    spread_magnitudes(peft)
    second_adapter(peft)
    x = torch.randn(4, 8)
    lin = layers(peft)["lin"]
    peft.set_adapter(["default", "other"])
    both = peft(x)
    w0, low = ref.lin.weight, 3 / 2 * lin.lora_B["other"].weight @ lin.lora_A["other"].weight  # s_o B_o A_o
    f_other = lin.lora_magnitude_vector["other"][:, None] / (w0 + low).norm(dim=1, keepdim=True)
    w = f_other * (merged_weight(w0, lin) + low)
    torch.testing.assert_close(lin(x), F.linear(x, w, ref.lin.bias), atol=1e-5, rtol=1e-5)
    # Merging them one at a time in their active order, then both back out: same outputs all the way.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.merge_adapter(["default"])
        torch.testing.assert_close(peft(x), both, atol=1e-5, rtol=1e-5)
        peft.merge_adapter(["other"])
    torch.testing.assert_close(peft(x), both, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.base_layer.weight, w.detach(), atol=1e-5, rtol=1e-5)
    peft.unmerge_adapter()
    torch.testing.assert_close(lin.base_layer.weight, w0, atol=1e-5, rtol=0)
    torch.testing.assert_close(peft(x), both, atol=1e-5, rtol=1e-5)
    # The other order is another model; merging out of the active order says it changes the output.
    peft.set_adapter(["other", "default"])
    assert not torch.allclose(peft(x), both, atol=1e-4)
    with pytest.warns(UserWarning, match="reorders them and changes the output"):
        peft.merge_adapter(["default"])


def test_dropout_follows_hf_form():
    """While training with dropout: h = W0 x + b + (f - 1) W0 d(x) + f s B A d(x)."""
    ref, peft = make(lora_dropout=0.5)
    spread_magnitudes(peft)
    lin = layers(peft)["lin"]
    x = torch.randn(16, 8)
    lin.train()
    torch.manual_seed(1)
    out = lin(x)
    torch.manual_seed(1)
    d = F.dropout(x, 0.5, training=True)
    w0, a, b = ref.lin.weight, lin.lora_A["default"].weight, lin.lora_B["default"].weight
    f = lin.lora_magnitude_vector["default"] / (w0 + S * b @ a).norm(dim=1)
    expected = F.linear(x, w0, ref.lin.bias) + (f - 1) * F.linear(d, w0) + f * S * (d @ a.T @ b.T)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_lora_config_with_use_dora_builds_dora_and_reloads_as_dora(tmp_path):
    torch.manual_seed(0)
    peft = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(target_modules=["0"], use_dora=True))
    assert isinstance(peft.base_model.model[0], DoraLinear)
    plain = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(target_modules=["0"]))
    assert not isinstance(plain.base_model.model[0], DoraLinear)
    peft.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is DoraConfig and config.use_dora is True and config.peft_type == "LORA"
    with pytest.raises(ValueError, match="use_dora"):
        DoraConfig(target_modules=["0"], use_dora=False)


def test_unsupported_layer_types_raise_and_leave_the_model_alone():
    net = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="DoRA adapts nn.Linear and GPT-2 Conv1D layers only, not Embedding"):
        get_peft_model(net, DoraConfig(target_modules=["0", "1"]))
    assert type(net[0]) is nn.Embedding and type(net[1]) is nn.Linear


# -- interop with HF PEFT -------------------------------------------------------------------------
hf = pytest.importorskip("peft")
LIBS = {"hf": hf, "pk": __import__("peftkit")}


def build(lib, family):
    builder, targets, task = FAMILIES[family]
    config = LIBS[lib].LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task, use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LIBS[lib].get_peft_model(builder(), config)


def train(model, steps=3):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        model(**model_inputs(seed=10 + step)).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def load(lib, family, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LIBS[lib].PeftModel.from_pretrained(FAMILIES[family][0](), str(path))


@pytest.mark.parametrize("src,dst", [("hf", "pk"), ("pk", "hf")])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_dora_adapter_loads_across_libraries(family, src, dst, tmp_path):
    model = build(src, family)
    train(model)
    model.save_pretrained(tmp_path)
    loaded = load(dst, family, tmp_path)
    inputs = model_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=1e-5)
    with loaded.disable_adapter():
        assert (logits(loaded, inputs) - logits(model, inputs)).abs().max() > 1e-3, "the adapter changes nothing"
    if dst == "pk":
        assert {type(m) for m in loaded.modules() if hasattr(m, "lora_magnitude_vector")} == {DoraLinear}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_training_same_outputs_keys_and_counts(family, tmp_path):
    models = {lib: build(lib, family) for lib in LIBS}
    pk_params = dict(models["pk"].named_parameters())
    with torch.no_grad():  # same random start, so the same training run follows
        for name, p in models["hf"].named_parameters():
            if p.requires_grad:
                pk_params[name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")].copy_(p)
    counts = {lib: m.get_nb_trainable_parameters() for lib, m in models.items()}
    assert counts["pk"] == counts["hf"]
    for model in models.values():
        torch.manual_seed(0)  # BERT and GPT-2 use dropout while training
        train(model)
    inputs = model_inputs()
    torch.testing.assert_close(logits(models["pk"], inputs), logits(models["hf"], inputs), atol=1e-4, rtol=1e-4)
    saved = {}
    for lib, model in models.items():
        model.save_pretrained(tmp_path / lib)
        saved[lib] = {k: tuple(v.shape) for k, v in load_file(tmp_path / lib / "adapter_model.safetensors").items()}
    assert saved["pk"] == saved["hf"]
    assert any(k.endswith(".lora_magnitude_vector") for k in saved["pk"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_and_unload_agrees_with_hf(family, tmp_path):
    model = build("hf", family)
    train(model)
    model.save_pretrained(tmp_path)
    merged = {lib: load(lib, family, tmp_path).merge_and_unload() for lib in LIBS}
    want, got = merged["hf"].state_dict(), merged["pk"].state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=key)


def two_dora_adapters(family, tmp_path):
    """HF PEFT model with random DoRA adapters "default" and "other" (magnitudes moved off the norm),
    and peftkit's model with the same two loaded from its files."""
    builder, targets, _ = FAMILIES[family]  # no task type: HF activates one classifier copy at a time
    configs = {name: hf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=True,
                                   init_lora_weights=False) for name, r in (("default", 4), ("other", 2))}
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.get_peft_model(builder(), configs["default"])
        model.add_adapter("other", configs["other"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand_like(p))
    model.save_pretrained(tmp_path)
    ours = load("pk", family, tmp_path)
    ours.load_adapter(tmp_path / "other", "other")
    return model.eval(), ours


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_active_adapters_match_hf_in_either_order_and_merged(family, tmp_path):
    theirs, ours = two_dora_adapters(family, tmp_path)
    inputs, outputs = model_inputs(), []
    for order in (["default", "other"], ["other", "default"]):
        theirs.base_model.set_adapter(order)
        ours.set_adapter(order)
        outputs.append(logits(theirs, inputs))
        torch.testing.assert_close(logits(ours, inputs), outputs[-1], atol=1e-5, rtol=1e-5)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4, "the order must matter for this test to mean anything"
    ours.merge_adapter()  # ["other", "default"], in that order
    torch.testing.assert_close(logits(ours, inputs), outputs[1], atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, got = theirs.merge_and_unload().state_dict(), ours.merge_and_unload().state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=key)
