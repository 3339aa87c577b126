"""lora_linear against the plain formula: values, gradients, dtypes, torch.compile."""

import pytest
import torch

from peftkit.kernels.lora_linear import lora_linear, lora_linear_reference


def _inputs(dtype, adapter_dtype=None, bias=True, shape=(2, 5, 12), out=7, r=3):
    g = torch.Generator().manual_seed(0)
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(out, shape[-1], generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    a = torch.randn(r, shape[-1], generator=g, dtype=adapter_dtype, requires_grad=True)
    bb = torch.randn(out, r, generator=g, dtype=adapter_dtype, requires_grad=True)
    return x, w, b, a, bb


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    x, w, b, a, bb = _inputs(torch.float64, bias=bias)
    assert torch.autograd.gradcheck(lambda x, a, bb: lora_linear(x, w, b, a, bb, 0.7), (x, a, bb))


@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_float32(bias):
    x, w, b, a, bb = _inputs(torch.float32, bias=bias)
    y = lora_linear(x, w, b, a, bb, 2.0)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, bb), g)
    want_y = lora_linear_reference(x, w, b, a, bb, 2.0)
    want = torch.autograd.grad(want_y, (x, a, bb), g)
    torch.testing.assert_close(y, want_y)
    for got_i, want_i in zip(got, want):
        torch.testing.assert_close(got_i, want_i)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bf16_activations_fp32_adapter_close_to_float64():
    x, w, b, a, bb = _inputs(torch.bfloat16, adapter_dtype=torch.float32, shape=(4, 64, 256), out=128, r=16)
    y = lora_linear(x, w, b, a, bb, 1.0)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    dx, da, dbb = torch.autograd.grad(y, (x, a, bb), g)
    assert da.dtype == torch.float32 and dbb.dtype == torch.float32
    ref = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    y64 = lora_linear_reference(ref[0], w.double(), b.double(), ref[1], ref[2], 1.0)
    want = torch.autograd.grad(y64, ref, g.double())
    assert _rel(y, y64) < 1e-2
    for got_i, want_i in zip((dx, da, dbb), want):
        assert _rel(got_i, want_i) < 1e-2


def test_saves_only_x_and_the_low_rank_product():
    x, w, b, a, bb = _inputs(torch.float32, shape=(3, 16, 32), out=24, r=4)
    y = lora_linear(x, w, b, a, bb, 1.0)
    saved = y.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() != w.data_ptr()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


def test_frozen_input_gets_no_gradient_and_base_weight_not_needed():
    x, w, b, a, bb = _inputs(torch.float32)
    x = x.detach()
    y = lora_linear(x, w, b, a, bb, 0.5)
    y.sum().backward()
    assert a.grad is not None and bb.grad is not None and x.grad is None


def test_trainable_base_weight_falls_back_to_reference():
    x, w, b, a, bb = _inputs(torch.float64)
    w.requires_grad_(True)
    lora_linear(x, w, b, a, bb, 0.5).sum().backward()
    assert w.grad is not None


def test_torch_compile_fullgraph():
    x, w, b, a, bb = _inputs(torch.float32)
    compiled = torch.compile(lora_linear, fullgraph=True, backend="aot_eager")
    y = compiled(x, w, b, a, bb, 0.5)
    y.sum().backward()
    torch.testing.assert_close(y, lora_linear_reference(x, w, b, a, bb, 0.5))
    assert a.grad is not None


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_expand_is_addmm(bias):
    from peftkit.kernels.lora_linear import low_rank_expand
    g = torch.Generator().manual_seed(1)
    p, q, b = torch.randn(9, 5, generator=g), torch.randn(5, 13, generator=g), torch.randn(13, generator=g)
    want = torch.addmm(b, p, q) if bias else p @ q
    torch.testing.assert_close(low_rank_expand(p, q, b if bias else None), want)


def test_autocast_to_the_activations_dtype_keeps_the_fused_node_and_its_result():
    x, w, b, a, bb = _inputs(torch.float32)
    x, w, b = (t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad) for t in (x, w, b))
    with torch.autocast("cpu", torch.bfloat16):
        fused = lora_linear(x, w, b, a, bb, 0.5)
        want = lora_linear_reference(x, w, b, a, bb, 0.5)
        other = lora_linear(x.float(), w, b, a, bb, 0.5)  # fp32 activations: autocast decides, plain formula
    assert type(fused.grad_fn).__name__ == "_LoraLinearBackward"
    assert type(other.grad_fn).__name__ != "_LoraLinearBackward"
    assert fused.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), want.float(), rtol=2e-2, atol=2e-2)
    ga = torch.autograd.grad(fused.float().sum(), a)[0]
    gw = torch.autograd.grad(want.float().sum(), a)[0]
    assert ga.dtype == torch.float32 and ((ga - gw).norm() / gw.norm()).item() < 2e-2
