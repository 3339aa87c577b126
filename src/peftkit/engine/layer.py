"""What every adapter layer shares: the contract the engine relies on, and merge helpers.

An adapter layer wraps one module of the base model (``base_layer``) and holds any number of named
adapters. The engine only talks to layers through this small contract:

- ``add_adapter(name, config, key)`` / ``delete_adapter(name)`` / ``adapter_names()``
- ``adapter_tensors(name)``: the adapter's own tensors keyed as in the HF file format, relative to
  the layer (``lora_A.weight``); the engine finds adapter weights by asking, never by name search.
  ``saved_tensors(name)`` (optional) is what gets written, by default the same tensors. A layer
  with ``top_level_keys`` true gives whole file keys instead (prompt tuning's ``prompt_embeddings``).
  ``file_tensors`` names the first part of each of those keys (``lora_A``), so that tools reading a
  file without a model (``peftkit inspect``) know the adapter's tensors by asking the registry.
  A layer whose file form differs from its live tensors (diff pruning's sparse diff) also defines
  ``from_saved(name, tensors)``, the inverse of ``saved_tensors``, which loading calls first.
- ``check_batch(names)`` (optional): raise if the layer cannot serve a mixed batch of these rows.
- ``check_delete(name)`` (optional): raise if the layer still needs adapter ``name`` (a fusion over
  it); the engine asks every layer first, so that a refused delete changes nothing.
- ``merge(names, safe)`` / ``unmerge()`` when ``can_merge`` is true; the engine refuses to merge an
  adapter held by a layer whose ``can_merge`` is false (ModulesToSave copies aside).
- ``active_adapters``, ``merged_adapters``, ``disabled`` and ``batch_adapter_names`` (one adapter
  name per row for mixed batches, or None), set by the engine; a layer's forward starts with
  ``route_forward``, which reads them (base alone when disabled, the mixed path for a mixed batch).
"""
from __future__ import annotations

import copy
import warnings
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from peftkit.engine.targets import is_linear

BASE = "__base__"  # name used in mixed batches for rows that use no adapter


class AdapterLayer(nn.Module):
    """Base for adapter wrappers: state bookkeeping only; the math lives in each method's layer."""

    can_merge = True
    # True: forward computes in its input's dtype whatever the dtype of its trainable tensors (it
    # casts them itself), so a bf16 model needs no autocast around it (Trainer, fused kernels)
    keeps_input_dtype = False
    top_level_keys = False  # True: adapter_tensors keys are file keys as they are, not under the module
    file_tensors: tuple[str, ...] = ()  # first part of every adapter_tensors key (``lora_A`` of ``lora_A.weight``)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapter_names: list[str] | None = None

    # -- contract every method implements ----------------------------------------------------
    def add_adapter(self, name: str, config: Any, key: str) -> None:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """What a file holds for this adapter: ``adapter_tensors``, unless the method saves less
        (AdaLoRA writes only the triplets its rank allocator kept)."""
        return self.adapter_tensors(name)

    # -- shared bookkeeping --------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def unmerged_active(self) -> list[str]:
        """Active adapters of this layer whose delta is still applied in forward."""
        own = self.adapter_names()
        return [n for n in self.active_adapters if n in own and n not in self.merged_adapters]

    def base_weight(self) -> torch.Tensor:
        """The wrapped module's weight; for a wrapped block without one of its own (a feed-forward
        block, an attention module), its first linear layer's: new adapter tensors go to its device."""
        weight = getattr(self.base_layer, "weight", None)
        if weight is not None:
            return weight
        return next((m.weight for m in self.base_layer.modules() if is_linear(m)), None)

    def check_delete(self, name: str) -> None:
        """Raise if adapter ``name`` cannot be deleted from this layer (another adapter of the layer
        uses it: a fusion's member); change nothing. The engine asks every layer before deleting."""

    def check_batch(self, names: list[str]) -> None:
        """Raise if this layer cannot run a mixed batch with row adapters ``names`` (LoRA beside an
        adapter whose initialisation rewrote the base weight); the engine asks before setting it."""

    def check_unmerge(self) -> None:
        """Raise if `unmerge` could not restore the base weights; change nothing. The engine asks
        every merged layer first, so that unmerging a model is all or nothing."""


def route_forward(layer: AdapterLayer, own: Callable[..., Any], mixed: Callable[..., Any], x: torch.Tensor,
                  args: tuple, kwargs: dict) -> Any:
    """The start every layer's forward shares: the base alone while adapters are disabled;
    ``mixed(x, *args, **kwargs)`` for a mixed batch (refused while an adapter is merged: rows that
    use another adapter or none cannot take it out); else ``own(x, *args, **kwargs)``, the layer's
    math over its unmerged active adapters."""
    if layer.disabled:
        return layer.base_layer(x, *args, **kwargs)
    if layer.batch_adapter_names is not None:
        if layer.merged:
            raise ValueError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first")
        return mixed(x, *args, **kwargs)
    return own(x, *args, **kwargs)


