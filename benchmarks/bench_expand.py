"""The rank-r expand Y = P Q (P (N, r), Q (r, out), N = 8192) of a 1B LoRA step, alone, graphed.

    PYTHONPATH=src python benchmarks/bench_expand.py

The expand writes a whole (N, out) activation from two tiny factors, so its speed is write
bandwidth. Contenders, each timed with triton.testing.do_bench_cudagraph (median of 3 rounds):
cuBLAS (p @ q), the current Triton kernel (per-thread masked stores, 128 x 128 tiles) and the same
product written through a TMA descriptor (low_rank_expand_tma, below) at several tile shapes.
Run 9 (results/h100_run9/): TMA 64x128 tiles write fastest alone (3.48 vs 3.95 ms per step), but
building the descriptor on the host for every call made the eager 1B step 23 ms slower and the
graphed one no faster, so the package keeps the per-thread-store kernel. Prints GB/s
written per shape and the per-step total over the 1B step's calls (16 layers; forward: q, k, v, o,
gate, up, down; backward: the shared q/k/v and gate/up nodes, o, down), and checks every contender
against p @ q.
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph
from triton.tools.tensor_descriptor import TensorDescriptor

from peftkit.kernels import triton_kernels as tk
from peftkit.kernels.backend import cdiv
from peftkit.kernels.lora_linear import low_rank_expand


@triton.jit
def low_rank_expand_tma(P, Q, BIAS, Y_DESC, n_rows, n_cols, rank, stride_p, HAS_BIAS: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """The package's expand tile, written through a TMA descriptor (Hopper): one asynchronous bulk
    copy from shared memory, clipped at the edges, instead of masked per-thread stores."""
    _, _, acc = tk.expand_tile(P, Q, BIAS, n_rows, n_cols, rank, stride_p, HAS_BIAS, PRECISION,
                               BLOCK_M, BLOCK_N, BLOCK_R)
    Y_DESC.store([tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_N], acc.to(Y_DESC.dtype))


N = 8192
# (r, out, calls per layer): forward expands, then backward gb A expands
SHAPES = [(16, 2048, 4), (16, 512, 2), (16, 8192, 2), (48, 2048, 1), (32, 2048, 1), (16, 8192, 1)]
TMA_TILES = [(128, 128, 4), (128, 256, 8), (64, 256, 4), (256, 128, 8), (64, 128, 4)]


def tma_expand(p, q, tile):
    bm, bn, warps = tile
    (m, r), n = p.shape, q.shape[1]
    y = p.new_empty(m, n)
    desc = TensorDescriptor.from_tensor(y, [bm, bn])
    low_rank_expand_tma[(cdiv(m, bm), cdiv(n, bn))](p, q, p, desc, m, n, r, p.stride(0), HAS_BIAS=False,
                                                       PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn,
                                                       BLOCK_R=max(16, 1 << (r - 1).bit_length()), num_warps=warps)
    return y


def timed(fn) -> float:
    return statistics.median(do_bench_cudagraph(fn, rep=50) for _ in range(3))


def main():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    names = ["cublas", "triton"] + [f"tma {bm}x{bn}/w{w}" for bm, bn, w in TMA_TILES]
    totals = dict.fromkeys(names, 0.0)
    print(f"{'r':>3} {'out':>6} {'calls':>5} " + " ".join(f"{n:>16}" for n in names) + "   (GB/s written)")
    for r, out, calls in SHAPES:
        p = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(r, out, device="cuda", dtype=torch.bfloat16)
        want = (p.float() @ q.float())
        fns = [lambda: p @ q, lambda: low_rank_expand(p, q)] + [lambda t=t: tma_expand(p, q, t) for t in TMA_TILES]
        row = []
        for name, fn in zip(names, fns):
            err = (fn().float() - want).abs().max().item()
            if err > 0.05 * want.abs().max().item():
                raise SystemExit(f"{name} is wrong for r={r} out={out}: max error {err}")
            ms = timed(fn)
            totals[name] += ms * calls * 16
            row.append(N * out * 2 / ms / 1e6)
        print(f"{r:>3} {out:>6} {calls:>5} " + " ".join(f"{v:16.0f}" for v in row))
    print("per 1B step (16 layers, ms): " + ", ".join(f"{n} {t:.2f}" for n, t in totals.items()))


if __name__ == "__main__":
    main()
