"""DoRA layers (Liu et al., 2024): weight-decomposed LoRA, around nn.Linear and GPT-2's Conv1D.

    W' = m * (W0 + s B A) / n,    n = ||W0 + s B A|| per output row (the norm runs over `in`)
    h  = W' x + b

W0 (out x in; GPT-2's Conv1D stores it (in, out)) and b stay frozen; A (r x in), B (out x r) and
the magnitude m (out,) train; s = lora_alpha / r (use_rslora: lora_alpha / sqrt(r)). n is a
constant in backward (detached, paper section 4.3, as HF PEFT does): gradients reach m through
f = m / n and A, B through s B A only. Initialisation: A and B as in LoRA, then m = n, which is
||W0|| when B = 0, so a fresh adapter changes nothing (with init_lora_weights=False, B is random
and the adapter starts as plain LoRA, as in HF).

Forward, never forming W' (out x in) for the activations, with f = m / n (out,):
    h = f * (W0 x + s B A x) + b                     one active adapter: LoRA's fused node, then a
                                                     row scale; one (N, out) tensor kept for backward
    h_a = h_{a-1} + (f_a - 1) * (h_{a-1} - b) + f_a * s B_a A_a x      otherwise, h_0 = W x + b

Several adapters apply in turn, as HF PEFT does: each rescales the rows of everything before it,

    W'_a = f_a * (W'_{a-1} + s_a B_a A_a),   W'_0 = W0,   f_a = m_a / ||W0 + s_a B_a A_a||

(each norm taken against W0), in the order the adapters were merged into the stored weight W, then
the unmerged active ones in their active order. So the order matters, and merging the active
adapters in their active order (``merge_adapter()`` does) changes no output.
While training with dropout, an adapter's term is (f_a - 1) * W0 d(x) + f_a * s B_a A_a d(x) with
d = dropout, not the running h (HF's form).
n without forming W0 + s B A either; with w_i, b_i the i-th rows of W0 and B:
    n_i^2 = ||w_i||^2 + 2 s b_i . (A w_i) + s^2 b_i (A A^T) b_i^T      from W0 A^T (out x r), A A^T (r x r)

Merging adapter a adds (f_a - 1) * W + f_a * s B_a A_a to the stored weight W (one rounding) and
keeps n_a; unmerging peels the merged adapters off, last first: W <- W / f_a - s B_a A_a.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.engine.layer import BASE, merge_into, route_forward, rows_by_adapter
from peftkit.kernels.lora_linear import lora_linear
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layer import LoraLinear


def row_norm(w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W0 + s B A|| per output row, float32, without an (out, in) temporary; no gradient.

    w0 (out, in), lora_A (r, in), lora_B (out, r) -> (out,)
    """
    with torch.no_grad():
        wa = (w0 @ lora_A.to(w0.dtype).T).float()                      # (out, r)  W0 A^T
        a, b = lora_A.float(), lora_B.float()
        sq = torch.linalg.vector_norm(w0, dim=1, dtype=torch.float32).square()  # (out,)
        sq = sq + 2 * scaling * (b * wa).sum(1)
        sq = sq + scaling ** 2 * ((b @ (a @ a.T)) * b).sum(1)           # (out, r) . (out, r)
        return sq.clamp_min(0).sqrt()


