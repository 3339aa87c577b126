"""lora_gemm: the frozen GEMM with the LoRA term as one more K block.

The Triton kernel itself runs under Triton's CPU interpreter in test_triton_interpret.py (the
rank_gemm_* and *_1gemm rows of benchmarks/check_kernels_gpu.py); on a Hopper GPU the same script
checks it in bf16. Here: the reference, the fallbacks, and the layouts the LoRA nodes hand it.
"""

import pytest
import torch

from peftkit.kernels import lora_gemm as lg
from peftkit.kernels.lora_linear import low_rank_grad, scaled_b


def _operands(w_kn: bool, m=9, k=12, n=10, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(*((k, n) if w_kn else (n, k)), generator=g, dtype=torch.float64)
    wide = torch.randn(m, r + 3, generator=g, dtype=torch.float64)
    q = torch.randn(*((r, n) if w_kn else (n, r)), generator=g, dtype=torch.float64)
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    return x, w, wide[:, 3:], q, bias


@pytest.mark.parametrize("w_kn", [False, True])
def test_reference_is_the_k_augmented_product(w_kn):
    """[x | p] [w | q]^T (nt) and [x | p] [w ; q] (nn): the rank block is just more K."""
    x, w, p, q, bias = _operands(w_kn)
    got = lg.rank_gemm_reference(x, w, p, q, bias, w_kn)
    xp = torch.cat([x, p], dim=1)
    want = xp @ torch.cat([w, q], dim=0) if w_kn else xp @ torch.cat([w, q], dim=1).t()
    torch.testing.assert_close(got, want + bias)


@pytest.mark.parametrize("w_kn", [False, True])
def test_cpu_falls_back_to_the_reference(w_kn):
    x, w, p, q, bias = _operands(w_kn)
    assert not lg.fits(x, w, p.shape[1], w_kn)
    assert torch.equal(lg.rank_gemm(x, w, p, q, bias, w_kn), lg.rank_gemm_reference(x, w, p, q, bias, w_kn))


def test_scaled_b_layouts_and_the_gradient_they_give():
    g = torch.Generator().manual_seed(1)
    b = torch.randn(10, 4, generator=g)                      # lora_B (out, r), float32 as trained
    grad = torch.randn(6, 10, generator=g, dtype=torch.bfloat16)
    out_major, rank_major = scaled_b(b, 0.5, torch.bfloat16, True), scaled_b(b, 0.5, torch.bfloat16, False)
    assert out_major.shape == (10, 4) and rank_major.shape == (4, 10)
    assert out_major.is_contiguous() and rank_major.is_contiguous() and out_major.dtype == torch.bfloat16
    torch.testing.assert_close(out_major.float(), (0.5 * b).bfloat16().float())
    assert torch.equal(out_major.t(), rank_major)
    torch.testing.assert_close(low_rank_grad(grad, out_major, True), low_rank_grad(grad, rank_major, False))


def test_fits_refuses_what_the_kernel_cannot_take():
    """Ranks off 16-byte column slices, narrow sides and strided inputs stay on the two-kernel path
    (checked with the size floor lowered, since CPU tensors are refused first)."""
    x = torch.randn(8, 4096)
    w = torch.randn(4096, 4096)
    assert not lg.fits(x, w, 16)  # CPU, no interpreter
    assert not lg._aligned(torch.randn(8, 30, dtype=torch.bfloat16))        # 60-byte rows
    assert lg._aligned(torch.randn(8, 32, dtype=torch.bfloat16))
    assert not lg._aligned(torch.randn(8, 32, dtype=torch.bfloat16)[:, 1:])  # base off 16 bytes
