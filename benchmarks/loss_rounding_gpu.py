"""Why the one-GEMM LoRA path's loss curve sits below HF PEFT's: a float32 twin as the judge.

    PYTHONPATH=src python3 benchmarks/loss_rounding_gpu.py [--steps 6]

The 1B model of train_throughput.py (bf16 weights), LoRA r=16 on all seven projections, the same
adapter start and batch, AdamW lr 1e-3, per-step losses of:

  hf_peft          HF PEFT in bf16
  peftkit          the package's path: on Hopper the LoRA term is a K block of the base GEMM,
                   so y = bf16(x W^T + xa (s B)^T) is rounded once
  fwd_two_kernel   peftkit with the forward left to low_rank_expand + addmm_ (beta=1), dx as above
  two_kernel       peftkit with both left to the two-kernel path
  float32          the same bf16 weights cast (exactly) to float32, adapters and activations float32

After the first AdamW step every entry of B is about +-lr, so the LoRA term is near half a bf16
step of the base output; a path that drops part of it at rounding moves the loss less. Prints each
curve and its relative difference from the float32 twin.
"""

from __future__ import annotations

import argparse

import torch

import train_throughput as tt
from peftkit.kernels import lora_gemm


def curve(name: str, steps: int, start: dict | None):
    """Per-step losses of one contender from `start` (None: keep its own start); returns (losses, start)."""
    fits = lora_gemm.fits
    if name in ("fwd_two_kernel", "two_kernel"):
        keep_dx = name == "fwd_two_kernel"
        lora_gemm.fits = lambda x, w, r, w_kn=False: keep_dx and w_kn and fits(x, w, r, w_kn)
    try:
        if name == "float32":
            import peftkit

            model = peftkit.get_peft_model(tt.build_model("1b").float(), peftkit.LoraConfig(**tt.lora_kwargs()))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
            batch = tt.make_batch("1b")
            losses = [tt.train_step(model, opt, batch).item() for _ in range(steps)]
            del model, opt
            tt.free_memory()
            return losses, start
        contender = "hf_peft" if name == "hf_peft" else "peftkit"
        return tt.loss_curve(contender, "1b", steps, 1e-3, start)
    finally:
        lora_gemm.fits = fits


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    steps = parser.parse_args().steps
    hf, start = curve("hf_peft", steps, None)
    curves = {"hf_peft": hf}
    for name in ("peftkit", "fwd_two_kernel", "two_kernel", "float32"):
        curves[name] = curve(name, steps, start)[0]
    truth = curves["float32"]
    print(f"{'step':>4} " + " ".join(f"{n:>15}" for n in curves) + "   (relative difference from float32)")
    for i in range(steps):
        cells = [f"{c[i]:9.5f} {abs(c[i] - truth[i]) / truth[i]:5.0e}" if n != "float32" else f"{c[i]:15.5f}"
                 for n, c in curves.items()]
        print(f"{i:>4} " + " ".join(f"{cell:>15}" for cell in cells))


if __name__ == "__main__":
    main()
