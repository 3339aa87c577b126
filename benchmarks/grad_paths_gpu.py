"""Adapter gradients of one 1B step under each LoRA path, against a float32 run of the same model.

    PYTHONPATH=src python3 benchmarks/grad_paths_gpu.py

Diagnostic for run 11's loss curves: the one-GEMM path (lora_gemm) ends each 20-step loss check
~1e-3 below HF PEFT, with the gap opening at the first step, while the two-kernel path tracks HF
to 2e-4. Takes one batch, a LoRA B set to small random values (so that dA is not zero), and prints
for each path the relative error of all dA and dB against the float32 model's, and the fraction of
dB entries whose sign differs from float32's (AdamW's first step moves every entry by lr * sign).
"""

from __future__ import annotations

import torch

import train_throughput as tt
from peftkit.kernels import lora_gemm


def grads(dtype, one_gemm: bool, b_scale: float) -> dict:
    import peftkit
    from peftkit.kernels import patch_model

    model = tt.build_model("1b").to(dtype)
    model = peftkit.get_peft_model(model, peftkit.LoraConfig(**tt.lora_kwargs()))
    patch_model(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * b_scale)
    saved = lora_gemm.MIN_SIDE
    lora_gemm.MIN_SIDE = saved if one_gemm else 1 << 62
    try:
        model(**tt.make_batch("1b")).loss.backward()
    finally:
        lora_gemm.MIN_SIDE = saved
    out = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    del model
    tt.free_memory()
    return out


def main():
    for b_scale in (0.0, 1e-3):
        truth = grads(torch.float32, False, b_scale)
        print(f"\nlora_B ~ N(0, {b_scale}^2); errors against the float32 model")
        for label, one in (("two-kernel", False), ("one GEMM", True)):
            got = grads(torch.bfloat16, one, b_scale)
            for kind in ("lora_A", "lora_B"):
                names = [n for n in truth if kind in n]
                t = torch.cat([truth[n].flatten() for n in names])
                g = torch.cat([got[n].flatten() for n in names])
                rel = ((g - t).norm() / t.norm().clamp_min(1e-30)).item()
                flips = ((g.sign() != t.sign()) & (t != 0)).float().mean().item()
                print(f"  {label:10} d{kind[-1]}: rel err {rel:.2e}, sign differs on {flips:.2%}")


if __name__ == "__main__":
    main()
