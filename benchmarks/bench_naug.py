"""Run 8 in isolation: fold the two low-rank reductions into the frozen GEMMs by widening N.

For a node of n linears sharing x (q, k, v or gate, up), keep the frozen weights and the adapters in
one buffer with leading dimension ld >= in + R:

    rows of W_i :  [ W_i  | 0 .. Bs_i^T .. 0 ]      (out_i, in + R)   Bs_i = s_i B_i^T, own columns
    rows of A   :  [ A    | 0              ]      (R, in + R)       A = [A_1; ...; A_n]

Forward:   x @ buf[:, :in]^T            = [ y_1 .. y_n | xa ]      one GEMM, xa = x A^T comes free
           y_i = y_i_base + xa_i Bs_i                              one expand-add per output
Backward:  sum_i g_i @ buf[rows_i, :in+R] = [ sum g_i W_i | gb ]   gb = [g_i Bs_i^T] comes free
           dx = dx_base + gb A                                     one expand-add
           dA = gb^T x,  dB_i = s g_i^T xa_i                       unchanged

So x is no longer read for xa, nor g for gb. This script times, per 1B-shape node, the current
path (separate reductions, run 6), this one, and the frozen GEMMs alone, forward and backward.

    PYTHONPATH=src python3 benchmarks/bench_naug.py        # CUDA only; prints a table (ms)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from peftkit.kernels.lora_linear import low_rank_expand

N_TOKENS, R = 8 * 1024, 16
NODES = {"qkv": (2048, [2048, 512, 512]), "o": (2048, [2048]), "gate_up": (2048, [8192, 8192]),
         "down": (8192, [2048])}


@triton.jit
def expand_add_kernel(BASE, P, Q, Y, n_rows, n_cols, rank, s_base, s_p,
                      BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """Y = BASE + P Q, BASE (M, N) and P (M, r) strided by rows, Q (r, N), Y contiguous."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BR)
    rok, cok, kok = rows < n_rows, cols < n_cols, ks < rank
    r64 = rows[:, None].to(tl.int64)
    p = tl.load(P + r64 * s_p + ks[None, :], mask=rok[:, None] & kok[None, :], other=0.0)
    q = tl.load(Q + ks[:, None] * n_cols + cols[None, :], mask=kok[:, None] & cok[None, :], other=0.0)
    acc = tl.dot(p, q)
    acc += tl.load(BASE + r64 * s_base + cols[None, :], mask=rok[:, None] & cok[None, :]).to(tl.float32)
    tl.store(Y + r64 * n_cols + cols[None, :], acc.to(Y.dtype.element_ty), mask=rok[:, None] & cok[None, :])


def expand_add(base, p, q):
    m, n = base.shape
    y = base.new_empty(m, n)
    grid = (triton.cdiv(m, 128), triton.cdiv(n, 128))
    expand_add_kernel[grid](base, p, q, y, m, n, p.shape[1], base.stride(0), p.stride(0),
                            BM=128, BN=128, BR=max(16, triton.next_power_of_2(p.shape[1])), num_warps=4)
    return y


