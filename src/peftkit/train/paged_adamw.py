"""AdamW whose state lives off the accelerator (QLoRA's paged optimizer, done by explicit offload).

The update is torch.optim.AdamW's (decoupled weight decay, Loshchilov & Hutter), per parameter:

    p   <- p (1 - lr wd)
    m   <- m + (1 - b1) (g - m)                      (lerp, as torch does)
    v   <- b2 v + (1 - b2) g^2
    p   <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Only m and v move: for a parameter on an accelerator they are kept in pinned host memory and copied
in for its update and out again afterwards, one parameter at a time, so the accelerator holds one
parameter's state at any moment. bitsandbytes pages the state with unified memory instead; the
saving is the same (2 fp32 tensors per trainable parameter off the device). Parameters on the CPU
keep their state in place, and then every operation is torch's single-tensor AdamW in the same
order, so the results equal ``torch.optim.AdamW(foreach=False)`` bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with m and v offloaded to (pinned) host memory; same arguments as torch's AdamW."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"PagedAdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                             f"eps={eps}, weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        if any(p.is_cuda for g in self.param_groups for p in g["params"]):
            torch.cuda.current_stream().synchronize()  # the copies out have landed before anyone reads them
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        if param.grad.is_sparse:
            raise ValueError("PagedAdamW does not support sparse gradients; use torch.optim.SparseAdam")
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = _host_zeros(param)
            state["exp_avg_sq"] = _host_zeros(param)
        m, v = (state[k].to(param.device, non_blocking=True) for k in ("exp_avg", "exp_avg_sq"))
        state["step"] += 1
        adamw_update(param, param.grad, m, v, state["step"].item(), group)
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


def adamw_update(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: float,
                 group: dict) -> None:
    """One AdamW step in place, in the order of torch's single-tensor AdamW (see the module doc)."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if wd != 0:
        param.mul_(1 - lr * wd)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    param.addcdiv_(m, denom, value=-step_size)


def _host_zeros(param: torch.Tensor) -> torch.Tensor:
    if param.device.type == "cpu":
        return torch.zeros_like(param, memory_format=torch.preserve_format)
    return torch.zeros(param.shape, dtype=param.dtype, device="cpu", pin_memory=True)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    return host.copy_(tensor)
