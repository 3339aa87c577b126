"""Combine LoRA adapters into a new one (HF PEFT's ``add_weighted_adapter``).

With adapters i = 1..n, weights w_i, scalings s_i and factors A_i (r_i x in), B_i (out x r_i), the
new adapter has lora_alpha = r' (so scaling 1) and factors A', B' from one of three families:

- "cat" (exact): A' = [w_1 s_1 A_1; ...; w_n s_n A_n] (rows stacked), B' = [B_1 ... B_n]
  (columns), so B' A' = sum_i w_i s_i B_i A_i with r' = sum_i r_i.
- "svd" kinds (exact up to rank r'): dW = combine(kind, [s_i B_i A_i], w), then the truncated SVD
  dW ~ U_r' S_r' V_r'^T gives B' = U_r' S_r', A' = V_r'^T, optionally clamped to the
  ``svd_clamp`` quantile of their entries. r' = svd_rank, or the largest r_i.
- factor-wise kinds ("linear", "ties", ...; approximate): A' = combine(kind, [A_i], sign(w_i s_i)
  sqrt|w_i s_i|) and B' = combine(kind, [B_i], sqrt|w_i s_i|), all r_i equal. B' A' then holds cross
  terms B_i A_j (i != j): prefer "cat" or "svd" where the rank allows.

``combine`` is in merge_utils.py ("ties" for "ties_svd", and so on). Factors are found by
structure: rank is dimension 0 of A and dimension 1 of B for every LoRA layer type (linear, conv,
embedding); convolution deltas are flattened to (out, in * kernel) for the SVD, and GPT-2 Conv1D
and embedding deltas transposed to (out, in) first, so that dW = B A.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from peftkit.config import check_field
from peftkit.engine.layer import ModulesToSave
from peftkit.methods.lora.layer import LoraConv, LoraEmbedding, LoraLayer
from peftkit.methods.lora.merge_utils import SIGN_METHODS, combine
from peftkit.registry import method_for_config

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_KINDS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = FACTORWISE + ("cat",) + SVD_KINDS
NO_DENSITY = ("linear", "cat", "svd")


@dataclass(frozen=True)
class WeightedOptions:
    """How ``add_weighted_adapter`` combines (argument names as in HF PEFT)."""

    combination_type: str = "svd"  # one of COMBINATION_TYPES
    svd_rank: int | None = None  # rank of an svd kind's result; None: the largest source rank
    svd_clamp: float | None = None  # clamp the SVD factors to this quantile of their entries, in [0, 1]
    svd_full_matrices: bool = True  # torch.linalg.svd's full_matrices
    svd_driver: str | None = None  # torch.linalg.svd's driver (CUDA only)
    density: float | None = None  # fraction of entries kept by the pruning kinds, in [0, 1]
    majority_sign_method: str = "total"  # how TIES elects each entry's sign: "total" or "frequency"

    def __post_init__(self) -> None:
        kind = self.combination_type
        check_field(kind in COMBINATION_TYPES, "combination_type", kind, f"one of {list(COMBINATION_TYPES)}")
        check_field(self.svd_rank is None or (isinstance(self.svd_rank, int) and self.svd_rank > 0),
                    "svd_rank", self.svd_rank, "an integer > 0 or None")
        check_field(self.svd_clamp is None or 0 <= self.svd_clamp <= 1, "svd_clamp", self.svd_clamp,
                    "a quantile in [0, 1] or None")
        check_field(self.majority_sign_method in SIGN_METHODS, "majority_sign_method",
                    self.majority_sign_method, f"one of {list(SIGN_METHODS)}")
        if kind not in NO_DENSITY:
            check_field(isinstance(self.density, (int, float)) and 0 <= self.density <= 1, "density",
                        self.density, f"a fraction in [0, 1] (combination_type {kind!r} prunes each adapter to it)")

    @property
    def base_kind(self) -> str:
        """The task-arithmetic kind applied before an SVD ("ties" for "ties_svd", "linear" for "svd")."""
        return "linear" if self.combination_type == "svd" else self.combination_type.removesuffix("_svd")


def add_weighted_adapter(adapter_model, adapters: list[str], weights: list[float], adapter_name: str,
                         options: WeightedOptions) -> None:
    """Add adapter ``adapter_name`` combined from ``adapters`` (not activated); on error, no trace."""
    if adapter_name in adapter_model.peft_config:
        warnings.warn(f"an adapter named {adapter_name!r} already exists; add_weighted_adapter did nothing "
                      "(as in HF PEFT): pick a new name or delete it first")
        return
    check_sources(adapter_model, adapters, weights)
    if len(adapters) == 1:  # one adapter: a weighted copy, exact with the factor-wise formula
        options = dataclasses.replace(options, combination_type="linear")
    adapter_model.add_adapter(adapter_name, combined_config(adapter_model, adapters, options))
    try:
        layers = check_same_layers(adapter_model, adapters, adapter_name)
        with torch.no_grad():
            for layer in layers:
                fill_layer(layer, adapters, weights, adapter_name, options)
            copy_saved_modules(adapter_model, adapters, adapter_name)
    except Exception:
        adapter_model._remove_traces(adapter_name)
        adapter_model.refresh_trainable()
        raise


# -- checks ------------------------------------------------------------------------------------
def check_sources(adapter_model, adapters: list[str], weights: list[float]) -> None:
    """The adapters exist, are plain LoRA, have a weight each, and train no module copy in common."""
    if not adapters:
        raise ValueError("adapters is empty: name the LoRA adapters to combine")
    unknown = [n for n in adapters if n not in adapter_model.peft_config]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; existing: {sorted(adapter_model.peft_config)}")
    for name in adapters:
        spec = method_for_config(adapter_model.peft_config[name])
        if spec.name != "lora":
            raise ValueError(f"add_weighted_adapter combines LoRA adapters, but {name!r} is a {spec.name} adapter; "
                             "combine only plain LoRA adapters (no DoRA, AdaLoRA or other methods)")
    if len(weights) != len(adapters) or not all(isinstance(w, (int, float)) for w in weights):
        raise ValueError(f"weights must be one number per adapter: got {len(weights)} weight(s) {list(weights)} "
                         f"for {len(adapters)} adapter(s) {adapters}")
    for key, layer in adapter_model.adapter_layers():
        owners = [n for n in adapters if isinstance(layer, ModulesToSave) and n in layer.adapter_names()]
        if len(owners) > 1:
            raise ValueError(f"adapters {owners} each train their own copy of module {key!r} (modules_to_save), "
                             "which cannot be combined; combine adapters whose modules_to_save do not overlap")


def source_rank(config) -> int:
    """The largest rank an adapter's config gives any layer (HF's rule for the new rank)."""
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def new_rank(adapter_model, adapters: list[str], options: WeightedOptions) -> int:
    ranks = [source_rank(adapter_model.peft_config[n]) for n in adapters]
    kind = options.combination_type
    if kind == "cat":
        return sum(ranks)
    if kind in SVD_KINDS:
        return options.svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise ValueError(f"combination_type {kind!r} combines the factors A and B entry by entry, so every adapter "
                         f"needs the same rank, but {adapters} have ranks {ranks}; use 'cat' or 'svd' (any ranks)")
    return ranks[0]


def combined_targets(adapter_model, adapters: list[str]) -> list[str] | str:
    """The union of the adapters' target_modules (lists), or their regexes joined with '|'."""
    found = [adapter_model.peft_config[n].target_modules for n in adapters]
    if len({isinstance(t, str) for t in found}) > 1:
        raise ValueError(f"adapters {adapters} mix target_modules given as a regex string and as a list "
                         f"({found}); give them all in the same form to combine them")
    if isinstance(found[0], str):
        return found[0] if len(set(found)) == 1 else "|".join(f"({t})" for t in found)
    return sorted({t for targets in found for t in targets})


