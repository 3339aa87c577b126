"""The injection engine: wraps target modules with a method's adapter layers and manages them.

One ``AdapterModel`` holds the base model (``.model``) and any number of named adapters, each
with its own config and method. It never names a method: the registry says which wrapper a module
gets, and layers follow the contract in ``engine/layer.py``.

A composite method (MAM, UniPELT: ``MethodSpec.parts``) makes one adapter out of several ordinary
methods' parts: each part wraps its own modules under the adapter's name, so everything keyed by
name (switching, deleting, disabling, saving) covers all of them, and each part's hooks run with a
``PartView`` of this model in which ``peft_config[name]`` is the part's config.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import nn

from peftkit.engine import targets
from peftkit.engine.layer import BASE, AdapterLayer, ModulesToSave, check_finite
from peftkit.kernels import adapter_casts
from peftkit.registry import method_for_config

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class PartView:
    """The adapter model as one part of a composite adapter sees it: ``peft_config[name]`` is the
    part's own config (a method's hooks read their options there, e.g. prefix tuning its sizes);
    every other attribute is the adapter model's."""

    def __init__(self, adapter_model: "AdapterModel", name: str, config: Any) -> None:
        self._adapter_model, self._name, self._config = adapter_model, name, config

    @property
    def peft_config(self) -> dict[str, Any]:
        return {**self._adapter_model.peft_config, self._name: self._config}

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._adapter_model, attr)


