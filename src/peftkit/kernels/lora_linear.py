"""LoRA linear as one autograd node: the frozen base matmul and the low-rank path together.

    y = x W^T + b + s (x A^T) B^T        x (N, in), W (out, in), b (out,), A (r, in), B (out, r)

Forward (three matmuls, no (N, out) temporary beyond y itself):
    Bs = s B^T                           (r, out)   one small cast; contiguous, which cuBLAS
                                                    runs ~2x faster than a transposed view here
    xa = x A^T                           (N, r)
    y  = xa Bs + b                       (N, out)   the low-rank term first (low_rank_expand:
                                                    one Triton kernel at write bandwidth; cuBLAS
                                                    runs this K = r product at ~40% of it) ...
    y += x W^T                           in place: addmm_ with beta=1, so the big matmul reads
                                         the low-rank term in its epilogue instead of a
                                         separate memory-bound pass adding it afterwards

Saved for backward: x once (both paths read it) and xa (N, r, tiny). W, A, Bs are small or
parameters.

Backward, chain rule with g = dL/dy (N, out):
    gb = g Bs^T = s g B                  (N, r)        dL/d(xa)
    dx = gb A + g W                      (N, in)       gb A first (low_rank_expand), then
                                                       addmm_ (beta=1) adds g W
    dA = gb^T x                          (r, in)
    dB = s g^T xa                        (out, r)
W and b are frozen: their gradients are never formed.

On a Hopper GPU, where both sides of W are >= 2048 (`lora_gemm.fits`), y and dx are one GEMM each
instead: y = [x | xa] [W | s B]^T and dx = [g | gb] [W ; A], the rank-r product being one more K
block of the same kernel (`lora_gemm.rank_gemm`): no expand written, no beta=1 re-read. s B is then
kept as (out, r), the layout that K block reads.

The adapter may be kept in float32 while activations are bf16: A and B are cast to the
activation dtype (r x in and out x r copies, tiny; within an engine forward pass, made once for
every layer and kept for the pass: adapter_casts), activations are never upcast, and the
gradients are returned in the adapter's own dtype (on CUDA dA and dB come out of cuBLAS in
float32 directly: one kernel each, no bf16 rounding of the gradient).

A 4-bit base (QLoRA: ``weight`` holds packed NF4/FP4 codes, ``quant`` their QuantState) takes the
same path: W is rebuilt in the activations' dtype right before each of its two matmuls (forward
and dx) and dropped after, so no full-size weight outlives its matmul; the block constants are
decoded once in forward and kept for backward (one float per 64 weights).
"""

from __future__ import annotations

import contextlib

import torch

from peftkit.quant import nf4

from . import adapter_casts, lora_gemm
from . import triton_kernels as tk
from .backend import cdiv, use_triton
from .dequant4bit import dequantize_4bit

_EXPAND_BLOCK = (128, 128)  # (rows, columns) of Y per program in low_rank_expand
_EXPAND_WARPS = 4
_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=) works here (set False on the first failure)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """The plain autograd formula; the spec that `lora_linear` must match."""
    y = torch.nn.functional.linear(x, weight, bias)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B)
    return y + scaling * lora


def autocast_allows(x: torch.Tensor) -> bool:
    """True when autocast is off, or on and casting to x's own dtype: then a fused node fed x and a
    frozen weight of that dtype computes what the plain formula would under the same autocast."""
    device = x.device.type
    return not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) == x.dtype


def apply_outside_autocast(function: type, x: torch.Tensor, *args):
    """``function.apply(x, *args)`` with autocast off around it (its matmuls pick their own dtypes)."""
    if not torch.is_autocast_enabled(x.device.type):
        return function.apply(x, *args)
    with torch.autocast(x.device.type, enabled=False):
        return function.apply(x, *args)