def combined_config(adapter_model, adapters: list[str], options: WeightedOptions):
    """The first adapter's config with rank r', lora_alpha r' (scaling 1), the union of targets and
    modules_to_save, and the default initialisation (the factors are overwritten; an initialisation
    that rewrites base weights, such as PiSSA, must not run again)."""
    first = adapter_model.peft_config[adapters[0]]
    rank = new_rank(adapter_model, adapters, options)
    saved = sorted({m for n in adapters for m in (adapter_model.peft_config[n].modules_to_save or [])})
    return dataclasses.replace(first, r=rank, lora_alpha=rank, target_modules=combined_targets(adapter_model, adapters),
                               rank_pattern={}, alpha_pattern={}, use_rslora=False, init_lora_weights=True,
                               modules_to_save=saved or None)


def check_same_layers(adapter_model, adapters: list[str], name: str) -> list[LoraLayer]:
    """The LoRA layers of the new adapter, which must be exactly those holding a source adapter."""
    layers = {key: layer for key, layer in adapter_model.adapter_layers() if isinstance(layer, LoraLayer)}
    new = {k for k, layer in layers.items() if name in layer.adapter_names()}
    old = {k for k, layer in layers.items() if any(n in layer.adapter_names() for n in adapters)}
    if new != old:
        extra, lost = sorted(new - old), sorted(old - new)
        raise ValueError(f"the combined adapter's targets (the union of target_modules, with the other options of "
                         f"{adapters[0]!r}) do not match the adapted modules: none of {adapters} adapts {extra[:3]}; "
                         f"{lost[:3]} would be left out. Combine adapters with the same exclude_modules, "
                         "layers_to_transform and layers_pattern")
    return [layers[k] for k in layers if k in new]


# -- per layer ---------------------------------------------------------------------------------
def factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of adapter ``name``, by the layer's own tensor names (``file_tensors``: A first)."""
    tensors = layer.adapter_tensors(name)
    a_name, b_name = layer.file_tensors
    pick = lambda part: next(t for k, t in tensors.items() if k.split(".")[0] == part)  # noqa: E731
    return pick(a_name), pick(b_name)


