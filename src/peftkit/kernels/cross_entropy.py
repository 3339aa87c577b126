"""Causal-LM loss fused with the LM head, in row chunks, so the (tokens, vocab) logits never
exist whole and never in float32.

    z = h W^T                              per chunk of rows: (c, V) in h's dtype
    loss = sum_rows [lse(z) - z[label]] / n, n = the number of labels that are not ignored

The gradient is formed in the same pass, while the chunk's logits are at hand:
    dz = (softmax(z) - onehot(label)) / n  (written over z in place)
    dh = dz W                              (c, H), kept for backward
    dW = dz^T h                            (only when W needs a gradient)
so backward only scales dh (and dW) by the incoming scalar: no logits are recomputed.
Labels are shifted as transformers does: position t predicts labels[t + 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_kernels as tk
from .backend import use_triton

IGNORE_INDEX = -100
_VOCAB_BLOCK = 4096


def causal_lm_loss_reference(hidden, weight, labels, num_items_in_batch=None):
    """transformers' ForCausalLMLoss on `hidden @ weight.T`: the spec."""
    logits = hidden @ weight.t()                                        # (B, S, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]          # (B, S)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.flatten(0, -2), shift.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def cross_entropy_rows_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row loss (0 where ignored); overwrites `logits` (c, V) with softmax - onehot."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))    # (c, V)
    lse = torch.logsumexp(z, dim=-1)                                    # (c,)
    valid = labels != IGNORE_INDEX
    safe = labels.clamp_min(0)[:, None]                                 # (c, 1)
    loss = (lse - z.gather(1, safe).squeeze(1)) * valid
    grad = z.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
    logits.copy_(grad.mul_(valid[:, None]))
    return loss


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`cross_entropy_rows_reference`, in one Triton kernel on CUDA (two passes over the row)."""
    if not use_triton(logits, labels):
        return cross_entropy_rows_reference(logits, labels)
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    tk.cross_entropy_rows[(logits.shape[0],)](
        logits, labels, loss, IGNORE_INDEX, n_cols=logits.shape[1], BLOCK=_VOCAB_BLOCK)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h2, weight, labels, denom, chunk):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h2) if need_dh else None                 # (N, H)
        acc = torch.promote_types(h2.dtype, torch.float32)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
        total = torch.zeros((), dtype=acc, device=h2.device)
        for start in range(0, h2.shape[0], chunk):
            h = h2[start:start + chunk]                                 # (c, H)
            z = h @ weight.t()                                          # (c, V)
            total += cross_entropy_rows(z, labels[start:start + chunk]).sum()
            if need_dh:
                torch.mm(z, weight, out=dh[start:start + chunk])        # (c, H)
            if need_dw:
                dw += (z.t() @ h).to(acc)                             # (V, H)
        scale = 1.0 / denom
        ctx.save_for_backward(dh.mul_(scale) if need_dh else None,
                              dw.mul_(scale).to(weight.dtype) if need_dw else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad_loss.to(dh.dtype)
        dw = None if dw is None else dw * grad_loss.to(dw.dtype)
        return dh, dw, None, None, None


def fused_causal_lm_loss(hidden, lm_head_weight, labels, chunk: int = 2048, num_items_in_batch=None):
    """Mean next-token cross-entropy of `hidden @ lm_head_weight.T` against `labels`.

    hidden (B, S, H), lm_head_weight (V, H), labels (B, S) with -100 where ignored.
    Equals `causal_lm_loss_reference` (transformers' loss); with `num_items_in_batch` the sum
    is divided by it instead of by the count of labelled tokens, as transformers does.
    """
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)  # (N,)
    if num_items_in_batch is None:
        denom = (shift != IGNORE_INDEX).sum().clamp_min(1)
    else:
        denom = torch.as_tensor(num_items_in_batch, device=hidden.device)
    denom = denom.to(torch.promote_types(hidden.dtype, torch.float32))
    h2 = hidden.reshape(-1, hidden.shape[-1])                               # (N, H)
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return _LinearCrossEntropy.apply(h2, lm_head_weight, shift.contiguous(), denom, int(chunk))
    # Under autocast the head's matmuls run in the autocast dtype, as the model's own lm_head would;
    # cast both inputs once here (autograd takes the gradients back to their dtypes) and keep autocast
    # out of the node, whose matmuls write into preallocated buffers of one dtype.
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h2.to(dtype), lm_head_weight.to(dtype), shift.contiguous(), denom,
                                         int(chunk))
