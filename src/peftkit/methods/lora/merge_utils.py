"""Task-vector arithmetic for combining adapters (the math behind ``add_weighted_adapter``).

Each function takes n task tensors t_1..t_n of one shape and weights w_1..w_n, and returns one
tensor of that shape:

    task arithmetic:   sum_i w_i t_i
    magnitude prune:   sum_i w_i top_k(t_i)                   top_k keeps the k = floor(density * numel)
                                                              entries of largest |t_i|, zeros the rest
    TIES:              disjoint(w_i top_k(t_i))               (Yadav et al., 2023)
    DARE linear:       sum_i w_i (m_i * t_i) / density        m_i ~ Bernoulli(density), elementwise
    DARE TIES:         disjoint(w_i (m_i * t_i) / density)    (Yu et al., 2023)

where ``disjoint`` elects a sign per entry (that of sum_i t_i with "total", of sum_i sign(t_i)
with "frequency"; 0 counts as +) and averages, per entry, only the weighted values that carry the
elected sign: sum_i [sign(t_i) = s] w_i t_i / max(1, #{i : sign(t_i) = s}).

The sign is elected on the pruned tensors before weighting, as in HF PEFT, so a negative weight
flips an adapter's contribution without changing the election. DARE draws its masks with
``torch.bernoulli`` in the order the tensors are given, so a seeded run is reproducible.
"""
from __future__ import annotations

import torch

SIGN_METHODS = ("total", "frequency")


def weighted_sum(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i t_i over the stacked tensors (n, ...) and weights (n,)."""
    return (tensors * weights.view(-1, *([1] * (tensors.dim() - 1)))).sum(dim=0)


def magnitude_mask_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the floor(density * numel) entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k=int(density * flat.numel())).indices] = 1
    return tensor * keep.view_as(tensor)


def random_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale by 1 / density (DARE): the expected
    value of the result is ``tensor``."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * mask / density


def majority_sign_mask(tensors: torch.Tensor, method: str = "total") -> torch.Tensor:
    """(n, ...) bool: where each task tensor's sign agrees with the elected sign of its entry."""
    sign = tensors.sign()
    votes = tensors.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(tensors.dtype)
    return sign == elected


def disjoint_merge(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Per entry, the sum of the agreeing weighted values over how many agree (at least 1)."""
    kept = (weighted * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1.0)


def combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None = None,
            majority_sign_method: str = "total") -> torch.Tensor:
    """Combine task tensors by ``kind``: "linear", "magnitude_prune", "ties", "dare_linear" or "dare_ties"."""
    if kind in ("magnitude_prune", "ties"):
        tensors = [magnitude_mask_prune(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [random_prune(t, density) for t in tensors]
    elif kind != "linear":
        raise ValueError(f"unknown task-arithmetic kind {kind!r}; expected linear, magnitude_prune, ties, "
                         "dare_linear or dare_ties")
    stacked = torch.stack(tensors)  # (n, ...)
    if kind.endswith("ties"):
        agree = majority_sign_mask(stacked, majority_sign_method)
        return disjoint_merge(stacked * weights.view(-1, *([1] * (stacked.dim() - 1))), agree)
    return weighted_sum(stacked, weights)
