"""The method registry: each method registers its config and layer wrappers; the engine dispatches.

Adding a method adds entries here (``register_method``); adding a layer type to a method adds one
``LayerRule``. The engine never names a method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class LayerRule:
    """Wrap modules for which ``matches(module, config)`` is true with ``wrapper(module, ...)``."""

    matches: Callable[[nn.Module, object], bool]
    wrapper: type


@dataclass
class MethodSpec:
    """Everything the engine needs to know about one method."""

    name: str  # CLI name, e.g. "lora"
    peft_type: str  # HF format name, e.g. "LORA"
    config_cls: type
    layer_rules: list[LayerRule] = field(default_factory=list)
    summary: str = ""
    # Several methods may share one HF peft_type (LoRA and DoRA are both "LORA", told apart by
    # use_dora): claims(config_dict) says whether a config of that type is this method's.
    claims: Callable[[dict], bool] | None = None
    # Fills what a config leaves unset from the model (e.g. default targets per architecture).
    prepare_config: Callable[[object, nn.Module], None] | None = None
    supports: str = ""  # module types the method can wrap, for error messages
    # False: the method derives its targets from its own options (adapter placement), so the CLI's
    # per-model target_modules presets (written for LoRA) are not applied to it.
    target_presets: bool = True
    # Methods that act at the input (prompt tuning) rather than through target_modules:
    find_targets: Callable[[nn.Module, object], list[str]] | None = None  # (model, config) -> keys to wrap
    prepare_inputs: Callable[[nn.Module, str, dict], dict] | None = None  # (adapter_model, name, kwargs) -> kwargs
    generating: Callable[[nn.Module, str], object] | None = None  # (adapter_model, name) -> context for generate
    file_prefix: str = "base_model.model."  # HF key prefix of modules_to_save copies in this method's files
    # (config) -> the fix to print when a file does not fit an adapter of this config, where the method
    # knows better than "load it onto its base model" (files that fold a trained encoder away), or None.
    load_fix: Callable[[object], str | None] | None = None
    # False: training under gradient checkpointing is refused (prefix tuning: transformers drops the
    # key/value cache inside checkpointed layers); tools that plan a run (recommend) skip the method.
    supports_checkpointing: bool = True
    # (adapter_model, name): an initialisation that needs the whole model, run once the adapter's
    # layers exist (prefix tuning from the frozen model's own keys and values for a text).
    after_inject: Callable[[nn.Module, str], None] | None = None
    # Training hooks the trainer calls through the model (None: the method has none).
    extra_loss: Callable[[nn.Module, str], object] | None = None  # (adapter_model, name) -> Tensor | None
    after_step: Callable[[nn.Module, str, int], None] | None = None  # (adapter_model, name, global_step)
    # State that training changes besides the parameters (AdaLoRA's importance scores and masks),
    # saved in trainer checkpoints so that a resumed run continues exactly.
    get_state: Callable[[nn.Module, str], dict] | None = None  # (adapter_model, name) -> picklable dict
    set_state: Callable[[nn.Module, str, dict], None] | None = None  # (adapter_model, name, state)
    # True: the method combines adapters the model already holds (AdapterFusion) rather than adapting
    # a plain model, so list_methods() (the CLI's train/params/recommend choices) leaves it out; it
    # still loads by peft_type and get_method(name) finds it.
    composes: bool = False
    # False: peft_type is peftkit's own (HF PEFT cannot load these files); the model card says so.
    hf_format: bool = True
    load_hint: str = ""  # a loading step the model card adds (a fusion's members come first)
    # Composite methods (MAM, UniPELT): (config, model) -> [(spec, part config)], ordinary methods'
    # configs that together make ONE adapter. The engine injects every part under the adapter's name
    # (two parts may not wrap one module) and runs each part's hooks; a part's hooks see the adapter
    # model through a ``PartView`` (engine/model.py), where ``peft_config[name]`` is the part's config.
    parts: Callable[[object, nn.Module], list[tuple["MethodSpec", object]]] | None = None
    # The wrapper types a composite's parts use (its own layer_rules stay empty), so that tools that
    # read files without a model (``peftkit inspect``) know their tensors.
    part_layers: tuple[type, ...] = ()
    # save_pretrained(path_initial_model_for_weight_conversion=PATH): (adapter_model, name, file tensors,
    # config copy, PATH) -> (tensors, config) of an adapter that works on the base as it was before an
    # initialisation rewrote it (LoRA's PiSSA/OLoRA); None: the method has no such conversion.
    convert_initial: Callable[[nn.Module, str, dict, object, str], tuple[dict, object]] | None = None

    def wrapper_for(self, module: nn.Module, config: object) -> type | None:
        """First matching rule wins, so specific base types are registered before general ones."""
        for rule in self.layer_rules:
            if rule.matches(module, config):
                return rule.wrapper
        return None


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _METHODS[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    import peftkit.methods  # noqa: F401  (importing registers every built-in method)


def list_methods() -> list[str]:
    """Methods that adapt a plain model (those that only compose existing adapters left out)."""
    _ensure_loaded()
    return [name for name, spec in _METHODS.items() if not spec.composes]


def get_method(name: str) -> MethodSpec:
    _ensure_loaded()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_METHODS)}")
    return _METHODS[name]


def get_method_by_peft_type(peft_type: str | None, data: dict | None = None) -> MethodSpec:
    """The method for a config's peft_type (and, where methods share one, its other fields)."""
    _ensure_loaded()
    candidates = [s for s in _METHODS.values() if s.peft_type == peft_type]
    if not candidates:
        known = ", ".join(sorted({s.peft_type for s in _METHODS.values()}))
        raise ValueError(f"adapter config has peft_type={peft_type!r}, which peftkit does not support; known: {known}")
    claimed = [s for s in candidates if s.claims and s.claims(data or {})]
    return (claimed or [s for s in candidates if s.claims is None] or candidates)[0]


def method_for_config(config: object) -> MethodSpec:
    data = config.to_dict() if hasattr(config, "to_dict") else {}
    return get_method_by_peft_type(getattr(config, "peft_type", None), data)
