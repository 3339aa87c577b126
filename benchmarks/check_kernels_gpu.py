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
import contextlib
import statistics
import sys

import torch

from peftkit.kernels import cross_entropy as ce
from peftkit.kernels import lora_gemm as lg
from peftkit.kernels import lora_linear as ll
from peftkit.kernels import lora_shared as ls
from peftkit.kernels import norm as rn
from peftkit.kernels import rope as rp
from peftkit.kernels import swiglu as sw
from peftkit.kernels.backend import use_triton
from peftkit.quant import nf4

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
    grads = torch.autograd.grad(out, wrt, cot) if wrt else []
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


def compare(name, fast, ref, inputs, truth_inputs, rows, forced=False):
    """forced: the fast path runs with the size floors of lora_gemm and low_rank_grads at 0, forward and
    backward (both decide again in backward)."""
    with ll.size_floors(0, 0) if forced else contextlib.nullcontext():
        got = run_op(fast, inputs)
    want = run_op(ref, inputs)
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
    check_expand(device, dtype, small, rows)
    check_rank_gemm(device, dtype, small, rows)
    check_low_rank_grads(device, dtype, small, rows)
    check_lora(device, dtype, small, rows)
    check_lora_shared(device, dtype, small, rows)
    check_fast_launch(device, dtype, rows)
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


def check_expand(device, dtype, small, rows):
    n, fout, r = (37, 30, 5) if small else (8192, 4096, 16)
    p, q, bias = make(device, dtype, (n, r), (r, fout), (fout,), grads=[False] * 3, seed=6)
    compare("low_rank_expand", lambda p, q, b: ll.low_rank_expand(p, q, b),
            lambda p, q, b: torch.addmm(b, p, q), [p, q, bias], as64([p, q, bias]), rows)


def check_fast_launch(device, dtype, rows):
    """launch.Kernel's repeat launches against Triton's own path (kernel.fn[grid]): bit-identical
    outputs, the fast path taken, and an input that Triton specialises differently (a misaligned
    column slice, another constexpr) sent back through Triton. CUDA only: elsewhere Triton's path
    is the only one."""
    if device != "cuda":
        return
    from peftkit.kernels import triton_kernels as tk

    n, h, r = 300, 1024, 16
    x, w = make(device, dtype, (n, h), (h,), grads=[False, False], seed=11)
    wide, q = make(device, dtype, (n, r + 3), (r, h), grads=[False, False], seed=12)

    def norm_args():
        return (x, w, torch.empty_like(x), torch.empty(n, device=device), h, 1e-5), dict(BLOCK=h)

    def expand_args(p, block_r=16):
        return ((p, q, p, torch.empty(n, h, device=device, dtype=dtype), n, h, r, p.stride(0)),
                dict(HAS_BIAS=False, PRECISION="tf32", BLOCK_M=64, BLOCK_N=128, BLOCK_R=block_r, num_warps=4))

    cases = [("rms_norm_fwd", tk.rms_norm_fwd, (n,), norm_args, 2),
             ("expand_aligned", tk.low_rank_expand, (5, 8), lambda: expand_args(wide[:, :r]), 3),
             ("expand_misaligned", tk.low_rank_expand, (5, 8), lambda: expand_args(wide[:, 3:]), 3),
             ("expand_block_r32", tk.low_rank_expand, (5, 8), lambda: expand_args(wide[:, :r], 32), 3)]
    for name, kern, grid, build, out in cases:
        args, kwargs = build()
        kern.fn[grid](*args, **kwargs)
        want = args[out].clone()
        args, kwargs = build()
        before, compiled_before = kern.fast_launches, len(kern.compiled)
        for _ in range(3):  # the first may take Triton's path (a new specialisation)
            args[out].zero_()
            kern[grid](*args, **kwargs)
        new_keys = len(kern.compiled) - compiled_before
        fast = kern.fast_launches - before
        same = (args[out] == want).float().mean().item()
        ok = same == 1.0 and fast >= 2 and new_keys <= 1
        rows.append((f"fast_launch.{name}", 0.0, 0.0, same, ok))
        print(f"fast_launch.{name}: {fast} of 3 launches fast, {new_keys} new specialisation(s)")
    check_fast_rank_gemm(device, dtype, rows)


