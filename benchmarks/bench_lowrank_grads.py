"""Run 10: the two backward reductions of a LoRA linear that read g, in one pass over g.

    PYTHONPATH=src python benchmarks/bench_lowrank_grads.py [--quick]

With g = dL/dy (N, out), Bs = s B^T (r, out) and xa = x A^T (N, r), the backward needs

    gb = g Bs^T   (N, r)      reduces over out: a row of g gives a row of gb
    dB = s g^T xa (out, r)    reduces over N:   a column of g gives a row of dB

Today these are two cuBLAS products, each reading all of g (~2.6 TB/s each): per 1B step 16
layers x 23552 columns x 8192 rows of bf16, 6.2 GB read twice. One kernel can read each tile of
g once and feed both: program (i, j) owns rows block i (BLOCK_M rows) and column split j; it
keeps its rows' gb in registers across its columns (partial over the split) and writes each
column tile's dB, which is partial over its row block. Two small sums finish the job:

    gb = sum_j GB_PART[j]  (N, r)          GB_PART (splits, N, R)     fp32
    dB = sum_i DB_PART[i]  (out, r)        DB_PART (row blocks, out, R) fp32, s already applied

Prediction (before measuring): the kernel reads g once plus ~15% partials, at 2.2-2.8 TB/s,
against two cuBLAS passes: -20 to -35 us per 8192-wide projection, about 0.9-1.6 ms per 1B step.
Contenders, each graphed (do_bench_cudagraph, median of 3): the package's current pair
(`g @ Bs^T`, `mm_as(g^T, xa, float32, s)`) and the fused kernel at several tile shapes and
splits; every contender is checked against a float64 reference. Prints per-shape times and the
per-step total over the 1B step's calls (per layer: q 2048, k 512, v 512, o 2048, gate 8192,
up 8192, down 2048 columns).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from peftkit.kernels import lora_gemm
from peftkit.kernels import triton_kernels as tk
from peftkit.kernels.backend import cdiv
from peftkit.kernels.lora_linear import mm_as


def fused_grads(g, bs, xa, scaling, tile):
    """(gb (N, r) in g's dtype, dB (out, r) float32) from one pass over g."""
    bm, bn, splits, warps, stages = tile
    (n, out), r = g.shape, bs.shape[0]
    br = max(16, 1 << (r - 1).bit_length())
    per_split = cdiv(cdiv(out, splits), bn) * bn
    splits = cdiv(out, per_split)
    gb_part = g.new_empty(splits, n, br, dtype=torch.float32)
    db_part = g.new_empty(cdiv(n, bm), out, br, dtype=torch.float32)
    tk.low_rank_grads[(cdiv(n, bm), splits)](g, bs, xa, gb_part, db_part, n, out, r, bs.stride(0), bs.stride(1),
                                             xa.stride(0), scaling, COLS_PER_SPLIT=per_split,
                                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, num_warps=warps, num_stages=stages)
    gb = gb_part.sum(0, dtype=g.dtype)
    db = db_part.sum(0)
    return (gb, db) if r == br else (gb[:, :r], db[:, :r])


@triton.jit
def low_rank_grads_tma(G, SB, XA, GB_PART, DB_PART, M, OUT, stride_xa, scaling, RANK: tl.constexpr,
                       TILES_PER_SPLIT: tl.constexpr, SUB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Run 11's variant: g, s B (out, r) and xa through TMA descriptors. Program (i, j) owns SUB row
    blocks of BM rows from i * SUB * BM and column split j; dB partials are summed over its SUB
    blocks before they are written (fewer partials), gb partials over its split."""
    g_d = tl.make_tensor_descriptor(G, shape=[M, OUT], strides=[OUT, 1], block_shape=[BM, BN])
    sb_d = tl.make_tensor_descriptor(SB, shape=[OUT, RANK], strides=[RANK, 1], block_shape=[BN, 16])
    xa_d = tl.make_tensor_descriptor(XA, shape=[M, RANK], strides=[stride_xa, 1], block_shape=[BM, 16])
    i, j = tl.program_id(0), tl.program_id(1)
    ks = tl.arange(0, 16)
    for sub in tl.static_range(SUB):
        om = (i * SUB + sub) * BM
        xa = xa_d.load([om, 0])                                                          # (BM, 16)
        gb = tl.zeros((BM, 16), tl.float32)
        for t in range(TILES_PER_SPLIT):
            oc = (j * TILES_PER_SPLIT + t) * BN
            g = g_d.load([om, oc])                                                       # (BM, BN)
            gb = tl.dot(g, sb_d.load([oc, 0]), gb)
            db = tl.dot(g.T, xa)                                                         # (BN, 16)
            cols = oc + tl.arange(0, BN)
            ptr = DB_PART + ((i * SUB + sub) * OUT + cols[:, None]).to(tl.int64) * 16 + ks[None, :]
            tl.store(ptr, db * scaling, mask=(cols < OUT)[:, None])
        rows = om + tl.arange(0, BM)
        tl.store(GB_PART + (j * M + rows[:, None]).to(tl.int64) * 16 + ks[None, :], gb, mask=(rows < M)[:, None])


def fused_grads_tma(g, sb, xa, scaling, tile):
    """(gb, dB) as fused_grads, sb = s B (out, r) out-major; tile = (BM, BN, splits, SUB, warps, stages)."""
    bm, bn, splits, sub, warps, stages = tile
    lora_gemm._ensure_allocator()  # device-side descriptors need Triton's scratch allocator
    (n, out), r = g.shape, sb.shape[1]
    tiles = cdiv(out, bn)
    per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, per_split)
    blocks = cdiv(n, bm * sub)
    gb_part = g.new_empty(splits, n, 16, dtype=torch.float32)
    db_part = g.new_empty(blocks * sub, out, 16, dtype=torch.float32)
    low_rank_grads_tma[(blocks, splits)](g, sb, xa, gb_part, db_part, n, out, xa.stride(0), scaling, RANK=r,
                                         TILES_PER_SPLIT=per_split, SUB=sub, BM=bm, BN=bn,
                                         num_warps=warps, num_stages=stages)
    return gb_part.sum(0, dtype=g.dtype)[:, :r], db_part.sum(0)[:, :r]


def cublas_grads(g, bs, xa, scaling):
    """What lora_linear's backward does today."""
    return g @ bs.t(), mm_as(g.t(), xa, torch.float32, scaling)


N = 8192
SCALING = 1.0
# (r, out, calls per 1B layer, xa row stride): q/k/v read slices of the shared (N, 48) xa
SHAPES = [(16, 2048, 1, 48), (16, 512, 2, 48), (16, 2048, 2, 16), (16, 8192, 2, 32)]
TILES = [  # (BLOCK_M, BLOCK_N, splits, warps, stages)
    (128, 64, 2, 4, 3), (128, 64, 4, 4, 3), (128, 128, 2, 8, 3), (256, 64, 4, 8, 3), (256, 64, 8, 8, 3),
    (256, 64, 4, 8, 4), (256, 128, 4, 8, 2), (64, 128, 2, 4, 4), (256, 32, 4, 4, 4),
]


TMA_TILES = [  # (BM, BN, splits, SUB, warps, stages)
    (128, 128, 4, 1, 4, 3), (128, 128, 4, 2, 4, 3), (256, 128, 4, 1, 8, 3), (128, 256, 4, 2, 8, 3),
    (128, 128, 8, 2, 4, 4), (256, 64, 4, 2, 8, 4), (128, 128, 2, 4, 4, 3),
]


def timed(fn) -> float:
    return statistics.median(do_bench_cudagraph(fn, rep=50) for _ in range(3))


def check(name, got, want_gb, want_db):
    for what, a, b in (("gb", got[0], want_gb), ("dB", got[1], want_db)):
        err = ((a.double() - b).norm() / b.norm()).item()
        if not err < 1e-2:
            raise SystemExit(f"{name}: {what} relative error {err:.2e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer tiles")
    tiles = TILES[:4] if parser.parse_args().quick else TILES
    tma_tiles = TMA_TILES[:2] if parser.parse_args().quick else TMA_TILES
    names = ["cublas"] + [f"{bm}x{bn}/s{s}/w{w}/st{st}" for bm, bn, s, w, st in tiles]
    names += [f"tma {bm}x{bn}/s{s}/sub{u}/w{w}/st{st}" for bm, bn, s, u, w, st in tma_tiles]
    totals = dict.fromkeys(names, 0.0)
    print(f"{'r':>3} {'out':>5} {'calls':>5} " + " ".join(f"{n:>20}" for n in names) + "   us (TB/s of g)")
    for r, out, calls, stride in SHAPES:
        g = torch.randn(N, out, device="cuda", dtype=torch.bfloat16)
        xa_wide = torch.randn(N, stride, device="cuda", dtype=torch.bfloat16)
        xa = xa_wide[:, :r]
        bs = torch.randn(r, out, device="cuda", dtype=torch.bfloat16) / out ** 0.5
        want_gb = g.double() @ bs.double().t()
        want_db = SCALING * g.double().t() @ xa.double()
        fns = [lambda: cublas_grads(g, bs, xa, SCALING)]
        fns += [lambda t=t: fused_grads(g, bs, xa, SCALING, t) for t in tiles]
        sb = bs.t().contiguous()
        fns += [lambda t=t: fused_grads_tma(g, sb, xa, SCALING, t) for t in tma_tiles]
        row = []
        for name, fn in zip(names, fns):
            try:
                check(name, fn(), want_gb, want_db)
            except triton.runtime.errors.OutOfResources:  # a tile too big for this card
                totals[name] = float("inf")
                row.append(f"{'too big':>20}")
                continue
            ms = timed(fn)
            totals[name] += ms * calls * 16
            row.append(f"{ms * 1e3:8.1f} ({g.numel() * 2 / ms / 1e9:4.2f})")
        print(f"{r:>3} {out:>5} {calls:>5} " + " ".join(f"{c:>20}" for c in row), flush=True)
    print("\nper 1B step (16 layers), ms:")
    base = totals["cublas"]
    for name, total in totals.items():
        print(f"  {name:>22}: {total:6.2f}  ({base - total:+.2f} vs cublas)")


if __name__ == "__main__":
    main()
