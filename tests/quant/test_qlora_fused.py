"""The fused LoRA node on a 4-bit base: W rebuilt inside the node, the same math as the module path."""
import copy

import pytest
import torch

import peftkit.kernels.lora_linear as lora_linear_module
import peftkit.kernels.patch as patch_module
from peftkit import LoraConfig, get_peft_model
from peftkit.kernels import patch_model
from peftkit.kernels.lora_linear import lora_linear, lora_linear_reference
from peftkit.kernels.lora_shared import lora_linears_shared, lora_linears_shared_reference
from peftkit.quant import Linear4bit, QuantConfig, quantize_model
from tiny_models import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantized(in_features, out_features, seed, dtype=torch.float64, bias=True):
    torch.manual_seed(seed)
    return Linear4bit.from_linear(torch.nn.Linear(in_features, out_features, bias=bias).to(dtype), dtype, "nf4", True)


def factors(layer, r, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, layer.in_features, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(layer.out_features, r, generator=g, dtype=dtype).requires_grad_()
    return a, b


def test_fused_4bit_node_passes_gradcheck_against_the_dequantized_weight():
    layer = quantized(12, 10, 0)
    a, b = factors(layer, 3, 1)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    quant = layer.quant_state()
    fused = lora_linear(x, layer.weight, layer.bias, a, b, 0.5, quant)
    want = lora_linear_reference(x, layer.dequantize(torch.float64), layer.bias, a, b, 0.5)
    torch.testing.assert_close(fused, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, a, b: lora_linear(x, layer.weight, layer.bias, a, b, 0.5, quant), (x, a, b))


def test_shared_4bit_node_matches_the_reference_with_mixed_4bit_and_full_precision_weights():
    layers4 = [quantized(12, out, seed) for seed, out in enumerate((10, 6))]
    dense = torch.nn.Linear(12, 7, dtype=torch.float64).requires_grad_(False)
    rows = [(l.weight, l.bias, *factors(l, 2 + i, 10 + i), 0.5 + i, l.quant_state()) for i, l in enumerate(layers4)]
    a, b = factors(dense, 4, 20)
    rows.append((dense.weight, dense.bias, a, b, 2.0))  # no quant: a plain weight in the same node
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    got = lora_linears_shared(x, rows)
    want = lora_linears_shared_reference(x, rows)
    assert len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    adapters = [t for row in rows for t in row[2:4]]
    cot = [torch.randn_like(g) for g in got]
    grads = torch.autograd.grad(got, [x, *adapters], cot)
    refs = torch.autograd.grad(want, [x, *adapters], cot)
    for g, w in zip(grads, refs):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_4bit_weight_is_rebuilt_twice_and_never_saved_full_size(monkeypatch):
    layer = quantized(64, 48, 0, torch.float32)
    a, b = factors(layer, 4, 1, torch.float32)
    x = torch.randn(8, 64, requires_grad=True)
    rebuilt = []
    real = lora_linear_module.dequantize_4bit
    monkeypatch.setattr(lora_linear_module, "dequantize_4bit", lambda *args: rebuilt.append(1) or real(*args))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = lora_linear(x, layer.weight, layer.bias, a, b, 1.0, layer.quant_state())
    y.sum().backward()
    assert len(rebuilt) == 2  # forward, and dx in backward
    assert (48, 64) not in saved and torch.Size([48, 64]) not in saved


def qlora_llama(dtype):
    base = quantize_model(tiny_llama(0).to(dtype), QuantConfig(bnb_4bit_use_double_quant=True,
                                                              bnb_4bit_compute_dtype=dtype))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_qlora_llama_takes_the_fused_path_with_the_module_paths_loss_and_grads(monkeypatch, dtype):
    calls, singles = [], []
    shared, single = patch_module.lora_linears_shared, lora_linear_module._LoraLinear.apply
    monkeypatch.setattr(patch_module, "lora_linears_shared", lambda x, layers: calls.append(len(layers)) or shared(x, layers))
    monkeypatch.setattr(lora_linear_module._LoraLinear, "apply", lambda *a: singles.append(a[-1] is not None) or single(*a))
    plain = qlora_llama(dtype).train()
    patched = copy.deepcopy(plain)
    patch_model(patched)
    for _, layer in plain.base_model.adapter_layers():
        layer.fused_weight = lambda dtype: None  # the module path: Linear4bit.forward + the low-rank term
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    results = []
    for model in (plain, patched):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.float(), grads))
    assert sorted(calls) == [2, 2, 3, 3]
    assert singles == [True] * 4  # o_proj and down_proj of both layers: the single fused node, 4-bit weights
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(results[1][0], results[0][0], **tol)
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) == 2 * 7 * 2
    for name, grad in results[0][1].items():
        scale = grad.abs().max().clamp_min(1e-6)
        # bf16: two summation orders of the same bf16 products (0.061 at most on this model)
        assert ((results[1][1][name] - grad).abs().max() / scale).item() < (1e-4 if dtype == torch.float32 else 7e-2), name


def test_autocast_or_another_input_dtype_keeps_the_module_path():
    model = qlora_llama(torch.float32)
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    assert layer.fused_weight(torch.float32) is not None
    assert layer.fused_weight(torch.bfloat16) is None
    with torch.autocast("cpu", torch.bfloat16):
        assert layer.fused_weight(torch.float32) is None  # autocast would compute in bf16
    bf16 = qlora_llama(torch.bfloat16).base_model.model.model.layers[0].self_attn.o_proj
    with torch.autocast("cpu", torch.bfloat16):
        assert bf16.fused_weight(torch.bfloat16) is not None  # autocast to the layer's own dtype: fused