def check_fast_rank_gemm(device, dtype, rows):
    """rank_gemm through launch.Kernel's direct call of the launcher's entry point (with the global
    scratch its device-side TMA descriptors need) against Triton's own path: bit-identical, forward
    and dx forms. Hopper only (lg.fits)."""
    from unittest import mock

    from peftkit.kernels import launch
    from peftkit.kernels import triton_kernels as tk

    x, w, xa, bs = make(device, dtype, (512, 2048), (2048, 2048), (512, 16), (2048, 16), grads=[False] * 4, seed=13)
    if not lg.fits(x, w, 16):
        return
    for name, args, kwargs in (("forward", (x, w, xa, bs), {}), ("dx", (x, w, xa, bs.t().contiguous()),
                                                                   dict(w_kn=True))):
        with mock.patch.object(launch, "FAST", False):
            want = lg.launch(*args, **kwargs)
        before = tk.rank_gemm.fast_launches
        got = [lg.launch(*args, **kwargs) for _ in range(3)]
        fast = tk.rank_gemm.fast_launches - before
        same = min((g == want).float().mean().item() for g in got)
        rows.append((f"fast_launch.rank_gemm_{name}", 0.0, 0.0, same, same == 1.0 and fast >= 2))
        print(f"fast_launch.rank_gemm_{name}: {fast} of 3 launches fast")


def check_rank_gemm(device, dtype, small, rows):
    """x W^T + p q^T and x W + p q in one GEMM: p a column slice (offset 16) of a wider xa, bias on the
    first; rank 48 runs a 64-wide K block read past its end as zeros."""
    m, k, n = (40, 72, 48) if small else (8192, 2048, 2048)
    for w_kn, r, bias in ((False, 16, True), (True, 48, False)):
        x, w, pw, q, b = make(device, dtype, (m, k), (k, n) if w_kn else (n, k), (m, r + 16),
                              (r, n) if w_kn else (n, r), (n,), grads=[False] * 5, seed=7, scale=0.1)
        b = b if bias else None

        def fast(x, w, pw, q, w_kn=w_kn, b=b):
            return lg.rank_gemm(x, w, pw[:, 16:], q, b, w_kn)

        def ref(x, w, pw, q, w_kn=w_kn, b=b):
            return lg.rank_gemm_reference(x, w, pw[:, 16:], q, None if b is None else b.to(x.dtype), w_kn)
        compare(f"rank_gemm_{'nn' if w_kn else 'nt'}_r{r}", fast, ref, [x, w, pw, q], as64([x, w, pw, q]), rows,
                forced=True)


def check_low_rank_grads(device, dtype, small, rows):
    """gb = g (s B) and dB = s g^T xa from one pass over g (forced at any width), xa a column slice,
    s B in both layouts; out = gb and dB flattened into one tensor."""
    n, out, r = (40, 48, 8) if small else (8192, 8192, 16)
    g, bs, xw = make(device, dtype, (n, out), (out, r), (n, r + 16), grads=[False] * 3, seed=11, scale=0.1)
    for out_major in (True, False):
        def fast(g, bs, xw, out_major=out_major):
            b = bs if out_major else bs.t().contiguous()
            gb, db = ll.low_rank_grads(g, b, out_major, xw[:, 16:], 0.5, torch.float32)
            return torch.cat([gb.flatten().float(), db.flatten()])

        def ref(g, bs, xw):
            return torch.cat([(g @ bs).flatten().float(), (0.5 * g.t() @ xw[:, 16:]).flatten().float()])
        compare(f"low_rank_grads_{'out' if out_major else 'rank'}_major", fast, ref, [g, bs, xw], as64([g, bs, xw]),
                rows, forced=True)


