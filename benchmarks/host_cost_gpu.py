"""Host (Python + dispatch) cost of an eager training step, and where it goes.

    PYTHONPATH=src python benchmarks/host_cost_gpu.py [--shape 1b] [--batch 1x64] [--contenders ...]

With a tiny batch the GPU finishes each kernel before the host has issued the next, so the wall
time of an eager step is the host's time to issue it. That is what bounds the eager 1B step on a
slow host (benchmarks/NOTES.md, run 11). Printed:

  1. per LoRA node: host and wall us per forward + backward of lora_linear / lora_linears_shared
     against a frozen F.linear on the 1B shapes, and of each piece a node issues (host: the time
     to issue; wall: with the wait for the GPU, which a tiny batch keeps small but not nil)
  2. the factor casts alone, host us per forward pass for every factor of the shape: kept copies
     written into the last pass's buffer, into a new one, or a fresh cast per call (cast_pass_costs)
  3. cProfile of two peftkit steps: the Python functions with the most own and total time
  4. per contender: host ms per eager step (tiny batch); frozen and peftkit also with Triton's own
     launch path instead of launch.Kernel's (kernels/launch.py), and peftkit with its factors cast
     per call instead of once per pass (kernels/adapter_casts.py)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from unittest import mock

import torch

import train_throughput as tt


def host_ms_per_step(contender: str, shape: str, batch_shape: tuple[int, int], steps: int, profile: bool) -> float:
    model, opt = tt.prepare(contender, tt.build_model(shape), checkpointing=False)
    batch = tiny_batch(shape, batch_shape)
    for _ in range(3):
        tt.train_step(model, opt, batch)
    times = []
    for _ in range(3):  # best of three blocks: the host's own noise
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            tt.train_step(model, opt, batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps * 1e3)
    result = min(times)
    if contender == "peftkit" and profile:
        profile_python(model, opt, batch)
    del model, opt
    tt.free_memory()
    return result


def tiny_batch(shape: str, batch_shape: tuple[int, int]) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, tt.SHAPES[shape]["vocab_size"], batch_shape, device="cuda", generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def profile_python(model, opt, batch, rows: int = 45) -> None:
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(2):
        tt.train_step(model, opt, batch)
    torch.cuda.synchronize()
    prof.disable()
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(rows)
        print(f"\ncProfile of 2 peftkit steps, by {key}:\n" + "\n".join(out.getvalue().splitlines()[4:]), flush=True)


def host_us(fn, reps: int = 300) -> tuple[float, float]:
    """(host, wall) microseconds per call of fn(), medians over blocks of 50 calls: host is the time
    to issue the block (the launch queue holds it without blocking), wall adds the wait for the GPU."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(reps // 50):
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) / 50 * 1e6)
        wall.append((time.perf_counter() - t0) / 50 * 1e6)
    return statistics.median(host), statistics.median(wall)


def launch_path(fast: bool):
    """Within: our Triton kernels launch through launch.Kernel's fast path (True) or Triton's own."""
    from peftkit.kernels import launch

    return mock.patch.object(launch, "FAST", fast and launch.FAST)


def kept_casts(enabled: bool):
    """Within: LoRA factors cast once per forward pass (adapter_casts) or per call."""
    from peftkit.kernels import adapter_casts

    return mock.patch.object(adapter_casts, "ENABLED", enabled)