def build(inp, outs, dev, dt, pad):
    rr = R * len(outs)
    ld = inp + ((rr + pad - 1) // pad) * pad
    tot = sum(outs)
    buf = torch.zeros(tot + rr, ld, device=dev, dtype=dt)
    W = [torch.randn(o, inp, device=dev, dtype=dt) * 0.02 for o in outs]
    A = torch.randn(rr, inp, device=dev, dtype=dt) * 0.02
    Bs = [torch.randn(R, o, device=dev, dtype=dt) * 0.02 for o in outs]
    row = 0
    for i, (w, bs) in enumerate(zip(W, Bs)):
        buf[row:row + w.shape[0], :inp] = w
        buf[row:row + w.shape[0], inp + i * R:inp + (i + 1) * R] = bs.t()
        row += w.shape[0]
    buf[tot:, :inp] = A
    return dict(W=W, A=A, Bs=Bs, buf=buf, inp=inp, outs=outs, rr=rr)


def current_fwd(x, m):
    xa = x @ m["A"].t()
    ys = []
    for xa_i, bs, w in zip(xa.split(R, 1), m["Bs"], m["W"]):
        ys.append(low_rank_expand(xa_i, bs).addmm_(x, w.t()))
    return ys, xa


def aug_fwd(x, m):
    inp, tot = m["inp"], sum(m["outs"])
    out = torch.mm(x, m["buf"][:, :inp].t())                 # (N, tot + R)
    ys, col = [], 0
    for i, (o, bs) in enumerate(zip(m["outs"], m["Bs"])):
        ys.append(expand_add(out[:, col:col + o], out[:, tot + i * R:tot + (i + 1) * R], bs))
        col += o
    return ys, out[:, tot:]


def frozen_fwd(x, m):
    return [x @ w.t() for w in m["W"]]


def current_bwd(x, xa, gs, m):
    gb = torch.cat([g @ bs.t() for g, bs in zip(gs, m["Bs"])], dim=1)
    dx = low_rank_expand(gb, m["A"])
    for g, w in zip(gs, m["W"]):
        dx.addmm_(g, w)
    dA = torch.mm(gb.t(), x, out_dtype=torch.float32)
    dB = [torch.mm(g.t(), xa_i, out_dtype=torch.float32) for g, xa_i in zip(gs, xa.split(R, 1))]
    return dx, dA, dB


def aug_bwd(x, xa, gs, m):
    inp, rr = m["inp"], m["rr"]
    G, row = None, 0
    for g, o in zip(gs, m["outs"]):
        part = m["buf"][row:row + o, :inp + rr]
        G = torch.mm(g, part) if G is None else G.addmm_(g, part)   # (N, in + R)
        row += o
    gb = G[:, inp:]
    dx = expand_add(G[:, :inp], gb, m["A"])
    dA = torch.mm(gb.t(), x, out_dtype=torch.float32)
    dB = [torch.mm(g.t(), xa_i, out_dtype=torch.float32) for g, xa_i in zip(gs, xa.split(R, 1))]
    return dx, dA, dB


def frozen_bwd(gs, m):
    dx = gs[0] @ m["W"][0]
    for g, w in zip(gs[1:], m["W"][1:]):
        dx = dx + g @ w
    return dx


def check(x, gs, m):
    (yc, xac), (ya, xaa) = current_fwd(x, m), aug_fwd(x, m)
    err = max((a.float() - c.float()).abs().max().item() for a, c in zip(ya, yc))
    dc, da = current_bwd(x, xac, gs, m), aug_bwd(x, xaa, gs, m)
    err_dx = (dc[0].float() - da[0].float()).abs().max().item()
    err_da = (dc[1] - da[1]).abs().max().item() / dc[1].abs().max().item()
    return err, err_dx, err_da


def main():
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    print(f"{'node':8} {'pad':>4} | {'fwd cur':>8} {'fwd aug':>8} {'fwd frz':>8} | {'bwd cur':>8} {'bwd aug':>8} "
          f"{'bwd frz':>8} | {'saved':>7} | max|dy| max|ddx| rel dA")
    total = {}
    for pad in (16, 64):
        for name, (inp, outs) in NODES.items():
            m = build(inp, outs, dev, dt, pad)
            x = torch.randn(N_TOKENS, inp, device=dev, dtype=dt)
            gs = [torch.randn(N_TOKENS, o, device=dev, dtype=dt) for o in outs]
            errs = check(x, gs, m)
            _, xa = current_fwd(x, m)
            fns = [lambda: current_fwd(x, m), lambda: aug_fwd(x, m), lambda: frozen_fwd(x, m),
                   lambda: current_bwd(x, xa, gs, m), lambda: aug_bwd(x, xa, gs, m), lambda: frozen_bwd(gs, m)]
            # graphed (launch gaps gone, as in the graphed training step); median of 3 interleaved rounds
            runs = [[do_bench_cudagraph(f, rep=300) for f in fns] for _ in range(3)]
            t = [sorted(r[k] for r in runs)[1] for k in range(len(fns))]
            saved = (t[0] + t[3]) - (t[1] + t[4])
            total[pad] = total.get(pad, 0.0) + saved
            print(f"{name:8} {pad:4d} | " + " ".join(f"{v:8.3f}" for v in t[:3]) + " | "
                  + " ".join(f"{v:8.3f}" for v in t[3:]) + f" | {saved:7.3f} | "
                  + " ".join(f"{e:.2e}" for e in errs))
    for pad, s in total.items():
        print(f"pad {pad}: saved per layer {s:.3f} ms -> per 16-layer step {16 * s:.2f} ms")


if __name__ == "__main__":
    main()
