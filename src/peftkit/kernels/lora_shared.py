"""Several LoRA linears that read the same input (q, k, v; gate, up) as one autograd node.

For i = 1..n, with the same x (N, in):

    y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T         W_i (out_i, in), A_i (r_i, in), B_i (out_i, r_i)

Stacking the A's, A = [A_1; ...; A_n] (R, in), R = sum r_i, turns the n reads of x into one:

Forward:
    xa  = x A^T                        (N, R)      one pass over x instead of n
    y_i = xa[:, i] Bs_i + b_i          (N, out_i)  low_rank_expand on the column slice, in place
    y_i += x W_i^T                     addmm_ (beta=1), as in lora_linear

Backward, g_i = dL/dy_i (N, out_i):
    gb  = [g_1 Bs_1^T, ..., g_n Bs_n^T]  (N, R)
    dx  = gb A + sum_i g_i W_i         (N, in)     one expand (K = R) then n addmm_ into the same
                                                   buffer: no per-linear expand, and none of the
                                                   adds autograd would do to sum the n dx's
    dA  = gb^T x                       (R, in)     one pass over x; rows split back per adapter
    dB_i = s_i g_i^T xa[:, i]          (out_i, r_i)     with gb_i, from one pass over g_i where g_i is
                                                   wide (lora_linear.low_rank_grads)

On Hopper each y_i, and dx, is one GEMM where lora_gemm.fits (as in lora_linear): the rank-r
product rides as one more K block of x W_i^T, and gb A as one more K block of the first g_i W_i.

Saved: x once, xa (N, R), the stacked A (R x in, small), W_i, Bs_i. The modules, parameters and
state-dict keys are untouched: this only changes how their forwards are computed together.
A 4-bit W_i (QLoRA) is rebuilt right before each of its matmuls, as in lora_linear.
"""

from __future__ import annotations

import functools

import torch

from . import adapter_casts
from .lora_linear import (apply_outside_autocast, autocast_allows, decoded_absmax, frozen_weight, input_grad,
                          lora_linear_reference, lora_product, low_rank_grads, mm_as)


def lora_linears_shared_reference(x, layers) -> list[torch.Tensor]:
    """The plain formula, one linear at a time; `layers` holds (weight, bias, A, B, scaling[, quant])."""
    return [lora_linear_reference(x, frozen_weight(w, quant, x.dtype), b, a, bb, s)
            for w, b, a, bb, s, quant in map(_with_quant, layers)]


def _with_quant(layer: tuple) -> tuple:
    """(weight, bias, A, B, scaling, quant): quant None for a full-precision weight."""
    return tuple(layer) if len(layer) == 6 else (*layer, None)


class _LoraLinearsShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scalings, quants, *params):
        x2 = x.reshape(-1, x.shape[-1])                                  # (N, in)
        weights, biases, As, Bs = (params[k::4] for k in range(4))
        A = adapter_casts.cast_rows(As, x.dtype)                         # (R, in)
        xa = x2 @ A.t()                                                  # (N, R)
        ranks = [a.shape[0] for a in As]
        absmaxes = [decoded_absmax(q) for q in quants]
        ys, bss, one_gemm = [], [], []
        for xa_i, w, bias, q, am, lora_b, s in zip(xa.split(ranks, dim=1), weights, biases, quants, absmaxes, Bs,
                                                   scalings):
            y, bs, one = lora_product(x2, w, q, am, xa_i, lora_b, s, bias)  # (N, out_i)
            ys.append(y.view(*x.shape[:-1], y.shape[1]))
            bss.append(bs)
            one_gemm.append(one)
        ctx.save_for_backward(x2, xa, A, *weights, *bss, *[am for am in absmaxes if am is not None])
        ctx.scalings, ctx.ranks, ctx.quants, ctx.one_gemm = scalings, ranks, quants, one_gemm
        ctx.adapter_dtypes = [(a.dtype, b.dtype) for a, b in zip(As, Bs)]
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        x2, xa, A, *rest = ctx.saved_tensors
        n = len(ctx.ranks)
        weights, bss, decoded = rest[:n], rest[n:2 * n], iter(rest[2 * n:])
        absmaxes = [None if q is None else next(decoded) for q in ctx.quants]
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]                 # (N, out_i) each
        pairs = [low_rank_grads(g, bs, one, xa_i, s, b_dtype, ctx.needs_input_grad[3 + 4 * i + 3])
                 for i, (g, bs, one, xa_i, s, (_, b_dtype)) in enumerate(zip(
                     gs, bss, ctx.one_gemm, xa.split(ctx.ranks, dim=1), ctx.scalings, ctx.adapter_dtypes))]
        gb = torch.cat([gb_i for gb_i, _ in pairs], dim=1)               # (N, R)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = input_grad(gs, weights, ctx.quants, absmaxes, gb, A)
            dx = dx.view(*grads[0].shape[:-1], dx.shape[-1])
        common = functools.reduce(torch.promote_types, [a for a, _ in ctx.adapter_dtypes])
        dA = mm_as(gb.t(), x2, common).split(ctx.ranks)                  # (r_i, in) each
        out = []
        for i, (_, db) in enumerate(pairs):
            need_a = ctx.needs_input_grad[3 + 4 * i + 2]
            out += [None, None, dA[i].to(ctx.adapter_dtypes[i][0]) if need_a else None, db]
        return (dx, None, None, *out)


def lora_linears_shared(x, layers) -> list[torch.Tensor]:
    """`[lora_linear(x, *layer) for layer in layers]` as one node reading x once per pass.

    layers: (weight, bias, lora_A, lora_B, scaling[, quant]) per linear, all of the same `in`
    features; quant: the QuantState of a 4-bit weight (packed codes), else None or left out.
    Falls back to the plain formula where lora_linear would (trainable base, autocast, dtypes).
    """
    layers = [_with_quant(layer) for layer in layers]
    frozen = all(not w.requires_grad and (b is None or not b.requires_grad) for w, b, *_ in layers)
    same_dtype = all(q is not None or w.dtype == x.dtype for w, *_, q in layers)
    if not frozen or not autocast_allows(x) or not same_dtype:
        return lora_linears_shared_reference(x, layers)
    scalings = tuple(float(layer[4]) for layer in layers)
    quants = tuple(layer[5] for layer in layers)
    params = [t for w, b, a, bb, *_ in layers for t in (w, b, a, bb)]
    return list(apply_outside_autocast(_LoraLinearsShared, x, scalings, quants, *params))
