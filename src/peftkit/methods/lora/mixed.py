"""Mixed-adapter batches for LoRA linears: each row with its own adapter, in a fixed number of kernels.

For row b of the batch, with adapter i = i(b) (slot 0, all zeros, for rows that use none):

    y_b = base(x_b) + s_i (x_b A_i^T) B_i^T         x_b (T, in), A_i (r_i, in), B_i (out, r_i)

Adapters of different ranks are zero-padded to R = max r_i (the padding adds exact zeros), and
stacked: As (n + 1, R, in), Bs (n + 1, out, R), scales (n + 1,). Two ways to evaluate the same sum:

- by row (prefill: T tokens per row): gather each row's factors and run two batched matmuls,
      xa_b = x_b As[i]^T (T, R),   delta_b = s_i xa_b Bs[i]^T (T, out)
  moving B R (in + out) gathered weights, paid once for T tokens;
- all at once (decode: T small): every token against all n adapters,
      xa = x [A_1; ..; A_n]^T (N, n R), zeroed outside the row's own block and scaled,
      delta = xa [B_1, .., B_n]^T (N, out)
  reads each adapter once but does n times the low-rank FLOPs, so it wins while T n is small.

Looping over the adapters instead (one gather, two matmuls and an index_add each) costs ~5 kernels
per adapter per layer, which is what makes many-adapter serving slow. The stacks are rebuilt on
every forward that needs gradients (so they stay differentiable) and otherwise built once per
mixed-batch call: `generate` reuses them for every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DENSE_TOKENS_X_ADAPTERS = 256  # all-at-once while tokens-per-row x adapters stays below this


@dataclass(frozen=True)
class Stack:
    """The batch's adapters on one layer, in the activations' dtype; slot 0 is "no adapter"."""

    names: list[str]  # the mixed-batch names list this was built for (identity marks its lifetime)
    slots: dict[str, int]
    As: torch.Tensor  # (n + 1, R, in)
    Bs: torch.Tensor  # (n + 1, out, R)
    scales: torch.Tensor  # (n + 1,)
    row_slots: dict[int, torch.Tensor] = field(default_factory=dict)  # batch rows -> (rows,) slots, on device


def build_stack(layer, names: list[str], dtype: torch.dtype) -> Stack:
    own = [n for n in dict.fromkeys(names) if n in layer.r]
    rank = max([layer.r[n] for n in own], default=1)
    a0 = layer.lora_A[own[0]].weight if own else layer.base_weight()
    zeros_a = a0.new_zeros(rank, layer.in_features, dtype=dtype)
    zeros_b = a0.new_zeros(layer.out_features, rank, dtype=dtype)
    As, Bs = [zeros_a], [zeros_b]
    for name in own:
        a, b, r = layer.lora_A[name].weight.to(dtype), layer.lora_B[name].weight.to(dtype), layer.r[name]
        As.append(torch.cat([a, zeros_a[r:]]) if r < rank else a)                  # (R, in)
        Bs.append(torch.cat([b, zeros_b[:, r:]], dim=1) if r < rank else b)        # (out, R)
    scales = torch.tensor([0.0] + [layer.scaling[n] for n in own], dtype=dtype, device=a0.device)
    return Stack(names, {n: k + 1 for k, n in enumerate(own)}, torch.stack(As), torch.stack(Bs), scales)


def row_slots(stack: Stack, names: list[str], rows: int, device) -> torch.Tensor:
    """(rows,) slot per row; names repeat when generate expanded each row (beams, samples). Kept
    with the stack, so decoding copies it to the device once per call, not once per layer and token."""
    if rows not in stack.row_slots:
        if rows % len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {rows} rows")
        slots = torch.tensor([stack.slots.get(n, 0) for n in names], device=device)
        stack.row_slots[rows] = slots.repeat_interleave(rows // len(names))
    return stack.row_slots[rows]


def stacked_delta(layer, x: torch.Tensor) -> torch.Tensor:
    """sum over rows of s_i (x_b A_i^T) B_i^T for the layer's mixed batch; x (B, ..., in)."""
    names = layer.batch_adapter_names
    stack = layer.mixed_stack
    if torch.is_grad_enabled() or stack is None or stack.names is not names or stack.As.dtype != x.dtype:
        stack = build_stack(layer, names, x.dtype)
        layer.mixed_stack = None if torch.is_grad_enabled() else stack
    slots = row_slots(stack, names, x.shape[0], x.device)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])                                  # (B, T, in)
    n, tokens = stack.As.shape[0] - 1, x3.shape[1]
    if tokens * n <= _DENSE_TOKENS_X_ADAPTERS:
        delta = _all_at_once(stack, slots, x3)
    else:
        delta = _by_row(stack, slots, x3)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def _by_row(stack: Stack, slots: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    xa = torch.bmm(x3, stack.As[slots].transpose(1, 2))                          # (B, T, R)
    xa = xa * stack.scales[slots][:, None, None]
    return torch.bmm(xa, stack.Bs[slots].transpose(1, 2))                        # (B, T, out)


def _all_at_once(stack: Stack, slots: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    (b, t, _), rank = x3.shape, stack.As.shape[1]
    A = stack.As[1:].reshape(-1, stack.As.shape[2])                              # (n R, in)
    B = stack.Bs[1:].transpose(0, 1).reshape(stack.Bs.shape[1], -1)              # (out, n R)
    xa = (x3 @ A.t()).view(b, t, -1, rank)                                       # (B, T, n, R)
    own = torch.nn.functional.one_hot(slots, stack.As.shape[0])[:, 1:].to(x3.dtype)  # (B, n)
    weight = own * stack.scales[1:]                                              # (B, n): s_i on the row's own block
    xa = xa * weight[:, None, :, None]
    return xa.reshape(b, t, -1) @ B.t()                                          # (B, T, out)