def bench_expand(device):
    """Write bandwidth of the rank-16 expand, cuBLAS vs the Triton kernel per tile shape."""
    print("\nlow_rank_expand (8192 x 16) @ (16 x out), bf16, GB/s written (median of 50)")
    configs = [(128, 128, 4), (64, 256, 4), (128, 256, 8), (256, 128, 8), (64, 128, 4)]
    print(f"{'out':>6} {'cublas':>8} " + " ".join(f"{bm}x{bn}/w{w}".rjust(12) for bm, bn, w in configs))
    saved = ll._EXPAND_BLOCK, ll._EXPAND_WARPS
    for fout in (512, 2048, 8192, 14336):
        p, q = make(device, torch.bfloat16, (8192, 16), (16, fout), grads=[False, False], seed=7)
        gbs = lambda ms: 8192 * fout * 2 / ms / 1e6  # noqa: E731
        cells = [gbs(bench_ms(lambda: p @ q))]
        for bm, bn, w in configs:
            ll._EXPAND_BLOCK, ll._EXPAND_WARPS = (bm, bn), w
            cells.append(gbs(bench_ms(lambda: ll.low_rank_expand(p, q))))
        print(f"{fout:6d} " + " ".join(f"{c:8.0f}" if i == 0 else f"{c:12.0f}" for i, c in enumerate(cells)))
    ll._EXPAND_BLOCK, ll._EXPAND_WARPS = saved


