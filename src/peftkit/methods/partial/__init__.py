"""Partial fine-tuning: train every parameter of the top k blocks (and optionally the head)."""
from __future__ import annotations

from torch import nn

from peftkit.engine import targets
from peftkit.engine.layer import AdapterLayer, ModulesToSave
from peftkit.methods.partial.config import PartialConfig
from peftkit.methods.partial.layer import PartialLayer
from peftkit.registry import LayerRule, MethodSpec, register_method


def block_list(model: nn.Module, config: PartialConfig) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the outermost nn.ModuleList of modules of one type
    (``layers_pattern`` picks one when there are several); raise naming what was found."""
    lists = [(k, m) for k, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1]
    if config.layers_pattern is not None:
        lists = [(k, m) for k, m in lists if targets.name_matches(k, [config.layers_pattern])]
    lists = [(k, m) for k, m in lists if not any(k.startswith(o + ".") for o, _ in lists)]
    if len(lists) != 1:
        found = [f"{k} ({len(m)} x {type(m[0]).__name__})" for k, m in lists] or "none"
        hint = "set layers_pattern to one of them" if lists else "partial fine-tuning needs a list of repeated blocks"
        raise ValueError(f"cannot tell the block list of {type(model).__name__} (layers_pattern="
                         f"{config.layers_pattern!r}); candidates: {found}; {hint}")
    return lists[0]


def find_targets(model: nn.Module, config: PartialConfig) -> list[str]:
    """Every leaf module with parameters inside the chosen blocks (minus exclude_modules,
    within target_modules when it is set); an existing wrapper counts as the module it wraps."""
    key, blocks = block_list(model, config)
    found = []
    for index in config.block_indices(len(blocks)):
        prefix = f"{key}.{index}"
        for sub, module in blocks[index].named_modules(prefix=prefix):
            if any(isinstance(p, AdapterLayer) for p in parents(model, sub)):
                continue  # inside a wrapper: its base module and its own tensors
            if isinstance(module, AdapterLayer):  # judged by the engine (PartialLayers are shared)
                found += [] if isinstance(module, ModulesToSave) else [sub]
                continue
            if chosen(sub, module, config):
                found.append(sub)
    if not found:
        raise ValueError(f"partial fine-tuning found no module with parameters in blocks "
                         f"{config.block_indices(len(blocks))} of {key!r} (target_modules={config.target_modules!r}, "
                         f"exclude_modules={config.exclude_modules!r}). {targets.describe_modules(model)}")
    return found


def parents(model: nn.Module, key: str) -> list[nn.Module]:
    parts = key.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def chosen(key: str, module: nn.Module, config: PartialConfig) -> bool:
    """A leaf with parameters of its own, selected by target_modules and not excluded."""
    if not any(True for _ in module.parameters(recurse=False)):
        return False
    if any(True for _ in module.children()):
        raise ValueError(f"module {key!r} ({type(module).__name__}) holds parameters beside submodules; "
                         "partial fine-tuning trains leaf modules: exclude it or list the leaves in target_modules")
    if config.target_modules is not None and not targets.name_matches(key, config.target_modules):
        return False
    return not targets.name_matches(key, config.exclude_modules)


def prepare_config(config: PartialConfig, model: nn.Module) -> None:
    """train_head: add the output head (LM head or classifier) to modules_to_save."""
    if config.train_head:
        heads = sorted(targets.output_head_names(model))
        if not heads:
            raise ValueError(f"train_head=True but {type(model).__name__} has no output head (lm_head, "
                             "classifier, score, qa_outputs); name the module in modules_to_save instead")
        outermost = [h for h in heads if not any(h.startswith(o + ".") for o in heads)]
        config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + outermost))


SPEC = register_method(MethodSpec(
    name="partial",
    peft_type="PARTIAL",
    hf_format=False,
    config_cls=PartialConfig,
    supports="any leaf module with parameters (Linear, LayerNorm, RMSNorm, Conv1D, ...)",
    summary="Train every parameter of the top k blocks (and optionally the head), as full-size deltas.",
    target_presets=False,
    find_targets=find_targets,
    prepare_config=prepare_config,
    layer_rules=[LayerRule(lambda m, c: any(True for _ in m.parameters(recurse=False)), PartialLayer)],
))

__all__ = ["PartialConfig", "PartialLayer", "SPEC"]
