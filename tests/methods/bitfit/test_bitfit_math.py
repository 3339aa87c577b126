"""BitFit against its equation written out with plain tensors (the base layer with bias b + delta),
bias creation on merge for layers without one, the default and paper-subset targets, the file."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from peftkit import BitFitConfig, PeftModel, get_peft_model
from peftkit.methods.bitfit.layer import BitFitLayer
from tiny_models import logits, model_inputs, tiny_bert, tiny_llama


class Net(nn.Module):
    """x (batch, 8) -> (batch, 4): a linear layer with a bias, a LayerNorm, one without a bias."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 4, bias=False)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()

    def forward(self, x):
        return self.out(self.norm(self.lin(x)))


def make(**kw) -> PeftModel:
    return get_peft_model(Net(), BitFitConfig(**({"target_modules": ["lin", "out"], "init_bitfit_weights": False} | kw)))


def delta(model, key, name="default"):
    return model.base_model.model.get_submodule(key).bitfit_bias[name]


def direct(model, x, name="default"):
    """W x + (b + delta), LayerNorm(h) * gamma + (beta + delta), and the bias-less layer + delta."""
    net = Net()
    h = F.linear(x, net.lin.weight, net.lin.bias + delta(model, "lin", name))
    h = F.layer_norm(h, (16,), net.norm.weight, net.norm.bias + delta(model, "norm", name))
    return F.linear(h, net.out.weight, delta(model, "out", name))


def test_output_is_the_base_with_bias_plus_delta_on_linear_layernorm_and_biasless_layers():
    model, x = make(), torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), direct(model, x))


def test_merge_adds_into_the_bias_creates_a_missing_one_and_unmerge_removes_it():
    model, x = make(), torch.randn(5, 8)
    out, base = model.base_model.model.out, Net()
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match="had no bias"):
        model.merge_adapter()
    assert torch.equal(out.base_layer.bias, delta(model, "out").detach())
    torch.testing.assert_close(model.base_model.model.lin.base_layer.bias, base.lin.bias + delta(model, "lin").detach())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    model.unmerge_adapter()
    assert out.base_layer.bias is None and "bias" not in dict(out.base_layer.named_parameters())
    torch.testing.assert_close(model.base_model.model.lin.base_layer.bias, base.lin.bias)


def test_two_active_adapters_add_their_deltas():
    model, x = make(), torch.randn(5, 8)
    torch.manual_seed(1)
    model.add_adapter("other", BitFitConfig(target_modules=["lin", "out"], init_bitfit_weights=False))
    model.set_adapter(["default", "other"])
    net = Net()
    with torch.no_grad():
        h = F.linear(x, net.lin.weight, net.lin.bias + delta(model, "lin") + delta(model, "lin", "other"))
        h = F.layer_norm(h, (16,), net.norm.weight, net.norm.bias + delta(model, "norm") + delta(model, "norm", "other"))
        torch.testing.assert_close(model(x), F.linear(h, net.out.weight, delta(model, "out") + delta(model, "out", "other")))


def test_default_targets_are_every_linear_but_the_head_and_every_layernorm():
    model = get_peft_model(tiny_bert(), BitFitConfig(task_type="SEQ_CLS"))
    wrapped = {k for k, m in model.base_model.model.named_modules() if isinstance(m, BitFitLayer)}
    base = tiny_bert()
    linears = {k for k, m in base.named_modules() if isinstance(m, nn.Linear) and k != "classifier"}
    norms = {k for k, m in base.named_modules() if isinstance(m, nn.LayerNorm)}
    assert wrapped == linears | norms
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    biases = sum(m.bias.numel() for k, m in base.named_modules() if k in wrapped) + sum(p.numel() for p in base.classifier.parameters())
    assert trainable == biases  # one delta entry per base bias entry, plus the classifier head


def test_paper_subset_trains_only_query_value_and_intermediate_biases():
    config = BitFitConfig(task_type="SEQ_CLS", target_modules=["query", "value", "intermediate.dense"], include_layernorms=False)
    model = get_peft_model(tiny_bert(), config)
    wrapped = sorted(k.split(".", 4)[-1] for k, m in model.base_model.model.named_modules() if isinstance(m, BitFitLayer))
    assert wrapped == sorted(["attention.self.query", "attention.self.value", "intermediate.dense"] * 2)


def test_training_moves_only_the_deltas_and_the_file_holds_only_them(tmp_path):
    model, x = get_peft_model(tiny_llama(), BitFitConfig(task_type="CAUSAL_LM")), model_inputs()
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "bitfit" not in k}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(k.endswith(".bitfit_bias") for k in saved)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_a_module_without_a_bias_term_is_refused_with_the_supported_types():
    with pytest.raises(ValueError, match="LlamaRMSNorm.*supported: Linear, GPT-2 Conv1D, LayerNorm"):
        get_peft_model(tiny_llama(), BitFitConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize("bad", [dict(target_modules=3), dict(include_layernorms="yes"), dict(init_bitfit_weights=None)])
def test_config_is_validated_with_the_field_named(bad):
    with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
        BitFitConfig(**bad)