def fill_layer(layer: LoraLayer, adapters: list[str], weights: list[float], name: str,
               options: WeightedOptions) -> None:
    """Write the combined factors of the adapters this layer holds into adapter ``name``."""
    present = [(n, w) for n, w in zip(adapters, weights) if n in layer.adapter_names()]
    kind = options.combination_type
    new_a, new_b = factors(layer, name)
    if kind == "cat":
        a, b = cat_factors(layer, present)
    elif kind in SVD_KINDS:
        a, b = svd_factors(layer, present, new_a.shape, new_b.shape, options)
    else:
        a, b = factorwise(layer, present, options)
    write_rank_slice(new_a, a, dim=0)
    write_rank_slice(new_b, b, dim=1)


def write_rank_slice(target: torch.Tensor, value: torch.Tensor, dim: int) -> None:
    """target = value along the first value.shape[dim] ranks, zero beyond (a smaller combined rank)."""
    target.zero_()
    target.narrow(dim, 0, value.shape[dim]).copy_(value)


def cat_factors(layer: LoraLayer, present: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A' = [w_i s_i A_i] stacked over ranks, B' = [B_i] side by side: B' A' = sum_i w_i s_i B_i A_i."""
    pairs = [factors(layer, n) for n, _ in present]
    a = torch.cat([pair[0] * w * layer.scaling[n] for pair, (n, w) in zip(pairs, present)], dim=0)
    return a, torch.cat([pair[1] for pair in pairs], dim=1)


def factorwise(layer: LoraLayer, present: list[tuple[str, float]],
               options: WeightedOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """A' and B' each combined entry by entry, weights split as sign * sqrt|w s| onto A and sqrt|w s| onto B."""
    pairs = [factors(layer, n) for n, _ in present]
    shapes = {tuple(a.shape) for a, _ in pairs}
    if len(shapes) > 1:
        raise ValueError(f"combination_type {options.combination_type!r} needs equal ranks in every layer, but the "
                         f"adapters' A factors have shapes {sorted(shapes)} here (rank_pattern?); use 'cat' or 'svd'")
    scaled = [w * layer.scaling[n] for n, w in present]
    w_a = torch.tensor([math.copysign(math.sqrt(abs(v)), v) for v in scaled])
    w_b = torch.tensor([math.sqrt(abs(v)) for v in scaled])
    extra = dict(density=options.density, majority_sign_method=options.majority_sign_method)
    a = combine(options.combination_type, [p[0].detach() for p in pairs], w_a.to(pairs[0][0].device), **extra)
    b = combine(options.combination_type, [p[1].detach() for p in pairs], w_b.to(pairs[0][1].device), **extra)
    return a, b


def product_form(layer: LoraLayer, delta: torch.Tensor) -> torch.Tensor:
    """A layer's delta (its weight's layout) as the matrix B A: (out, in), or (out, in * kernel)."""
    if isinstance(layer, LoraConv):
        return delta.flatten(1)
    if isinstance(layer, LoraEmbedding) or getattr(layer, "fan_in_fan_out", False):
        return delta.T  # (vocab, dim) or GPT-2's (in, out) -> (out, in)
    return delta


def svd_factors(layer: LoraLayer, present: list[tuple[str, float]], a_shape: torch.Size, b_shape: torch.Size,
                options: WeightedOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of the combined delta: B' = U_r S_r (out, r), A' = V_r^T (r, in), as the layer's shapes."""
    deltas = [layer.delta_weight(n) for n, _ in present]  # float32, each already scaled by s_i
    weights = torch.tensor([w for _, w in present], device=deltas[0].device)
    delta = combine(options.base_kind, deltas, weights, options.density, options.majority_sign_method)
    u, s, vh = torch.linalg.svd(product_form(layer, delta), full_matrices=options.svd_full_matrices,
                                driver=options.svd_driver)
    rank = a_shape[0]
    u, vh = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]  # (out, k), (k, in); k = min(rank, out, in)
    if options.svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), options.svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    kept = vh.shape[0]
    return vh.reshape(kept, *a_shape[1:]), u.reshape(b_shape[0], kept, *b_shape[2:])  # (k, in, *kernel), (out, k, 1, ..)


def copy_saved_modules(adapter_model, adapters: list[str], name: str) -> None:
    """The new adapter's modules_to_save copies start as the (single) source adapter's trained copy."""
    for _, layer in adapter_model.adapter_layers():
        if isinstance(layer, ModulesToSave) and name in layer.adapter_names():
            owner = next((n for n in adapters if n in layer.adapter_names()), None)
            if owner is not None:
                layer.modules_to_save[name].load_state_dict(layer.modules_to_save[owner].state_dict())


__all__ = ["WeightedOptions", "add_weighted_adapter", "COMBINATION_TYPES"]