def row_norm_reference(w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The slow twin of ``row_norm``: form W0 + s B A and take its row norms (as HF PEFT does)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(w0.float() + scaling * (lora_B.float() @ lora_A.float()), dim=1)


class DoraLinear(LoraLinear):
    """DoRA around ``nn.Linear`` or GPT-2's ``Conv1D``: LoRA's factors plus a magnitude per row."""

    file_tensors = ("lora_A", "lora_B", "lora_magnitude_vector")
    keeps_input_dtype = False  # not checked for its magnitudes' path: the Trainer keeps autocast on

    def __init__(self, base_layer: nn.Module) -> None:
        if not base_layer.weight.is_floating_point():
            raise ValueError(f"DoRA needs a floating-point base weight; {type(base_layer).__name__} stores "
                             f"{base_layer.weight.dtype}: use plain LoRA on quantized layers")
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()
        self.merged_norms: dict[str, torch.Tensor] = {}  # n_a when adapter a was merged (out,)

    def add_adapter(self, name: str, config: LoraConfig, key: str) -> None:
        super().add_adapter(name, config, key)
        with torch.no_grad():
            self.lora_magnitude_vector[name].copy_(self.norm(name, self.unmerged_weight()))

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {**super().adapter_tensors(name), "lora_magnitude_vector": self.lora_magnitude_vector[name]}

    def make_factors(self, name: str, r: int) -> None:
        super().make_factors(name, r)
        self.lora_magnitude_vector[name] = nn.Parameter(torch.empty(self.out_features))  # set in add_adapter

    def drop_factors(self, name: str) -> None:
        super().drop_factors(name)
        del self.lora_magnitude_vector[name]

    # -- the decomposition ---------------------------------------------------------------------
    def unmerged_weight(self) -> torch.Tensor:
        """W0 (out, in): a view of the stored weight, or (float32) with merged adapters taken out."""
        w = self.base_weight()
        w = w.T if self.fan_in_fan_out else w
        if not self.merged_adapters:
            return w
        with torch.no_grad():
            w = w.float()
            for name in reversed(self.merged_adapters):  # W'_a = f_a (W'_{a-1} + s B A), undone
                f = self.lora_magnitude_vector[name].float() / self.merged_norms[name]  # (out,)
                w = w / f[:, None] - self.scaled_product(name)
            return w

    def scaled_product(self, name: str) -> torch.Tensor:
        """s B A (out, in) in float32."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def norm(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        return row_norm(w0, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def dora_scale(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        """f = m / n (out,): the gradient reaches m, never n."""
        return self.lora_magnitude_vector[name] / self.norm(name, w0)

    def dropping(self, name: str) -> bool:
        return self.training and self.dropout_p[name] > 0

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return route_forward(self, self.active_forward, self.mixed_forward, x, args, kwargs)

    def active_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self.unmerged_active()
        if len(names) == 1 and not self.merged_adapters and not self.dropping(names[0]):
            return self.rescaled_forward(x, names[0])
        result = self.base_layer(x, *args, **kwargs)
        for name in names:  # in turn: each rescales what came before it
            result = result + self.dora_delta(x, name, self.without_bias(result)).to(result.dtype)
        return result

    def rescaled_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """f * (W0 x + s B A x) + b, the LoRA output of the unmerged weight scaled per row."""
        w0 = self.unmerged_weight()                                              # (out, in) view
        z = lora_linear(x, w0, None, self.lora_A[name].weight, self.lora_B[name].weight,
                        self.scaling[name])                                      # (..., out)
        h = z * self.dora_scale(name, w0).to(z.dtype)
        bias = self.base_layer.bias
        return h if bias is None else h + bias.to(h.dtype)

    def dora_delta(self, x: torch.Tensor, name: str, base0: torch.Tensor | None = None) -> torch.Tensor:
        """(f - 1) * base0 + f * s B A x for one adapter; ``base0`` is what the adapter rescales (W0 x
        alone, or the output of the adapters before it less the bias), W0 d(x) when dropping."""
        w0 = self.unmerged_weight()
        f = self.dora_scale(name, w0).to(x.dtype)                               # (out,)
        h = self.lora_dropout[name](x)
        if base0 is None or self.dropping(name):
            base0 = F.linear(h, w0.to(h.dtype))                                  # (..., out)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        low = F.linear(F.linear(h, a.to(h.dtype)), b.to(h.dtype)) * self.scaling[name]  # (..., out)
        return (f - 1) * base0 + f * low

    def without_bias(self, result: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return result if bias is None else result - bias.to(result.dtype)

    def mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row uses its own adapter (or none): equal to running the rows one by one."""
        result = self.base_layer(x, *args, **kwargs)
        base0 = self.without_bias(result)
        for name, rows in rows_by_adapter(self.batch_adapter_names, x.shape[0]).items():
            if name != BASE and name in self.adapter_names():
                rows = rows.to(x.device)
                delta = self.dora_delta(x[rows], name, base0[rows])
                result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    # -- merging -------------------------------------------------------------------------------
    def delta_weight(self, name: str, w0: torch.Tensor | None = None,
                     before: torch.Tensor | None = None) -> torch.Tensor:
        """W'_a - W'_{a-1} = (f - 1) * W'_{a-1} + f * s B A, float32, the base weight's layout;
        ``before`` is W'_{a-1} (out, in), W0 when not given (the adapter alone)."""
        with torch.no_grad():
            w0 = (self.unmerged_weight() if w0 is None else w0).float()         # (out, in)
            before = w0 if before is None else before.float()
            f = self.dora_scale(name, w0).float()[:, None]                       # (out, 1)
            delta = (f - 1) * before + f * self.scaled_product(name)             # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, names: list[str], safe: bool = False) -> float:
        """Fold the named adapters into the stored weight in turn, in the order given (each norm
        against W0); return the largest rounding error."""
        todo = [n for n in names if n in self.adapter_names() and n not in self.merged_adapters]
        self.warn_reorder(todo)
        w0 = self.unmerged_weight().detach().clone()  # (out, in); a copy, as the stored weight changes below
        error = 0.0
        for name in todo:
            stored = self.base_weight()
            before = stored.T if self.fan_in_fan_out else stored                 # W'_{a-1} (out, in)
            error = max(error, merge_into(stored, self.delta_weight(name, w0, before), safe, name))
            self.merged_norms[name] = self.norm(name, w0)
            self.merged_adapters.append(name)
        self.last_merge_error = error
        return error

    def warn_reorder(self, todo: list[str]) -> None:
        """Active adapters apply merged ones first: merging them out of their active order changes h."""
        waiting = self.unmerged_active()
        moved = [n for n in todo if n in waiting]
        if moved != waiting[:len(moved)]:
            warnings.warn(f"DoRA adapters apply in turn (as in HF PEFT), merged ones first: merging {moved} "
                          f"ahead of the active adapters {waiting} reorders them and changes the output; "
                          "merge active adapters in their active order (merge_adapter() with no names does)")

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        w0 = self.unmerged_weight()                                              # (out, in)
        weight = self.base_weight()
        weight.data.copy_((w0.T if self.fan_in_fan_out else w0).to(weight.dtype))
        self.merged_adapters.clear()
        self.merged_norms.clear()


class DoraUnsupported:
    """The wrapper for every other layer type: building it raises, saying what to do instead."""

    def __init__(self, base_layer: nn.Module) -> None:
        raise ValueError(f"DoRA adapts nn.Linear and GPT-2 Conv1D layers only, not {type(base_layer).__name__}: "
                         "remove this module from target_modules (or list it in exclude_modules), "
                         "or adapt it with a separate plain LoRA adapter")
