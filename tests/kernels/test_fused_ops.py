"""Reference ops and the fused causal-LM loss against direct float64 computations (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from peftkit.kernels import (apply_rope, causal_lm_loss_reference, fused_causal_lm_loss, rms_norm,
                             rms_norm_reference, rope_reference, silu_mul, silu_mul_reference)
from peftkit.kernels.cross_entropy import cross_entropy_rows_reference


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_rms_norm_reference_is_the_llama_formula():
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    want = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), want)
    torch.testing.assert_close(rms_norm_reference(x, w, 1e-6), want)


def test_silu_mul_reference_is_swiglu():
    torch.manual_seed(0)
    g, u = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(silu_mul(g, u), g / (1 + torch.exp(-g)) * u)
    torch.testing.assert_close(silu_mul_reference(g, u), g / (1 + torch.exp(-g)) * u)


def test_rope_reference_is_transformers_rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    for got, want in zip(rope_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _loss_inputs(dtype, b=2, s=7, h=12, v=19, ignore=(0, 3)):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(b, s, h, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (b, s), generator=gen)
    labels[:, list(ignore)] = -100
    return hidden, weight, labels


def test_cross_entropy_rows_reference_matches_formula():
    z = torch.randn(6, 11, dtype=torch.float64)
    labels = torch.tensor([0, 3, -100, 10, 5, -100])
    work = z.clone()
    loss = cross_entropy_rows_reference(work, labels)
    want = F.cross_entropy(z, labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(loss, want)
    zz = z.clone().requires_grad_()
    F.cross_entropy(zz, labels, ignore_index=-100, reduction="sum").backward()
    torch.testing.assert_close(work, zz.grad)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_loss_gradcheck_float64(chunk):
    hidden, weight, labels = _loss_inputs(torch.float64, s=5, h=6, v=7, ignore=(1,))
    fn = lambda h, w: fused_causal_lm_loss(h, w, labels, chunk=chunk)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("num_items", [None, 9])
def test_fused_loss_matches_transformers_loss(num_items):
    hidden, weight, labels = _loss_inputs(torch.float64)
    got = fused_causal_lm_loss(hidden, weight, labels, chunk=4, num_items_in_batch=num_items)
    want = causal_lm_loss_reference(hidden, weight, labels, num_items_in_batch=num_items)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, (hidden, weight))
    g_want = torch.autograd.grad(want, (hidden, weight))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_fused_loss_bf16_close_to_float64():
    hidden, weight, labels = _loss_inputs(torch.bfloat16, b=2, s=64, h=64, v=1000)
    loss = fused_causal_lm_loss(hidden, weight.detach(), labels, chunk=48)
    (dh,) = torch.autograd.grad(loss, hidden)
    h64 = hidden.detach().double().requires_grad_()
    want = causal_lm_loss_reference(h64, weight.detach().double(), labels)
    (dh64,) = torch.autograd.grad(want, h64)
    assert abs(loss.item() - want.item()) / want.item() < 1e-2
    assert _rel(dh, dh64) < 1e-2


def test_fused_loss_under_autocast_runs_the_head_in_the_autocast_dtype():
    """fp32 hidden states and head under bf16 autocast (patch_model on an fp32 model, a trained lm_head):
    the head's matmuls run in bf16 as the model's own lm_head would, and the gradients come back in fp32."""
    hidden, weight, labels = _loss_inputs(torch.float32, b=2, s=32, h=64, v=500)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_causal_lm_loss(hidden, weight, labels, chunk=24)
        want = causal_lm_loss_reference(hidden, weight, labels)  # its F.linear autocasts to bf16
    g_got, g_want = torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g_got)
    assert abs(got.item() - want.item()) / want.item() < 1e-2
    assert all(_rel(a, b) < 2e-2 for a, b in zip(g_got, g_want))


def test_fused_loss_without_grad_builds_no_gradient():
    hidden, weight, labels = _loss_inputs(torch.float32)
    with torch.no_grad():
        loss = fused_causal_lm_loss(hidden, weight, labels, chunk=3)
    torch.testing.assert_close(loss, causal_lm_loss_reference(hidden, weight, labels).detach())