def additive_forward(layer: AdapterLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """base(x) + sum of ``layer.delta(x, name)`` over its unmerged active adapters (LoRA, AdaLoRA);
    the base alone when disabled; each row with its own adapter in a mixed batch."""
    return route_forward(layer, partial(additive_sum, layer), partial(additive_mixed_forward, layer), x, args, kwargs)


def additive_sum(layer: AdapterLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    for name in layer.unmerged_active():
        result = result + layer.delta(x, name).to(result.dtype)
    return result


def additive_mixed_forward(layer: AdapterLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Each row uses its own adapter (or none): equal to running the rows one by one."""
    result = layer.base_layer(x, *args, **kwargs)
    for name, rows in rows_by_adapter(layer.batch_adapter_names, x.shape[0]).items():
        if name != BASE and name in layer.adapter_names():
            rows = rows.to(x.device)
            result = result.index_add(0, rows, layer.delta(x[rows], name).to(result.dtype))
    return result


def additive_merge(layer: AdapterLayer, names: list[str], safe: bool) -> float:
    """Fold each named, not yet merged adapter's ``layer.delta_weight(name)`` into the base weight;
    return the largest rounding error (LoRA, AdaLoRA)."""
    error = 0.0
    for name in names:
        if name in layer.adapter_names() and name not in layer.merged_adapters:
            error = max(error, merge_into(layer.base_weight(), layer.delta_weight(name), safe, name))
            layer.merged_adapters.append(name)
    layer.last_merge_error = error
    return error


def additive_unmerge(layer: AdapterLayer) -> None:
    """Subtract the merged deltas again, last merged first."""
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        merge_into(layer.base_weight(), layer.delta_weight(name), False, name, sign=-1.0)


def check_finite(adapter: str, *tensors: torch.Tensor) -> None:
    """Raise, naming the adapter, if merging it would put NaN/inf into the weights (safe merge)."""
    if not all(torch.isfinite(t).all() for t in tensors):
        raise ValueError(f"merging adapter {adapter!r} would put NaN/inf into the weights; "
                         "the adapter is broken (check its training run), nothing was changed")


def merge_into(weight: torch.Tensor, delta: torch.Tensor, safe: bool, adapter: str, sign: float = 1.0) -> float:
    """Add ``sign * delta`` to ``weight`` in float32 and round once; return the rounding error.

    Merging in the weight's own low precision would round twice (delta, then sum); doing the sum in
    float32 rounds once. The returned value is max |stored - exact| so callers can report it.
    """
    exact = weight.detach().float() + sign * delta.float()
    if safe:
        check_finite(adapter, exact)
    rounded = exact.to(weight.dtype)
    weight.data.copy_(rounded)
    return (rounded.float() - exact).abs().max().item() if exact.numel() else 0.0


def linear_layout(base_layer: nn.Module) -> tuple[bool, int, int]:
    """(fan_in_fan_out, in_features, out_features) of nn.Linear or GPT-2's Conv1D ((in, out) weight)."""
    fan_in_fan_out = not isinstance(base_layer, nn.Linear)
    rows, cols = base_layer.weight.shape
    return (fan_in_fan_out, rows, cols) if fan_in_fan_out else (fan_in_fan_out, cols, rows)


def sync_fan_in_fan_out(config: Any, layer: nn.Module, key: str) -> None:
    """The layout follows the layer type; correct the config so the saved file says so (as HF does)."""
    if config.fan_in_fan_out != layer.fan_in_fan_out:
        warnings.warn(f"{key} is a {type(layer.base_layer).__name__}: setting fan_in_fan_out="
                      f"{layer.fan_in_fan_out} in the config")
        config.fan_in_fan_out = layer.fan_in_fan_out


def rows_by_adapter(names: list[str], batch: int) -> dict[str, torch.Tensor]:
    """Group row indices by adapter name for a mixed batch (names repeat if rows were expanded)."""
    if batch != len(names):
        if batch % len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch} rows")
        names = [n for n in names for _ in range(batch // len(names))]
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    return {name: torch.tensor(rows) for name, rows in groups.items()}


class ModulesToSave(AdapterLayer):
    """A module trained in full per adapter (e.g. a classification head), saved with the adapter.

    The original module stays untouched for the base model; each adapter owns a trainable copy.
    """

    can_merge = False

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__(original_module)
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str, config: Any, key: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].named_parameters())

    def current(self) -> nn.Module:
        if self.disabled:
            return self.base_layer
        own = [n for n in self.active_adapters if n in self.modules_to_save]
        return self.modules_to_save[own[0]] if own else self.base_layer

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapter_names is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        for name, rows in rows_by_adapter(self.batch_adapter_names, x.shape[0]).items():
            if name in self.modules_to_save:
                rows = rows.to(x.device)
                out[rows] = self.modules_to_save[name](x[rows], *args, **kwargs).to(out.dtype)
        return out