def node_costs(rows: int) -> None:
    from peftkit.kernels import lora_gemm, lora_linear, lora_shared
    from peftkit.kernels import triton_kernels as tk  # noqa: F401 - compiled on first use below

    dev, bf = "cuda", torch.bfloat16
    print(f"\nper-node host cost, x ({rows}, in) bf16, adapters float32, r 16 (us per call, median)")
    print(f"{'piece':52s} {'host us':>8s} {'wall us':>8s}")

    def row(name, fn):
        host, wall = host_us(fn)
        print(f"{name:52s} {host:8.1f} {wall:8.1f}", flush=True)

    for inp, out in ((2048, 2048), (8192, 2048), (2048, 8192)):
        w = torch.randn(out, inp, device=dev, dtype=bf) * 0.02
        a = torch.randn(16, inp, device=dev, requires_grad=True)
        b = torch.randn(out, 16, device=dev, requires_grad=True)
        x = torch.randn(rows, inp, device=dev, dtype=bf, requires_grad=True)
        g = torch.randn(rows, out, device=dev, dtype=bf)

        def frozen():
            torch.nn.functional.linear(x, w).backward(g)

        def fused():
            lora_linear.lora_linear(x, w, None, a, b, 1.0).backward(g)

        def fused_fwd():
            with torch.no_grad():
                lora_linear.lora_linear(x, w, None, a, b, 1.0)

        row(f"F.linear fwd+bwd {inp}->{out} (frozen)", frozen)
        row(f"lora_linear fwd+bwd {inp}->{out}", fused)
        row(f"lora_linear fwd only (no_grad) {inp}->{out}", fused_fwd)

    # the pieces of one node, at 2048 -> 8192 (gate/up: one-GEMM forward, one-pass gb/dB)
    inp, out = 2048, 8192
    w = torch.randn(out, inp, device=dev, dtype=bf) * 0.02
    a32 = torch.randn(16, inp, device=dev)
    b32 = torch.randn(out, 16, device=dev)
    x = torch.randn(rows, inp, device=dev, dtype=bf)
    g = torch.randn(rows, out, device=dev, dtype=bf)
    a = a32.to(bf)
    xa = x @ a.t()
    bs = lora_linear.scaled_b(b32, 1.0, bf, True)
    gb = g @ bs
    row("A.to(bf16)", lambda: a32.to(bf))
    row("x @ A.t()", lambda: x @ a.t())
    row("scaled_b (empty + mul)", lambda: lora_linear.scaled_b(b32, 1.0, bf, True))
    row("lora_gemm.fits", lambda: lora_gemm.fits(x, w, 16))
    row("lora_gemm.launch forward (Triton)", lambda: lora_gemm.launch(x, w, xa, bs))
    row("lora_gemm.launch dx (Triton)", lambda: lora_gemm.launch(g, w, gb, a, w_kn=True))
    row("low_rank_grads one pass (Triton + 2 sums)", lambda: lora_linear.low_rank_grads(g, bs, True, xa, 1.0,
                                                                                         torch.float32))
    row("low_rank_expand (Triton)", lambda: lora_linear.low_rank_expand(xa, bs.t().contiguous()))
    row("mm_as(gb.t(), x, f32) (dA)", lambda: lora_linear.mm_as(gb.t(), x, torch.float32))
    row("mm_as(g.t(), xa, f32, scale 2) (dB)", lambda: lora_linear.mm_as(g.t(), xa, torch.float32, 2.0))
    row("torch.empty(out, r)", lambda: torch.empty(out, 16, device=dev, dtype=bf))
    rstd = torch.empty(rows, device=dev)
    row("rms_norm_fwd, Triton's launch path", lambda: tk.rms_norm_fwd.fn[(rows,)](x, w[0], x, rstd, inp, 1e-6,
                                                                                 BLOCK=2048))
    row("rms_norm_fwd, launch.Kernel", lambda: tk.rms_norm_fwd[(rows,)](x, w[0], x, rstd, inp, 1e-6, BLOCK=2048))
    with launch_path(False):
        row("lora_gemm.launch forward, Triton's launch path", lambda: lora_gemm.launch(x, w, xa, bs))

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad

    xr = torch.randn(rows, inp, device=dev, dtype=bf, requires_grad=True)
    row("autograd.Function apply + backward (no-op)", lambda: Noop.apply(xr).backward(x))

    # the shared node of q, k, v (2048 -> 2048, 512, 512) against three frozen linears
    ws = [torch.randn(o, 2048, device=dev, dtype=bf) * 0.02 for o in (2048, 512, 512)]
    layers = [(wi, None, torch.randn(16, 2048, device=dev, requires_grad=True),
               torch.randn(wi.shape[0], 16, device=dev, requires_grad=True), 1.0) for wi in ws]
    xq = torch.randn(rows, 2048, device=dev, dtype=bf, requires_grad=True)
    gs = [torch.randn(rows, wi.shape[0], device=dev, dtype=bf) for wi in ws]

    def shared():
        torch.autograd.backward(lora_shared.lora_linears_shared(xq, layers), gs)

    def frozen3():
        torch.autograd.backward([torch.nn.functional.linear(xq, wi) for wi in ws], gs)

    row("3 x F.linear fwd+bwd q,k,v (frozen)", frozen3)
    row("lora_linears_shared fwd+bwd q,k,v", shared)


