"""AdamW whose state lives off the accelerator (QLoRA's paged optimizer, done by explicit offload).

The update is torch.optim.AdamW's (decoupled weight decay, Loshchilov & Hutter), per parameter:

    p   <- p (1 - lr wd)
    m   <- m + (1 - b1) (g - m)                      (lerp, as torch does)
    v   <- b2 v + (1 - b2) g^2
    p   <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Only m and v move: for parameters on an accelerator they are kept in pinned host memory. A step
copies them in, a chunk of parameters at a time (at most ``chunk_bytes`` of state on the device at
once), updates the chunk with torch's multi-tensor (foreach) kernels and copies the state back
out. bitsandbytes pages the state with unified memory instead; the saving is the same (2 fp32
tensors per trainable parameter off the device). The operations are those of torch's AdamW, in its
order, so the results equal ``torch.optim.AdamW(foreach=False)`` bit for bit on the CPU (where the
foreach ops run tensor by tensor) and ``torch.optim.AdamW(foreach=True)`` on CUDA.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with m and v offloaded to (pinned) host memory; same arguments as torch's AdamW."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, chunk_bytes: int = 256 * 2**20) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"PagedAdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                             f"eps={eps}, weight_decay={weight_decay}, betas={betas}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1 (bytes of optimizer state on the device at once), got {chunk_bytes}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.chunk_bytes = chunk_bytes

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                self._init_state(param)
            for chunk in _chunks(params, self.chunk_bytes):
                self._update(chunk, group)
        if any(p.is_cuda for g in self.param_groups for p in g["params"]):
            torch.cuda.current_stream().synchronize()  # the copies out have landed before anyone reads them
        return loss

    def _init_state(self, param: torch.Tensor) -> None:
        if param.grad.is_sparse:
            raise ValueError("PagedAdamW does not support sparse gradients; use torch.optim.SparseAdam")
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = _host_zeros(param)
            state["exp_avg_sq"] = _host_zeros(param)

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        """Page one chunk's state in, update it (same device and dtype throughout), page it out."""
        states = [self.state[p] for p in params]
        device = params[0].device
        ms = [s["exp_avg"].to(device, non_blocking=True) for s in states]
        vs = [s["exp_avg_sq"].to(device, non_blocking=True) for s in states]
        for state in states:
            state["step"] += 1
        adamw_update(params, [p.grad for p in params], ms, vs, [s["step"].item() for s in states], group)
        for state, m, v in zip(states, ms, vs):
            if m.data_ptr() != state["exp_avg"].data_ptr():  # it was copied in: copy it back out
                state["exp_avg"].copy_(m, non_blocking=True)
                state["exp_avg_sq"].copy_(v, non_blocking=True)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch moves loaded state onto each parameter's device; put it back on the host."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = _host_copy(state[key])


def adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], ms: list[torch.Tensor],
                 vs: list[torch.Tensor], steps: list[float], group: dict) -> None:
    """One AdamW step in place on lists of tensors, in the order of torch's AdamW (see the module doc)."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(ms, grads, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_div_(denoms, [(1 - beta2 ** step) ** 0.5 for step in steps])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, ms, denoms, [-lr / (1 - beta1 ** step) for step in steps])


def _chunks(params: list[torch.Tensor], budget: int) -> list[list[torch.Tensor]]:
    """Parameters cut into runs of one device and dtype whose state (m and v) fits ``budget`` bytes.

    A single parameter larger than the budget is a chunk of its own."""
    chunks: list[list[torch.Tensor]] = []
    used = 0
    for param in params:
        size = 2 * param.numel() * param.element_size()
        last = chunks[-1] if chunks else None
        fits = last is not None and used + size <= budget
        if fits and (last[0].device, last[0].dtype) == (param.device, param.dtype):
            last.append(param)
            used += size
        else:
            chunks.append([param])
            used = size
    return chunks


def _host_zeros(param: torch.Tensor) -> torch.Tensor:
    if param.device.type == "cpu":
        return torch.zeros_like(param, memory_format=torch.preserve_format)
    return torch.zeros(param.shape, dtype=param.dtype, device="cpu", pin_memory=True)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    return host.copy_(tensor)
