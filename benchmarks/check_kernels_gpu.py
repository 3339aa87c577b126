"""Check every Triton kernel against its PyTorch reference and a float64 truth; print a table.

    python benchmarks/check_kernels_gpu.py                      # on a CUDA machine, bf16 sizes
    TRITON_INTERPRET=1 python benchmarks/check_kernels_gpu.py --small --device cpu

For each op: rel = |out - truth| / |truth| (float64 truth from the same inputs), for the fused
path and for the reference in the working dtype; the fused path passes when its error is within
bf16 tolerance (2e-2) and no more than 2x the reference's (+1e-3). `same` is the fraction of
output elements bit-identical to the reference. Times are medians of CUDA-event timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from peftkit.kernels import cross_entropy as ce
from peftkit.kernels import lora_linear as ll
from peftkit.kernels import norm as rn
from peftkit.kernels import rope as rp
from peftkit.kernels import swiglu as sw
from peftkit.kernels.backend import use_triton

TOL = 2e-2


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_op(fn, inputs, grad_out_seed=0):
    """Forward, then backward with a fixed random cotangent; returns outputs and input grads."""
    ins = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*ins)
    gen = torch.Generator(device=out.device).manual_seed(grad_out_seed)
    cot = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32).to(out.dtype)
    wrt = [t for t in ins if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, cot)
    return [out.detach(), *grads]


def time_ms(fn, inputs, reps=20):
    if inputs[0].device.type != "cuda":
        return float("nan")
    ins = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*ins)
        out.backward(torch.ones_like(out)) if out.requires_grad else None
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def compare(name, fast, ref, inputs, truth_inputs, rows):
    got, want = run_op(fast, inputs), run_op(ref, inputs)
    truth = run_op(ref, truth_inputs)
    for i, (g, w, t) in enumerate(zip(got, want, truth)):
        part = "out" if i == 0 else f"grad{i}"
        e_fast, e_ref = rel(g, t), rel(w, t)
        ok = e_fast <= TOL and e_fast <= 2 * e_ref + 1e-3 and torch.isfinite(g).all().item()
        same = (g == w).float().mean().item()
        rows.append((f"{name}.{part}", e_fast, e_ref, same, ok))
    rows[-1] += (time_ms(fast, inputs), time_ms(ref, inputs))


def make(device, dtype, *shapes, grads=None, seed=0, scale=1.0):
    gen = torch.Generator(device=device).manual_seed(seed)
    grads = grads or [True] * len(shapes)
    return [(torch.randn(s, generator=gen, device=device) * scale).to(dtype).requires_grad_(g)
            for s, g in zip(shapes, grads)]


def as64(inputs):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]


def check_all(device, dtype, small):
    rows = []
    n, h, ffn, vocab = (37, 100, 50, 5000) if small else (8192, 4096, 14336, 128256)
    x, w = make(device, dtype, (n, h), (h,), grads=[True, False], seed=1)
    w = (w.float() * 0.1 + 1).to(dtype)
    compare("rms_norm", lambda a: rn.rms_norm(a, w, 1e-5), lambda a: rn.rms_norm_reference(a, w, 1e-5),
            [x], as64([x]), rows)
    g, u = make(device, dtype, (n, ffn), (n, ffn), seed=2, scale=2.0)
    compare("silu_mul", sw.silu_mul, sw.silu_mul_reference, [g, u], as64([g, u]), rows)
    check_rope(device, dtype, small, rows)
    check_loss(device, dtype, small, rows)
    check_lora(device, dtype, small, rows)
    return rows


def rope_tables(seq, dim, device, dtype, base=500000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    freqs = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * inv_freq  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[None]                                       # (1, S, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def check_rope(device, dtype, small, rows):
    b, s, hq, hk, d = (2, 5, 6, 2, 16) if small else (4, 1024, 32, 8, 128)
    q, k = make(device, dtype, (b, s, hq, d), (b, s, hk, d), seed=5)  # as the projections lay them out
    cos, sin = rope_tables(s, d, device, dtype)

    def flat(fn):
        def run(q, k):
            out = fn(q.transpose(1, 2), k.transpose(1, 2), cos.to(q.dtype), sin.to(q.dtype))
            return torch.cat([t.reshape(-1) for t in out])
        return run
    compare("rope", flat(rp.apply_rope), flat(rp.rope_reference), [q, k], as64([q, k]), rows)


def check_loss(device, dtype, small, rows):
    b, s, h, vocab = (2, 9, 16, 5000) if small else (4, 1024, 4096, 128256)
    hidden, weight = make(device, dtype, (b, s, h), (vocab, h), grads=[True, False], seed=3)
    weight = (weight.float() * 0.05).to(dtype)
    labels = torch.randint(0, vocab, (b, s), device=device)
    labels[:, :3] = -100
    fast = lambda a: ce.fused_causal_lm_loss(a, weight, labels, chunk=7 if small else 2048)  # noqa: E731
    ref = lambda a: ce.causal_lm_loss_reference(a, weight.to(a.dtype), labels)  # noqa: E731
    compare("causal_lm_loss", fast, ref, [hidden], as64([hidden]), rows)


def check_lora(device, dtype, small, rows):
    n, fin, fout, r = (24, 40, 30, 4) if small else (8192, 4096, 4096, 16)
    x, w, a, bb = make(device, dtype, (n, fin), (fout, fin), (r, fin), (fout, r),
                       grads=[True, False, True, True], seed=4, scale=0.05)
    fast = lambda x, a, bb: ll.lora_linear(x, w, None, a, bb, 1.0)  # noqa: E731
    ref = lambda x, a, bb: ll.lora_linear_reference(x, w.to(x.dtype), None, a, bb, 1.0)  # noqa: E731
    compare("lora_linear", fast, ref, [x, a, bb], as64([x, a, bb]), rows)


def print_table(rows, device):
    print(f"\nkernel check on {device} (fused = {'triton' if use_triton(torch.empty(1, device=device)) else 'reference'})")
    print(f"{'op':26} {'rel fused':>10} {'rel ref':>10} {'bit-same':>9} {'ok':>4} {'fused ms':>9} {'ref ms':>8}")
    for row in rows:
        name, e_fast, e_ref, same, ok = row[:5]
        times = f"{row[5]:9.3f} {row[6]:8.3f}" if len(row) > 5 else ""
        print(f"{name:26} {e_fast:10.2e} {e_ref:10.2e} {same:9.3f} {'yes' if ok else 'NO':>4} {times}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (for the CPU interpreter)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    rows = check_all(args.device, getattr(torch, args.dtype), args.small)
    print_table(rows, args.device)
    sys.exit(0 if all(r[4] for r in rows) else 1)


if __name__ == "__main__":
    main()
