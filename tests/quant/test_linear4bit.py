"""Linear4bit: 4-bit storage, forward/backward against a direct dequantize-then-matmul, the Triton twin."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit.quant import Linear4bit, nf4

ROOT = Path(__file__).resolve().parents[2]


def make(double_quant=True, bias=True, compute_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(70, 33, bias=bias)  # 2310 weights: not a multiple of the block
    return dense, Linear4bit.from_linear(dense, compute_dtype, "nf4", double_quant)


def test_weight_is_stored_as_packed_4bit_codes():
    dense, layer = make()
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 70 * 33 // 2
    assert not layer.weight.requires_grad
    stored = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    full = sum(t.numel() * t.element_size() for t in dense.parameters())
    assert stored < full / 6  # fp32 weight 9240 bytes; codes 1155 + uint8 absmax 37 + constants + bias 132


@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_and_input_gradient_equal_dequantize_then_linear(double_quant):
    dense, layer = make(double_quant)
    w = nf4.dequantize_4bit(layer.weight, layer.quant_state(), torch.float32)
    x = torch.randn(4, 5, 70, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, F.linear(x, w, dense.bias))
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    assert torch.equal(dx, g @ w)
    assert (w - dense.weight).abs().max() < 0.2 * dense.weight.abs().max()


def test_backward_keeps_no_full_size_weight():
    _, layer = make()
    x = torch.randn(3, 70, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert not any(t.is_floating_point() and t.numel() >= 33 * 70 for t in saved)


def test_compute_dtype_bf16_and_output_in_input_dtype():
    dense, layer = make(compute_dtype=torch.bfloat16)
    x = torch.randn(2, 70)
    out = layer(x)
    assert out.dtype == torch.float32
    w = layer.dequantize()
    assert w.dtype == torch.bfloat16
    expected = (F.linear(x.bfloat16(), w) + dense.bias.detach().bfloat16()).float()
    assert torch.equal(out, expected)


def test_conv1d_to_linear_requantize_and_restore():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(12, 8)  # weight (in=8, out=12)
    layer = Linear4bit.from_linear(conv)
    x = torch.randn(3, 8)
    plain = layer.to_linear()
    assert isinstance(plain, nn.Linear) and torch.equal(plain(x), layer(x))
    torch.testing.assert_close(layer(x), conv(x), atol=0.1, rtol=0.1)
    saved = layer.quantized_tensors()
    layer.requantize(torch.randn(12, 8))
    assert not torch.equal(layer.weight, saved["weight"])
    layer.restore(saved)
    assert torch.equal(layer(x), plain(x))
    with pytest.raises(ValueError, match="does not fit"):
        layer.requantize(torch.randn(8, 12))


def test_state_dict_round_trip_and_device_move():
    _, layer = make()
    _, other = make(seed=5)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 70)
    assert torch.equal(other(x), layer(x))
    assert set(layer.state_dict()) == {"weight", "bias", "absmax", "nested_absmax", "nested_offset"}
    assert torch.equal(layer.to("cpu")(x), other(x))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_dequant_kernel_matches_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    script = ROOT / "benchmarks" / "check_dequant4bit_gpu.py"
    proc = subprocess.run([sys.executable, str(script), "--small", "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout and "bit-identical=True" in proc.stdout