def bench_ms(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_cost(device, reps=300):
    """Host microseconds per forward+backward of one small layer: lora_linear vs a frozen linear."""
    import time
    x = torch.randn(64, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    a = torch.randn(16, 256, device=device, requires_grad=True)
    bb = torch.randn(256, 16, device=device, requires_grad=True)
    cases = {"frozen linear": lambda: torch.nn.functional.linear(x, w),
             "lora_linear": lambda: ll.lora_linear(x, w, None, a, bb, 1.0),
             "lora reference": lambda: ll.lora_linear_reference(x, w, None, a.to(x.dtype), bb.to(x.dtype), 1.0)}
    print("\nhost cost per forward+backward (us), GPU work negligible")
    for name, fn in cases.items():
        for i in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn().sum().backward()
            torch.cuda.synchronize()
        print(f"  {name:15} {(time.perf_counter() - t0) / reps * 1e6:7.1f}")


def check_lora(device, dtype, small, rows):
    n, fin, fout, r = (24, 40, 30, 4) if small else (8192, 4096, 4096, 16)
    x, w, a, bb = make(device, dtype, (n, fin), (fout, fin), (r, fin), (fout, r),
                       grads=[True, False, True, True], seed=4, scale=0.05)
    fast = lambda x, a, bb: ll.lora_linear(x, w, None, a, bb, 1.0)  # noqa: E731
    ref = lambda x, a, bb: ll.lora_linear_reference(x, w.to(x.dtype), None, a, bb, 1.0)  # noqa: E731
    compare("lora_linear", fast, ref, [x, a, bb], as64([x, a, bb]), rows)
    a32, bb32 = (t.detach().float().requires_grad_() for t in (a, bb))  # float32 adapter, as trained
    ref32 = lambda x, a, bb: ll.lora_linear_reference(x, w.to(x.dtype), None, a.to(x.dtype), bb.to(x.dtype), 1.0)  # noqa: E731
    compare("lora_fp32_adapter", fast, ref32, [x, a32, bb32], as64([x, a32, bb32]), rows)
    # the one-GEMM path (lora_gemm) at any size, scaling 2 and a bias
    n, fin, fout, r = (24, 40, 32, 8) if small else (1000, 2048, 512, 16)
    x, w, b, a, bb = make(device, dtype, (n, fin), (fout, fin), (fout,), (r, fin), (fout, r),
                          grads=[True, False, False, True, True], seed=5, scale=0.05)
    fast = lambda x, a, bb: ll.lora_linear(x, w, b, a, bb, 2.0)  # noqa: E731
    ref = lambda x, a, bb: ll.lora_linear_reference(x, w.to(x.dtype), b.to(x.dtype), a.to(x.dtype), bb.to(x.dtype), 2.0)  # noqa: E731
    a32, bb32 = (t.detach().float().requires_grad_() for t in (a, bb))
    compare("lora_linear_1gemm", fast, ref, [x, a32, bb32], as64([x, a32, bb32]), rows, forced=True)
    # the same over a 4-bit (NF4, double-quantized) base: W is rebuilt and handed to the one GEMM
    packed, state = nf4.quantize_4bit(w.float(), "nf4", 64, double_quant=True)
    w4 = nf4.dequantize_4bit(packed, state, dtype)
    fast = lambda x, a, bb: ll.lora_linear(x, packed, b, a, bb, 2.0, state)  # noqa: E731
    ref = lambda x, a, bb: ll.lora_linear_reference(x, w4.to(x.dtype), b.to(x.dtype), a.to(x.dtype), bb.to(x.dtype), 2.0)  # noqa: E731
    compare("lora_nf4_1gemm", fast, ref, [x, a32, bb32], as64([x, a32, bb32]), rows, forced=True)


def check_lora_shared(device, dtype, small, rows):
    """q, k, v as one node (float32 adapters, as trained), outputs flattened into one tensor; then the
    same with the one-GEMM path at every size (rank 8 each: a 24-wide rank block for dx)."""
    for name, r, forced in (("lora_shared_qkv", 4 if small else 16, False), ("lora_shared_1gemm", 8, True)):
        n, fin, outs = (24, 40, (32, 16, 16) if forced else (30, 12, 12)) if small else (8192, 2048, (2048, 512, 512))
        x, *ws = make(device, dtype, (n, fin), *[(o, fin) for o in outs], grads=[True] + [False] * 3, seed=8,
                      scale=0.05)
        ab = make(device, torch.float32, *[s for o in outs for s in ((r, fin), (o, r))], seed=9, scale=0.05)

        def run(fn, cast, ws=ws):
            def go(x, *ab):
                layers = [(w.to(x.dtype), None, cast(a, x), cast(b, x), 0.5 + i) for i, (w, a, b) in
                          enumerate(zip(ws, ab[0::2], ab[1::2]))]
                return torch.cat([y.reshape(-1) for y in fn(x, layers)])
            return go
        fast = run(ls.lora_linears_shared, lambda t, x: t)
        ref = run(ls.lora_linears_shared_reference, lambda t, x: t.to(x.dtype))
        compare(name, fast, ref, [x, *ab], as64([x, *ab]), rows, forced=forced)


def bench_shared(device):
    """fwd+bwd ms of the 1B q,k,v and gate,up groups: n lora_linear calls vs one shared node."""
    print("\nshared-input LoRA groups, 1B shapes, N=8192, r=16, bf16 / fp32 adapters (median ms fwd+bwd)")
    for name, outs in (("qkv", (2048, 512, 512)), ("gate_up", (8192, 8192))):
        x = torch.randn(8192, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
        layers = [(torch.randn(o, 2048, device=device, dtype=torch.bfloat16) * 0.02, None,
                   (torch.randn(16, 2048, device=device) * 0.02).requires_grad_(),
                   (torch.randn(o, 16, device=device) * 0.02).requires_grad_(), 1.0) for o in outs]
        cot = [torch.randn(8192, o, device=device, dtype=torch.bfloat16) for o in outs]

        def step(fn):
            ys = fn(x, layers)
            torch.autograd.backward(ys, cot)
        sep = bench_ms(lambda: step(lambda x, ls_: [ll.lora_linear(x, *layer) for layer in ls_]))
        shared = bench_ms(lambda: step(ls.lora_linears_shared))
        frozen = bench_ms(lambda: torch.autograd.backward([x @ w.t() for w, *_ in layers], cot))
        print(f"  {name:8} separate {sep:7.3f}  shared {shared:7.3f}  (saved {sep - shared:6.3f})  frozen {frozen:7.3f}")


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
    parser.add_argument("--bench", action="store_true", help="also time the expand tiles and host costs")
    args = parser.parse_args()
    rows = check_all(args.device, getattr(torch, args.dtype), args.small)
    if args.bench:
        bench_expand(args.device)
        bench_shared(args.device)
        host_cost(args.device)
    print_table(rows, args.device)
    sys.exit(0 if all(r[4] for r in rows) else 1)


if __name__ == "__main__":
    main()