def trace_node(rows: int, iters: int = 20) -> None:
    """torch.profiler (CPU) over lora_linear forward + backward at 2048 -> 2048: host time per op,
    across the threads autograd runs the backward on."""
    from torch.profiler import ProfilerActivity, profile

    from peftkit.kernels import lora_linear

    dev, bf = "cuda", torch.bfloat16
    w = torch.randn(2048, 2048, device=dev, dtype=bf) * 0.02
    a = torch.randn(16, 2048, device=dev, requires_grad=True)
    b = torch.randn(2048, 16, device=dev, requires_grad=True)
    x = torch.randn(rows, 2048, device=dev, dtype=bf, requires_grad=True)
    g = torch.randn(rows, 2048, device=dev, dtype=bf)
    for _ in range(5):
        lora_linear.lora_linear(x, w, None, a, b, 1.0).backward(g)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            lora_linear.lora_linear(x, w, None, a, b, 1.0).backward(g)
        torch.cuda.synchronize()
    print(f"\ntorch.profiler, {iters} x lora_linear fwd+bwd 2048->2048 (CPU time, us summed over the {iters})")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))


def cast_pass_costs(shape: str, rounds: int = 5, passes: int = 20) -> None:
    """Host us per forward pass of the factor casts alone, for every LoRA factor of the shape (A and
    s B of seven projections per layer, float32, 128-byte copies in bf16, the nodes' order): kept
    copies written into the last pass's buffer, kept copies in a new buffer each pass (the buffer
    held, as when a pass's graph outlives the next), and a fresh cast per call. Alternated rounds,
    best of each."""
    from peftkit.kernels import adapter_casts as ac

    cfg, bf = tt.SHAPES[shape], torch.bfloat16
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    dims = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # (in, out): q k v o gate up down
    factors = [(torch.randn(16, i, device="cuda"), torch.randn(o, 16, device="cuda"))
               for _ in range(cfg["num_hidden_layers"]) for i, o in dims]
    held = []

    def one_pass(keep: bool):
        with ac.scope():
            out = [(ac.cast(a, bf), ac.cast(b, bf, 1.0)) for a, b in factors]
        if keep:
            held[:] = [out]  # this pass's copies outlive the next pass's refresh

    def timed(keep: bool, enabled: bool) -> float:
        with kept_casts(enabled):
            for _ in range(3):
                one_pass(keep)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(passes):
                one_pass(keep)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
        held.clear()
        return (t1 - t0) / passes * 1e6

    runs = {"kept, the last pass's buffer reused": (False, True), "kept, a new buffer (the last one held)": (True, True),
            "a fresh cast per call": (False, False)}
    best = {name: min(timed(*runs[name]) for _ in range(rounds)) for name in runs}
    print(f"\nfactor casts per forward pass, {shape}: {2 * len(factors)} casts (us of host per pass, best of {rounds})")
    for name, us in best.items():
        print(f"  {name:40s} {us:9.1f}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--batch", default="1x64")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--contenders", default="frozen,peftkit,hf_peft")
    parser.add_argument("--skip-nodes", action="store_true")
    args = parser.parse_args()
    batch_shape = tuple(int(v) for v in args.batch.split("x"))
    if not args.skip_nodes:
        node_costs(batch_shape[0] * batch_shape[1])
        trace_node(batch_shape[0] * batch_shape[1])
    cast_pass_costs(args.shape)  # cheap: always
    print(f"\nhost time per eager step, {args.shape} shape, batch {args.batch} (GPU work negligible)")
    variants = {"frozen": [(True, True, ""), (False, True, " (Triton launch)")],
                "peftkit": [(True, True, ""), (False, True, " (Triton launch)"), (True, False, " (casts per call)"),
                            (False, False, " (neither: before)")]}
    for contender in args.contenders.split(","):
        for fast, casts, label in variants.get(contender, [(True, True, "")]):
            with launch_path(fast), kept_casts(casts):
                ms = host_ms_per_step(contender, args.shape, batch_shape, args.steps, profile=fast and casts)
            print(f"  {contender + label:36s} {ms:8.1f} ms per step", flush=True)


if __name__ == "__main__":
    main()
