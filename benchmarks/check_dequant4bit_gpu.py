"""Check the Triton 4-bit dequantization kernel against its PyTorch reference; time both.

    python benchmarks/check_dequant4bit_gpu.py                                  # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/check_dequant4bit_gpu.py --small --device cpu

For NF4 and FP4, with and without double quantization, in fp32, bf16 and fp16: the kernel's output
must equal the reference's bit for bit (both compute q * absmax in fp32 and round once), and the
double-quantized constants decoded on the device (bitsandbytes' dynamic 8-bit map: one gather, one
product, one sum) must equal their CPU decoding. It also checks a Linear4bit forward/backward
against the reference path, and that the checkpoint written by bitsandbytes in
tests/data/bnb4bit/tiny_llama_nf4 dequantizes on the device to bitsandbytes' own output; on CUDA it
prints median times.
Prints one line per case and "ALL OK" at the end; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from peftkit.kernels import dequant4bit
from peftkit.kernels.backend import use_triton
from peftkit.quant import nf4
from peftkit.quant.linear4bit import Linear4bit

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "bnb4bit")


def time_ms(fn, reps=20):
    if not torch.cuda.is_available():
        return float("nan")
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_dequant(shape, device, quant_type, double_quant, dtype) -> bool:
    w = torch.randn(shape, device=device)
    packed, state = nf4.quantize_4bit(w, quant_type, 64, double_quant)
    got = dequant4bit.dequantize_4bit_triton(packed, state, dtype)
    want = nf4.dequantize_4bit(packed, state, dtype)
    same = torch.equal(got, want) and torch.equal(nf4.absmax_of(state).cpu(), nf4.absmax_of(state.to("cpu")))
    t_fast = time_ms(lambda: dequant4bit.dequantize_4bit_triton(packed, state, dtype))
    t_ref = time_ms(lambda: nf4.dequantize_4bit(packed, state, dtype))
    print(f"dequant {quant_type} dq={int(double_quant)} {str(dtype):15s} {shape}: bit-identical={same} "
          f"triton {t_fast:.3f} ms, reference {t_ref:.3f} ms")
    return same


def check_linear(device, dtype) -> bool:
    layer = Linear4bit.from_linear(torch.nn.Linear(512, 384).to(device), dtype, "nf4", True)
    x = torch.randn(8, 512, device=device, dtype=dtype, requires_grad=True)
    out = layer(x)
    out.float().square().sum().backward()
    fast = (out.detach(), x.grad.clone())
    x.grad = None
    os.environ["PEFTKIT_KERNELS"] = "reference"
    out = layer(x)
    out.float().square().sum().backward()
    del os.environ["PEFTKIT_KERNELS"]
    same = torch.equal(fast[0], out.detach()) and torch.equal(fast[1], x.grad)
    print(f"Linear4bit {str(dtype):15s} forward+backward: triton path == reference path: {same}")
    return same


def check_bnb_checkpoint(device) -> bool:
    from safetensors.torch import load_file

    from peftkit.quant import load_quantized_model

    model = load_quantized_model(os.path.join(FIXTURE, "tiny_llama_nf4")).to(device)
    reference = load_file(os.path.join(FIXTURE, "tiny_llama_nf4_reference.safetensors"))
    same = all(torch.equal(dequant4bit.dequantize_4bit_triton(m.weight, m.quant_state(), torch.float16).cpu(),
                           reference[name]) for name, m in model.named_modules() if isinstance(m, Linear4bit))
    print(f"bitsandbytes checkpoint (nf4, double quant, fp16): triton == bitsandbytes: {same}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="small shapes (for the CPU interpreter)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    probe = torch.zeros(1, dtype=torch.uint8, device=args.device)
    if not use_triton(probe):
        print("the Triton path is not available here (no CUDA, no TRITON_INTERPRET=1, or no triton)")
        return 1
    shapes = [(33, 70), (128, 64), (7, 33)] if args.small else [(4096, 4096), (11008, 4096), (1000, 333), (7, 33)]
    # The interpreter rounds fp32 -> bf16 differently from torch, so on CPU only fp32 is compared
    # (as in check_kernels_gpu.py); on CUDA every dtype must match bit for bit.
    dtypes = [torch.float32] if args.device == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
    ok = all([check_dequant(s, args.device, qt, dq, dt) for s in shapes for qt in ("nf4", "fp4")
              for dq in (False, True) for dt in dtypes])
    ok = all([check_linear(args.device, dt) for dt in dtypes]) and ok
    ok = check_bnb_checkpoint(args.device) and ok
    print("ALL OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
