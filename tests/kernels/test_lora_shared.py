"""lora_linears_shared (q, k, v / gate, up as one node) against the per-linear formula."""

import copy

import pytest
import torch
from tiny_models import tiny_llama

from peftkit import LoraConfig, get_peft_model
from peftkit.kernels import patch as patch_module
from peftkit.kernels import patch_model
from peftkit.kernels.lora_shared import lora_linears_shared, lora_linears_shared_reference


def _layers(dtype, adapter_dtype=None, outs=(7, 3, 5), ranks=(3, 2, 4), fin=12, bias=True):
    g = torch.Generator().manual_seed(0)
    adapter_dtype = adapter_dtype or dtype
    layers = []
    for i, (o, r) in enumerate(zip(outs, ranks)):
        w = torch.randn(o, fin, generator=g, dtype=dtype)
        b = torch.randn(o, generator=g, dtype=dtype) if bias else None
        a = torch.randn(r, fin, generator=g, dtype=adapter_dtype, requires_grad=True)
        bb = torch.randn(o, r, generator=g, dtype=adapter_dtype, requires_grad=True)
        layers.append((w, b, a, bb, 0.5 + i))
    x = torch.randn(2, 5, fin, generator=g, dtype=dtype, requires_grad=True)
    return x, layers


def _adapters(layers):
    return [t for _, _, a, bb, _ in layers for t in (a, bb)]


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    x, layers = _layers(torch.float64, bias=bias)

    def fn(x, *ab):
        new = [(w, b, a, bb, s) for (w, b, _, _, s), a, bb in zip(layers, ab[0::2], ab[1::2])]
        return tuple(lora_linears_shared(x, new))
    assert torch.autograd.gradcheck(fn, (x, *_adapters(layers)))


def test_matches_reference_float32():
    x, layers = _layers(torch.float32)
    ys = lora_linears_shared(x, layers)
    cot = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, [x, *_adapters(layers)], cot)
    want_ys = lora_linears_shared_reference(x, layers)
    want = torch.autograd.grad(want_ys, [x, *_adapters(layers)], cot)
    for y, want_y in zip(ys, want_ys):
        torch.testing.assert_close(y, want_y)
    for got_i, want_i in zip(got, want):
        torch.testing.assert_close(got_i, want_i)


def test_one_unused_output_counts_as_zero_gradient():
    x, layers = _layers(torch.float64)
    ys = lora_linears_shared(x, layers)
    got = torch.autograd.grad(ys[0].sum() + ys[2].sum(), [x, *_adapters(layers)], allow_unused=True)
    want_ys = lora_linears_shared_reference(x, layers)
    want = torch.autograd.grad(want_ys[0].sum() + want_ys[2].sum(), [x, *_adapters(layers)], allow_unused=True)
    for got_i, want_i in zip(got, want):
        torch.testing.assert_close(got_i, want_i if want_i is not None else torch.zeros_like(got_i))


def test_bf16_activations_fp32_adapters_close_to_float64():
    x, layers = _layers(torch.bfloat16, adapter_dtype=torch.float32, outs=(64, 32), ranks=(8, 8), fin=96)
    ys = lora_linears_shared(x, layers)
    cot = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, [x, *_adapters(layers)], cot)
    assert all(g.dtype == torch.float32 for g in got[1:])
    x64 = x.detach().double().requires_grad_()
    l64 = [(w.double(), b.double(), a.detach().double().requires_grad_(), bb.detach().double().requires_grad_(), s)
           for w, b, a, bb, s in layers]
    want = torch.autograd.grad(lora_linears_shared_reference(x64, l64), [x64, *_adapters(l64)],
                               [c.double() for c in cot])
    for got_i, want_i in zip(got, want):
        assert ((got_i.double() - want_i).norm() / want_i.norm()).item() < 1e-2


def test_patched_lora_llama_takes_the_shared_path_with_same_loss_grads_and_keys(monkeypatch):
    calls = []
    real = patch_module.lora_linears_shared
    monkeypatch.setattr(patch_module, "lora_linears_shared", lambda x, layers: calls.append(len(layers)) or real(x, layers))
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    plain = get_peft_model(tiny_llama(), config).train()
    patched = copy.deepcopy(plain)
    keys = list(patched.state_dict())
    patch_model(patched)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (plain, patched):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert sorted(calls) == [2, 2, 3, 3]  # gate/up and q/k/v of both layers
    torch.testing.assert_close(losses[1], losses[0])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (plain, patched)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    assert list(patched.state_dict()) == keys
    assert all("forward" not in m.__dict__ for n, m in patched.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj")))