class AdapterModel(nn.Module):
    """Base model plus named adapters. Keys match HF PEFT's ``LoraModel`` (``model.`` prefix)."""

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, Any] = {}
        # adapter -> [(spec, part config)]: a composite's parts, or [(spec, None)] for a plain method
        self.parts: dict[str, list[tuple[Any, Any]]] = {}
        self.active_adapters: list[str] = []
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.last_merge_error = 0.0
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with adapter_casts.scope():  # one pass: fused LoRA nodes cast their factors once for all
            found = self._input_adapter("prepare_inputs")
            if found is None:
                return self.model(*args, **kwargs)
            hook, name = found
            if args:  # the hook rewrites input_ids, so take it by name
                kwargs = {"input_ids": args[0], **kwargs}
                args = args[1:]
            return self.model(*args, **hook(name, kwargs))

    @contextmanager
    def generating(self) -> Iterator[None]:
        """Context for ``generate``: lets an active input-level adapter (prompt tuning) take part."""
        found = self._input_adapter("generating")
        if found is None:
            yield
            return
        hook, name = found
        with hook(name):
            yield

    def _input_adapter(self, hook_name: str, names: list[str] | None = None) -> tuple[Callable, str] | None:
        """(hook bound to its view of the model, adapter) for the one active adapter (of ``names``)
        whose method, or a part of it, acts at the input."""
        names = self.active_adapters if names is None else names
        found = [(partial(hook, owner), n) for n in names for hook, owner in self._hooks(n, hook_name)]
        if len(found) > 1:
            raise ValueError(f"adapters {[n for _, n in found]} all act at the input (prompt tuning) and cannot be "
                             "active together; set_adapter() one of them")
        return found[0] if found else None

    # -- layers --------------------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """(name relative to the base model, layer) for every adapter wrapper."""
        for key, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield key, module

    def add_adapter(self, name: str, config: Any) -> None:
        """Inject a new adapter (each part of a composite one); on any error the model is left as it was."""
        self._check_new_name(name)
        spec = method_for_config(config)
        if spec.prepare_config is not None:
            spec.prepare_config(config, self.model)
        parts = self._expand(config, spec)
        self.peft_config[name], self.parts[name] = config, parts
        try:
            self._inject_parts(name, parts, config, spec)
            for key in self._modules_to_save_keys(config):
                self._wrap_to_save(key, name, config)
            for hook, owner in self._hooks(name, "after_inject"):
                hook(owner, name)
        except Exception:
            self._remove_traces(name)
            raise
        self.refresh_trainable()

    def _expand(self, config: Any, spec: Any) -> list[tuple[Any, Any]]:
        """A composite config's parts [(spec, part config)], each prepared for the model; a plain
        method's [(spec, None)] (its hooks see the adapter model itself)."""
        if spec.parts is None:
            return [(spec, None)]
        parts = spec.parts(config, self.model)
        for part_spec, part in parts:
            if part_spec.prepare_config is not None:
                part_spec.prepare_config(part, self.model)
        at_input = [s.name for s, _ in parts if s.prepare_inputs is not None]
        if len(at_input) > 1:
            raise ValueError(f"a {spec.name} adapter has several parts acting at the input ({at_input}); "
                             "keep one of them")
        return parts

    def _inject_parts(self, name: str, parts: list[tuple[Any, Any]], config: Any, spec: Any) -> None:
        """Wrap each part's targets in turn, found just before it wraps them: a part may wrap a module
        holding an earlier part's layers (UniPELT's prefix gate around an attention whose q/v hold its
        LoRA; their keys then pass through ``base_layer``), but two parts may not wrap one module."""
        owners: dict[str, str] = {}
        for part_spec, part in parts:
            part = config if part is None else part
            for key in self._target_keys(part, part_spec):
                if key in owners:
                    raise ValueError(f"the {owners[key]} and {part_spec.name} parts of this {spec.name} adapter both "
                                     f"target module {key!r}; a module takes one part: change the target_modules "
                                     "of one of them")
                owners[key] = part_spec.name
                self._wrap(key, name, part, part_spec)

    def _hooks(self, name: str, hook_name: str) -> list[tuple[Callable, Any]]:
        """(hook, the model as the hook sees it) for each part of adapter ``name`` whose method has
        ``hook_name`` (one pair at most for a plain method)."""
        return [(getattr(spec, hook_name), self._owner(name, part)) for spec, part in self.parts[name]
                if getattr(spec, hook_name) is not None]

    def _owner(self, name: str, part: Any) -> Any:
        return self if part is None else PartView(self, name, part)

    def _target_keys(self, config: Any, spec: Any) -> list[str]:
        if spec.find_targets is not None:  # the method picks its modules itself (prompt tuning)
            return spec.find_targets(self.model, config)
        keys = targets.find_targets(self.model, config, skip=self._save_module_keys())
        for entry in targets.unmatched_entries(config, keys):
            warnings.warn(f"target_modules entry {entry!r} matched no module; check its spelling")
        return keys

    def _check_new_name(self, name: str) -> None:
        if name in self.peft_config:
            raise ValueError(f"an adapter named {name!r} already exists; pick another name or delete it first")
        if not ADAPTER_NAME.match(name) or name == BASE:
            raise ValueError(f"adapter name {name!r} is invalid: use letters, digits, '_' or '-' (not {BASE!r})")

    def _wrap(self, key: str, name: str, config: Any, spec: Any) -> None:
        module = self.model.get_submodule(key)
        if isinstance(module, AdapterLayer):
            if spec.wrapper_for(module.base_layer, config) is not type(module):
                raise ValueError(f"module {key!r} already holds a {type(module).__name__}; "
                                 f"a {spec.name} adapter cannot share it")
            layer = module
        else:
            wrapper = spec.wrapper_for(module, config)
            if wrapper is None:
                raise ValueError(f"module {key!r} is a {type(module).__name__}, which {spec.name} cannot "
                                 f"adapt (supported: {spec.supports or 'see the method docs'}); "
                                 "remove it from target_modules")
            layer = wrapper(module)
            self.model.set_submodule(key, layer)
        layer.add_adapter(name, config, key)
        self._place(layer, name)

    def _place(self, layer: AdapterLayer, name: str) -> None:
        """Adapters stay fp32 over a half-precision base unless autocast_adapter_dtype is off."""
        base = getattr(layer.base_layer, "weight", None)
        if base is None or not base.is_floating_point() or self.autocast_adapter_dtype:
            return
        for tensor in layer.adapter_tensors(name).values():
            tensor.data = tensor.data.to(base.dtype)

    def _modules_to_save_keys(self, config: Any) -> list[str]:
        names = getattr(config, "modules_to_save", None) or []
        keys = [k for k, _ in self.model.named_modules() if k and targets.name_matches(k, names)]
        keys = [k for k in keys if not any(k.startswith(o + ".") for o in keys)]  # outermost only
        missing = [n for n in names if not any(k == n or k.endswith("." + n) for k in keys)]
        if missing:
            raise ValueError(f"modules_to_save entries {missing} matched no module. "
                             f"{targets.describe_modules(self.model)}")
        clash = [k for k in keys if isinstance(self.model.get_submodule(k), AdapterLayer)
                 and not isinstance(self.model.get_submodule(k), ModulesToSave)]
        if clash:
            raise ValueError(f"modules {clash} are both adapted and in modules_to_save; pick one")
        return keys

    def _wrap_to_save(self, key: str, name: str, config: Any) -> None:
        module = self.model.get_submodule(key)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            self.model.set_submodule(key, module)
        module.add_adapter(name, config, key)

    def _save_module_keys(self) -> list[str]:
        return [k for k, layer in self.adapter_layers() if isinstance(layer, ModulesToSave)]

    def _remove_traces(self, name: str) -> None:
        for _, layer in list(self.adapter_layers()):
            if name in layer.adapter_names():
                layer.delete_adapter(name)
        self._drop_empty_wrappers()
        self.peft_config.pop(name, None)
        self.parts.pop(name, None)

    def _drop_empty_wrappers(self) -> None:
        for key, layer in reversed(list(self.adapter_layers())):  # innermost first: outer keys stay valid
            if not layer.adapter_names():
                self.model.set_submodule(key, layer.base_layer)

    # -- switching, deleting, disabling --------------------------------------------------------
    def set_adapter(self, names: str | list[str]) -> None:
        """Make these adapters the active ones (several may be active at once)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; existing: {sorted(self.peft_config)}")
        self._input_adapter("prepare_inputs", names)  # raises if two prompt adapters would be active
        self.active_adapters = names
        for _, layer in self.adapter_layers():
            layer.active_adapters = list(names)
        self.refresh_trainable()

    def delete_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; existing: {sorted(self.peft_config)}")
        merged = [k for k, layer in self.adapter_layers() if name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {name!r} is merged into {len(merged)} layers (e.g. {merged[0]!r}); "
                             "call unmerge_adapter() before deleting it")
        for _, layer in self.adapter_layers():
            layer.check_delete(name)
        self._remove_traces(name)
        remaining = [n for n in self.active_adapters if n != name] or list(self.peft_config)[:1]
        self.active_adapters = []
        if remaining:
            self.set_adapter(remaining)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the exact base model inside; merged adapters are unmerged and merged back after."""
        merged = {key: list(layer.merged_adapters) for key, layer in self.adapter_layers() if layer.merged}
        self.unmerge_adapter()
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(False)
            for key, names in merged.items():
                self.model.get_submodule(key).merge(names)

    def disable_adapter_layers(self) -> None:
        """Turn every adapter off until ``enable_adapter_layers`` (merged ones are unmerged)."""
        self.unmerge_adapter()
        self._set_disabled(True)

    def enable_adapter_layers(self) -> None:
        self._set_disabled(False)

    def _set_disabled(self, flag: bool) -> None:
        for _, layer in self.adapter_layers():
            layer.disabled = flag

    @contextmanager
    def batch_adapters(self, names: list[str]) -> Iterator[None]:
        """Mixed batch: row i uses adapter names[i] ("__base__" for none)."""
        unknown = sorted({n for n in names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; existing: "
                             f"{sorted(self.peft_config)} or {BASE!r} for the base model")
        layers = [layer for _, layer in self.adapter_layers()]
        for layer in layers:
            layer.check_batch(list(names))
        for layer in layers:
            layer.batch_adapter_names = list(names)
        try:
            yield
        finally:
            for layer in layers:
                layer.batch_adapter_names = None

    # -- trainability --------------------------------------------------------------------------
    def refresh_trainable(self) -> None:
        """Only active adapters not in inference mode train; the base stays frozen (bias modes aside)."""
        for param in self.model.parameters():
            param.requires_grad_(False)
        for _, layer in self.adapter_layers():
            for name in layer.adapter_names():
                train = name in self.active_adapters and not self.peft_config[name].inference_mode
                for tensor in layer.adapter_tensors(name).values():
                    tensor.requires_grad_(train)
        for param in self.bias_parameters().values():
            param.requires_grad_(True)

    def bias_parameters(self, name: str | None = None) -> dict[str, nn.Parameter]:
        """Base biases that train with the adapter (``bias`` = "all" or "lora_only")."""
        names = [name] if name else [n for n in self.active_adapters if not self.peft_config[n].inference_mode]
        found: dict[str, nn.Parameter] = {}
        for adapter in names:
            mode = getattr(self.peft_config[adapter], "bias", "none")
            if mode == "all":
                copies = tuple(f"{k}." for k, l in self.adapter_layers() if isinstance(l, ModulesToSave))
                found.update({k: p for k, p in self.model.named_parameters()
                              if k.split(".")[-1] == "bias" and not k.startswith(copies)})
            elif mode == "lora_only":
                for key, layer in self.adapter_layers():
                    bias = getattr(layer.base_layer, "bias", None)
                    if isinstance(bias, nn.Parameter) and adapter in layer.adapter_names() and not isinstance(layer, ModulesToSave):
                        found[f"{key}.base_layer.bias"] = bias
        return found

    # -- merging -------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (float32 arithmetic, one rounding)."""
        names = adapter_names or list(self.active_adapters)
        self._check_mergeable(names)
        layers = [layer for _, layer in self.adapter_layers() if layer.can_merge]
        todo = [l for l in layers if any(n in l.adapter_names() and n not in l.merged_adapters for n in names)]
        if not todo:
            warnings.warn(f"adapters {names} are already merged; nothing to do")
            return
        if safe_merge:
            self._check_finite(todo, names)
        self._untie(todo)
        self.last_merge_error = max(layer.merge(names, safe_merge) for layer in todo)

    def _check_mergeable(self, names: list[str]) -> None:
        """Refuse, changing nothing, when an adapter lives in layers that cannot fold into weights.

        ModulesToSave copies cannot merge either, but merge_and_unload keeps them as trained modules.
        """
        stuck = [(k, n) for k, l in self.adapter_layers() if not l.can_merge and not isinstance(l, ModulesToSave)
                 for n in names if n in l.adapter_names()]
        if stuck:
            key, name = stuck[0]
            raise ValueError(f"adapter {name!r} cannot be merged: {key!r} holds a "
                             f"{type(self.model.get_submodule(key)).__name__}, which is not a weight update "
                             "(nothing was changed); keep the adapter model, or call unload() to remove it")

    def _untie(self, layers: list[AdapterLayer]) -> None:
        """Give a merging layer its own weight when the base shares it (tied embeddings/LM head).

        Otherwise merging into the LM head would silently change the input embeddings too, and a
        reload would tie them again. The model's config is told the weights are no longer tied.
        """
        owners: dict[int, int] = {}
        for _, param in self.model.named_parameters(remove_duplicate=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
        for layer in layers:
            weight = layer.base_weight()
            if owners.get(id(weight), 1) > 1:
                layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
                config = getattr(self.model, "config", None)
                if config is not None and getattr(config, "tie_word_embeddings", False):
                    config.tie_word_embeddings = False
                warnings.warn(f"{type(layer.base_layer).__name__} weight was tied to another module; "
                              "it was untied before merging so the other module keeps its weights")

    def _check_finite(self, layers: list[AdapterLayer], names: list[str]) -> None:
        """Check every layer before touching any weight, so a failed safe merge changes nothing."""
        for layer in layers:
            for name in names:
                if name in layer.adapter_names():
                    check_finite(name, layer.delta_weight(name))

    def unmerge_adapter(self) -> None:
        """Restore the base weights everywhere, or (if some layer cannot) raise having changed none."""
        merged = [layer for _, layer in self.adapter_layers() if layer.merged]
        for layer in merged:
            layer.check_unmerge()
        for layer in merged:
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge, then replace every wrapper by its base module; returns the plain base model."""
        self._check_mergeable(adapter_names or list(self.active_adapters))
        if self._has_unmerged(adapter_names):
            self.merge_adapter(adapter_names, safe_merge)
        return self._unwrap(keep_trained_copies=True)

    def _has_unmerged(self, names: list[str] | None) -> bool:
        names = names or self.active_adapters
        return any(n in l.adapter_names() and n not in l.merged_adapters
                   for _, l in self.adapter_layers() if l.can_merge for n in names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging (merged ones are unmerged first)."""
        self.unmerge_adapter()
        return self._unwrap(keep_trained_copies=False)

    def _unwrap(self, keep_trained_copies: bool) -> nn.Module:
        for key, layer in reversed(list(self.adapter_layers())):  # innermost first: outer keys stay valid
            module = layer.current() if keep_trained_copies and isinstance(layer, ModulesToSave) else layer.base_layer
            self.model.set_submodule(key, module)
        self.peft_config = {}
        self.parts = {}
        self.active_adapters = []
        return self.model

    # -- training hooks ------------------------------------------------------------------------
    def adapter_loss(self) -> torch.Tensor | None:
        """Extra loss terms of the active adapters' methods (None for LoRA)."""
        terms = [hook(owner, name) for name in self.active_adapters for hook, owner in self._hooks(name, "extra_loss")]
        terms = [term for term in terms if term is not None]
        return sum(terms) if terms else None

    def after_optimizer_step(self, global_step: int) -> None:
        for name in self.active_adapters:
            for hook, owner in self._hooks(name, "after_step"):
                hook(owner, name, global_step)

    def adapters_with_step_hooks(self) -> list[str]:
        """The active adapters whose methods act after each optimizer step (AdaLoRA's rank budget,
        AdapterFusion's annealing, diff pruning): host code that reads the step's gradients."""
        return [name for name in self.active_adapters if self._hooks(name, "after_step")]

    def training_state(self) -> dict:
        """Per adapter, the method's state beyond its parameters (empty for most methods); for a
        composite adapter, {part index: that part's state}."""
        state = {}
        for name, parts in self.parts.items():
            found = {i: spec.get_state(self._owner(name, part), name)
                     for i, (spec, part) in enumerate(parts) if spec.get_state is not None}
            if found:
                state[name] = found if parts[0][1] is not None else found[0]
        return state

    def load_training_state(self, state: dict) -> None:
        for name, value in state.items():
            if name not in self.peft_config:
                raise ValueError(f"the checkpoint holds training state for adapter {name!r}, which this "
                                 f"model lacks (it has {sorted(self.peft_config)}); resume with the same adapters")
            parts = self.parts[name]
            for i, part_state in (value.items() if parts[0][1] is not None else [(0, value)]):
                spec, part = parts[i]
                spec.set_state(self._owner(name, part), name, part_state)
