"""AdapterFusion (Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning"): a trained attention over the outputs of N frozen bottleneck adapters.

At a layer whose output h (d features) carries the member adapters, with a_i = s_i up_i(act_i(down_i(h)))
the i-th adapter's contribution before its residual add (what ``BottleneckLayer.adapter_output``
returns), per token:

    q   = W_Q h + b_Q                 k_i = W_K a_i + b_K            v_i = W_V a_i + b_V
    w_i = softmax_i(q . k_i / T)      (over the N adapters, per token; no 1/sqrt(d))
    h'  = h + sum_i w_i v_i

W_Q, W_K, W_V are d x d (nn.Linear, so ``W h`` is ``h @ W.T``); they are the only tensors that train.
The member adapters (and the base layer) stay frozen unless activated beside the fusion
(``set_adapter([fusion, member])``); then the member trains through the fusion, and its output is
still used only there, never added to h' a second time.

Choices where the paper leaves room:
- Keys and values are the adapter deltas a_i, not h + a_i, and the residual h is added once, after
  the attention. So a one-hot w with W_V = I gives exactly h + a_i, the i-th adapter alone, and the
  softmax compares what the adapters add rather than the h they all share.
- Initialisation (the paper's): W_Q, W_K ~ N(0, init_std^2); W_V = I + N(0, value_noise^2); biases 0.
  Then q . k_i is near 0, w near uniform, and h' is near h + mean_i a_i: the fusion starts as the
  average of its members. (init_std must be > 0: with W_Q = W_K = 0 neither gets a gradient.)
- Optional regulariser (the paper's, as an extra loss the trainer adds): lambda * sum over the
  fusion's layers of ||W_V - I||_F^2 (``value_regularization`` = lambda; 0 turns it off).
- Temperature: T = ``temperature`` in eval mode; in training mode T may anneal linearly from
  ``temperature_start`` to ``temperature`` over ``anneal_steps`` optimizer steps (``after_step``
  hook). Eval always uses the end value, so a saved and reloaded fusion reproduces the trained one
  whether or not the schedule had finished.
- AdapterDrop: a member skipped at this layer (its drop setting) leaves the softmax there; if every
  member is skipped, the fusion adds nothing at this layer.

File keys: ``<module>.adapter_fusion.query.weight`` / ``.bias`` and the same for ``key`` and ``value``.
"""
from __future__ import annotations

import torch
from torch import nn

from peftkit.methods.adapter.fusion_config import FusionConfig


class FusionAttention(nn.Module):
    """W_Q, W_K, W_V of one fusion at one layer, and the temperatures it uses."""

    def __init__(self, d: int, config: FusionConfig, device: torch.device | None = None) -> None:
        super().__init__()
        linear = dict(bias=config.use_bias, device=device, dtype=torch.float32)
        self.query, self.key, self.value = (nn.Linear(d, d, **linear) for _ in range(3))
        self.members = list(config.adapter_names)
        self.temperature = float(config.temperature)  # eval mode
        self.train_temperature = config.train_temperature(0)  # training mode, moved by the anneal hook
        self.reset(config)

    @torch.no_grad()
    def reset(self, config: FusionConfig) -> None:
        nn.init.normal_(self.query.weight, std=config.init_std)
        nn.init.normal_(self.key.weight, std=config.init_std)
        nn.init.normal_(self.value.weight, std=config.value_noise)
        self.value.weight.add_(torch.eye(self.value.weight.shape[0], device=self.value.weight.device))
        for part in (self.query, self.key, self.value):
            if part.bias is not None:
                nn.init.zeros_(part.bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fusion's own tensors, keyed relative to ``adapter_fusion`` (``query.weight``, ...)."""
        return dict(self.named_parameters())

    def forward(self, h: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """sum_i w_i v_i for h (..., d) and the stacked adapter outputs a (..., N, d); (..., d)."""
        h, outputs = h.to(self.query.weight.dtype), outputs.to(self.query.weight.dtype)
        q = self.query(h)  # (..., d)
        k, v = self.key(outputs), self.value(outputs)  # (..., N, d) each
        scores = (k @ q.unsqueeze(-1)).squeeze(-1)  # (..., N): q . k_i
        temperature = self.train_temperature if self.training else self.temperature
        weights = torch.softmax(scores / temperature, dim=-1)  # (..., N)
        return (weights.unsqueeze(-2) @ v).squeeze(-2)  # (..., d): sum_i w_i v_i

    def value_distance(self) -> torch.Tensor:
        """||W_V - I||_F^2, the regulariser's term for this layer."""
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device, dtype=self.value.weight.dtype)
        return (self.value.weight - eye).pow(2).sum()
