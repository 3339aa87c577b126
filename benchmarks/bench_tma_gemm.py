"""Run 11: one GEMM for a frozen linear and its LoRA term (the rank-r product as one more K block),
on Hopper's tensor-memory accelerator (TMA), against cuBLAS.

    forward ("nt"):  Y = X W^T + P Q^T     X (M, K), W (N, K), P = x A^T (M, r), Q = s B (N, r)
    backward ("nn"): Y = X W   + P Q       X = g (M, K), W (K, N), P = g B s (M, r), Q = A (r, N)

The kernel is the package's (`peftkit.kernels.lora_gemm.rank_gemm`, `triton_kernels.rank_gemm`).
Prints, per shape, the median time (do_bench) of torch.mm, the package's two-kernel path
(low_rank_expand + addmm_) and the one-GEMM path at several tiles (the package's TILE first),
with and without the rank block (rank 16 and rank 0 is not a thing: "plain" passes a zero P).
Every result is checked against a float64 reference.

    PYTHONPATH=src python3 benchmarks/bench_tma_gemm.py [--shapes 1b,8b] [--tiles]
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from peftkit.kernels import lora_gemm as lg
from peftkit.kernels import lora_linear as ll

TILES = [dict(lg.TILE)] + [dict(lg.TILE, **change) for change in (
    dict(BM=256, BN=128), dict(BK=32, num_stages=6), dict(BM=256, BN=128, BK=32, num_stages=6),
    dict(STORE_TMA=False, num_stages=4))]
SHAPES = {  # (label, layout, K, N) of each base GEMM in a step, M = 8192 tokens
    "1b": [("q,o fwd", "nt", 2048, 2048), ("gate,up fwd", "nt", 2048, 8192), ("down fwd", "nt", 8192, 2048),
           ("q,o dx", "nn", 2048, 2048), ("gate,up dx", "nn", 8192, 2048), ("down dx", "nn", 2048, 8192)],
    "8b": [("q,o fwd", "nt", 4096, 4096), ("k,v fwd", "nt", 4096, 1024), ("gate,up fwd", "nt", 4096, 14336),
           ("down fwd", "nt", 14336, 4096), ("q,o dx", "nn", 4096, 4096), ("k,v dx", "nn", 1024, 4096),
           ("gate,up dx", "nn", 14336, 4096), ("down dx", "nn", 4096, 14336)],
}


def time_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--tiles", action="store_true", help="also time the other tiles")
    args = parser.parse_args()
    torch.manual_seed(0)
    m, r = 8192, 16
    default = dict(lg.TILE)
    print(f"M={m} r={r} bf16, {torch.cuda.get_device_name()}; median ms, TF/s of the base GEMM in brackets")
    for shape in args.shapes.split(","):
        for label, layout, k, n in SHAPES[shape]:
            w_kn = layout == "nn"
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(*((k, n) if w_kn else (n, k)), device="cuda", dtype=torch.bfloat16) * 0.02
            p = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
            zero = torch.zeros_like(p)
            q = torch.randn(*((r, n) if w_kn else (n, r)), device="cuda", dtype=torch.bfloat16) * 0.02
            wt, qt = (w, q) if w_kn else (w.t(), q.t().contiguous())
            ref = lg.rank_gemm_reference(x.double(), w.double(), p.double(), q.double(), None, w_kn)
            tf = lambda ms: 2 * m * n * k / ms / 1e9  # noqa: E731
            t_mm = time_ms(lambda: torch.mm(x, wt))
            t_two = time_ms(lambda: ll.low_rank_expand(p, qt).addmm_(x, wt))
            print(f"\n{shape} {label} ({layout}, K={k}, N={n}): torch.mm {t_mm:.3f} ({tf(t_mm):.0f}), "
                  f"expand+addmm_ {t_two:.3f}; fits: {lg.fits(x, w, r, w_kn)}")
            # every shape, including those `fits` leaves to cuBLAS
            with ll.size_floors(0, ll.GRADS_MIN_OUT):
                for tile in TILES if args.tiles else TILES[:1]:
                    lg.TILE.clear()
                    lg.TILE.update(tile)
                    try:
                        got = lg.rank_gemm(x, w, p, q, None, w_kn)
                        err = ((got.double() - ref).norm() / ref.norm()).item()
                        t_one = time_ms(lambda: lg.rank_gemm(x, w, p, q, None, w_kn))
                        t_plain = time_ms(lambda: lg.rank_gemm(x, w, zero, q, None, w_kn))
                        print(f"  {tile}: one GEMM {t_one:.3f} ({t_two / t_one:.2f}x two-kernel path, "
                              f"{t_mm / t_one:.2f}x of mm's speed); same kernel, P = 0: {t_plain:.3f}; "
                              f"rel err {err:.1e}")
                    except Exception as exc:  # a tile that does not fit this card: say so and go on
                        print(f"  {tile}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            lg.TILE.clear()
            lg.TILE.update(default)

if __name__ == "__main__":
    main()
