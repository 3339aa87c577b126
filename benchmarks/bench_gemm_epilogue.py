"""Option (c) of run 6, in isolation: can a Triton GEMM that adds the rank-r term in its epilogue,
    Y = X W^T + P Q        X (M, K), W (N, K), P (M, r), Q (r, N)
beat cuBLAS's two-kernel path (low_rank_expand writes P Q, addmm_ re-reads it with beta=1)?
Only worth building into lora_linear if the plain Triton GEMM is about as fast as torch.mm.

    PYTHONPATH=src python3 benchmarks/bench_gemm_epilogue.py      # CUDA only; prints a table (ms)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from peftkit.kernels.lora_linear import low_rank_expand

CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": 64}, num_stages=s, num_warps=w)
           for bm, bn, s, w in [(128, 128, 4, 4), (128, 256, 3, 8), (128, 128, 4, 8), (256, 128, 3, 8),
                                (64, 256, 4, 4)]]


@triton.autotune(CONFIGS, key=["M", "N", "K", "EPILOGUE"])
@triton.jit
def gemm_lowrank(X, W, P, Q, Y, M, N, K, EPILOGUE: tl.constexpr, R: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One (BM, BN) tile of Y per program, grouped along M for L2 reuse of W."""
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = 8 * n_n
    first_m = (pid // group) * 8
    size_m = min(n_m - first_m, 8)
    pm = first_m + (pid % group) % size_m
    pn = (pid % group) // size_m
    rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pn * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(X + rm[:, None] * K + (k + rk)[None, :])          # (BM, BK)
        w = tl.load(W + rn[None, :] * K + (k + rk)[:, None])          # (BK, BN) = W^T tile
        acc = tl.dot(x, w, acc)
    if EPILOGUE:
        rr = tl.arange(0, R)
        p = tl.load(P + rm[:, None] * R + rr[None, :])                # (BM, R)
        q = tl.load(Q + rr[:, None] * N + rn[None, :])                # (R, BN)
        acc = tl.dot(p, q, acc)
    tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty))


def triton_gemm(x, w, p=None, q=None):
    (m, k), n = x.shape, w.shape[0]
    y = x.new_empty(m, n)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    gemm_lowrank[grid](x, w, p if p is not None else x, q if q is not None else x, y, m, n, k,
                       EPILOGUE=p is not None, R=16 if p is None else p.shape[1])
    return y


def main():
    m, r = 8192, 16
    print(f"M={m} r={r} bf16; median ms (do_bench); TF/s of the base GEMM in brackets")
    print(f"{'K':>5} {'N':>5} {'torch.mm':>14} {'cublas+expand':>14} {'triton mm':>14} {'triton fused':>14} {'rel err':>8}")
    for k, n in [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        p = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(r, n, device="cuda", dtype=torch.bfloat16) * 0.02
        ref = (x.double() @ w.double().t() + p.double() @ q.double())
        fused = triton_gemm(x, w, p, q)
        err = ((fused.double() - ref).norm() / ref.norm()).item()
        times = [do_bench(fn, warmup=25, rep=200, return_mode="median") for fn in (
            lambda: torch.mm(x, w.t()), lambda: low_rank_expand(p, q).addmm_(x, w.t()),
            lambda: triton_gemm(x, w), lambda: triton_gemm(x, w, p, q))]
        tf = lambda ms: 2 * m * n * k / ms / 1e9  # noqa: E731
        print(f"{k:5d} {n:5d} " + " ".join(f"{t:7.3f} ({tf(t):4.0f})" for t in times) + f" {err:8.1e}")


if __name__ == "__main__":
    main()