def frozen_weight(weight: torch.Tensor, quant: nf4.QuantState | None, dtype: torch.dtype,
                  absmax: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen base weight (out, in): ``weight`` itself, or rebuilt in ``dtype`` from 4-bit codes."""
    if quant is None:
        return weight
    return dequantize_4bit(weight, quant, dtype, absmax)


def decoded_absmax(quant: nf4.QuantState | None) -> torch.Tensor | None:
    """A 4-bit weight's block constants with double quantization undone, for two rebuilds."""
    return None if quant is None else nf4.absmax_of(quant)


def mm_as(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """`scale * a @ b` in `dtype` (the adapter's): for bf16 inputs and a float32 adapter, cuBLAS writes
    its float32 accumulators directly (one kernel, no bf16 rounding) where torch has `out_dtype`."""
    global _MM_OUT_DTYPE
    out = None
    if _MM_OUT_DTYPE and a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        try:
            out = torch.mm(a, b, out_dtype=dtype)
        except (TypeError, RuntimeError):  # this torch has no mm(out_dtype=...): cast instead
            _MM_OUT_DTYPE = False
    if out is None:
        out = (a @ b).to(dtype)
    return out if scale == 1.0 else out.mul_(scale)


def low_rank_expand(p: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`p @ q (+ bias)` for a small inner dimension: p (M, r), q (r, N), bias (N,) -> (M, N).

    One Triton kernel on CUDA for r <= 64; matmul / addmm otherwise (the reference). p may be a
    column slice of a wider matrix (row stride > r): it is read in place.
    """
    if not (use_triton(p, q) and p.shape[1] <= 64 and p.dtype == q.dtype):
        return p @ q if bias is None else torch.addmm(bias, p, q)
    p = p if p.stride(1) == 1 else p.contiguous()
    q = q.contiguous()
    (m, r), n = p.shape, q.shape[1]
    y = p.new_empty(m, n)                                    # (M, N)
    bm, bn = _EXPAND_BLOCK
    grid = (cdiv(m, bm), cdiv(n, bn))
    tk.low_rank_expand[grid](p, q, bias if bias is not None else p, y, m, n, r, p.stride(0), HAS_BIAS=bias is not None,
                             PRECISION="ieee" if p.dtype == torch.float32 else "tf32",
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=max(16, 1 << (r - 1).bit_length()),
                             num_warps=_EXPAND_WARPS)
    return y


def scaled_b(lora_B: torch.Tensor, scaling: float, dtype: torch.dtype, out_major: bool) -> torch.Tensor:
    """s B in `dtype`, contiguous: (out, r) for rank_gemm's K block (out_major), else s B^T (r, out) for
    low_rank_expand. Cast and scaled in one kernel, or within a forward pass the copy kept for it
    (adapter_casts)."""
    return adapter_casts.cast(lora_B, dtype, scaling, transpose=not out_major)


def low_rank_grad(g: torch.Tensor, bs: torch.Tensor, out_major: bool) -> torch.Tensor:
    """gb = s g B (N, r) from `scaled_b`'s tensor in either layout."""
    return g @ bs if out_major else g @ bs.t()


_GRADS_TILE = dict(BLOCK_M=256, BLOCK_N=64, splits=4, num_warps=8, num_stages=4)  # run 10's best on 8192 columns
GRADS_MIN_OUT = 8192  # where run 10 measured one pass over g beating cuBLAS's two (74.8 against 91.9 us)


def low_rank_grads(g, bs, out_major: bool, xa, scaling: float, b_dtype: torch.dtype, need_b: bool = True):
    """(gb, dB): gb = s g B (N, r) in g's dtype and dB = s g^T xa (out, r) in b_dtype (None if not
    need_b). Where g is wide (out >= GRADS_MIN_OUT, CUDA, r <= 64), one Triton pass over g gives
    both (`triton_kernels.low_rank_grads`, partial sums finished here); otherwise two products,
    each reading all of g."""
    (n, out), r = g.shape, xa.shape[1]
    if not (need_b and out >= GRADS_MIN_OUT and r <= 64 and use_triton(g, bs, xa) and g.is_contiguous()
            and xa.stride(1) == 1 and (g.dtype in (torch.bfloat16, torch.float16) or not g.is_cuda)):
        gb = low_rank_grad(g, bs, out_major)
        return gb, (mm_as(g.t(), xa, b_dtype, scaling) if need_b else None)
    t = _GRADS_TILE
    br = max(16, 1 << (r - 1).bit_length())
    per_split = cdiv(cdiv(out, t["splits"]), t["BLOCK_N"]) * t["BLOCK_N"]
    splits = cdiv(out, per_split)
    gb_part = g.new_empty(splits, n, br, dtype=torch.float32)
    db_part = g.new_empty(cdiv(n, t["BLOCK_M"]), out, br, dtype=torch.float32)
    k_stride, c_stride = (bs.stride(1), bs.stride(0)) if out_major else bs.stride()  # element (k, col) of s B^T
    tk.low_rank_grads[(cdiv(n, t["BLOCK_M"]), splits)](
        g, bs, xa, gb_part, db_part, n, out, r, k_stride, c_stride, xa.stride(0), scaling, COLS_PER_SPLIT=per_split,
        BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"], BLOCK_R=br, num_warps=t["num_warps"], num_stages=t["num_stages"])
    gb, db = gb_part.sum(0, dtype=g.dtype), db_part.sum(0)
    if br != r:
        gb, db = gb[:, :r], db[:, :r]
    return gb, db.to(b_dtype)


def lora_product(x2, weight, quant, absmax, xa, lora_B, scaling: float, bias):
    """(y, bs, one_gemm) for one frozen linear: y = x W^T + xa (s B)^T + b (N, out) as one GEMM where
    `lora_gemm.fits`, else the expand first and x W^T added with addmm_ (beta=1); bs is s B in the
    layout that path reads (`scaled_b`). A 4-bit base is rebuilt for this product and dropped after."""
    w = frozen_weight(weight, quant, x2.dtype, absmax)                   # (out, in)
    one_gemm = lora_gemm.fits(x2, w, xa.shape[1])
    bs = scaled_b(lora_B, scaling, x2.dtype, one_gemm)                   # (out, r) or (r, out)
    b = None if bias is None else bias.to(x2.dtype)
    if one_gemm:
        return lora_gemm.launch(x2, w, xa, bs, b), bs, True
    return low_rank_expand(xa, bs, b).addmm_(x2, w.t()), bs, False


def input_grad(gs, weights, quants, absmaxes, gb, A) -> torch.Tensor:
    """gb A + sum_i g_i W_i (N, in) into one buffer, for one linear or several that read the same input.
    The first product carries gb A as its extra K block where it fits `rank_gemm`, else gb A is
    expanded first; the others are added with addmm_ (beta=1). 4-bit bases: rebuilt, dropped after."""
    dx = None
    for g, w, q, am in zip(gs, weights, quants, absmaxes):
        w = frozen_weight(w, q, g.dtype, am)
        if dx is not None:
            dx.addmm_(g, w)                                              # += g_i W_i
        elif lora_gemm.fits(g, w, A.shape[0], w_kn=True):
            dx = lora_gemm.launch(g, w, gb, A, w_kn=True)                # g_1 W_1 + gb A, one pass
        else:
            dx = low_rank_expand(gb, A).addmm_(g, w)
    return dx


@contextlib.contextmanager
def size_floors(min_side: int, grads_min_out: int):
    """Within: the one-GEMM path (`lora_gemm.MIN_SIDE`) and the one-pass gb / dB (`GRADS_MIN_OUT`)
    use these floors instead; 0 takes them at every size, a huge value turns them off (the kernel
    checks and A/B runs of the benchmarks)."""
    global GRADS_MIN_OUT
    saved = lora_gemm.MIN_SIDE, GRADS_MIN_OUT
    lora_gemm.MIN_SIDE, GRADS_MIN_OUT = min_side, grads_min_out
    try:
        yield
    finally:
        lora_gemm.MIN_SIDE, GRADS_MIN_OUT = saved


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, quant):
        x2 = x.reshape(-1, x.shape[-1])                      # (N, in)
        A = adapter_casts.cast(lora_A, x.dtype)              # (r, in), kept for the forward pass
        xa = x2 @ A.t()                                      # (N, r)
        absmax = decoded_absmax(quant)
        y, bs, one_gemm = lora_product(x2, weight, quant, absmax, xa, lora_B, scaling, bias)  # (N, out)
        ctx.save_for_backward(x2, xa, weight, A, bs, *([] if absmax is None else [absmax]))
        ctx.scaling, ctx.quant, ctx.one_gemm = scaling, quant, one_gemm
        ctx.adapter_dtypes = (lora_A.dtype, lora_B.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])            # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, weight, A, bs, *absmax = ctx.saved_tensors
        absmax = absmax[0] if absmax else None
        g = grad_y.reshape(-1, grad_y.shape[-1])             # (N, out)
        gb, dB = low_rank_grads(g, bs, ctx.one_gemm, xa, ctx.scaling, ctx.adapter_dtypes[1],
                                ctx.needs_input_grad[4])     # (N, r), (out, r)
        dx = dA = None
        if ctx.needs_input_grad[0]:
            dx = input_grad([g], [weight], [ctx.quant], [absmax], gb, A)  # g W + gb A (N, in)
            dx = dx.view(*grad_y.shape[:-1], dx.shape[-1])
        if ctx.needs_input_grad[3]:
            dA = mm_as(gb.t(), x2, ctx.adapter_dtypes[0])    # (r, in)
        return dx, None, None, dA, dB, None, None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, quant: nf4.QuantState | None = None) -> torch.Tensor:
    """`x @ weight.T + bias + scaling * (x @ lora_A.T) @ lora_B.T` with a frozen `weight`/`bias`.

    Shapes: x (..., in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r).
    With `quant` (a QuantState), `weight` is a 4-bit base's packed codes, computed in x's dtype.
    Under autocast to another dtype than x's, or if the base weight needs a gradient, the plain
    formula is used instead.
    """
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    same_dtype = quant is not None or x.dtype == weight.dtype
    if not frozen or not autocast_allows(x) or not same_dtype:
        return lora_linear_reference(x, frozen_weight(weight, quant, x.dtype), bias, lora_A, lora_B, scaling)
    return apply_outside_autocast(_LoraLinear, x, weight, bias, lora_A, lora_B, float(scaling), quant)
