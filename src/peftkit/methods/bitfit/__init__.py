"""BitFit: train only bias terms, as trainable bias deltas on linear layers and LayerNorms."""
import warnings

from torch import nn

from peftkit.engine import targets
from peftkit.engine.layer import AdapterLayer, ModulesToSave
from peftkit.engine.targets import is_linear
from peftkit.methods.bitfit.config import BitFitConfig
from peftkit.methods.bitfit.layer import BitFitLayer
from peftkit.registry import LayerRule, MethodSpec, register_method


def find_targets(model: nn.Module, config: BitFitConfig) -> list[str]:
    """The engine's matching of target_modules, plus every LayerNorm when include_layernorms is on."""
    copies = [k for k, m in model.named_modules() if isinstance(m, ModulesToSave)]
    keys = targets.find_targets(model, config, skip=copies)
    for entry in targets.unmatched_entries(config, keys):
        warnings.warn(f"target_modules entry {entry!r} matched no module; check its spelling")
    if config.include_layernorms:
        keys += [k for k in layer_norms(model, config) if k not in keys]
    return keys


def layer_norms(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Every nn.LayerNorm (or BitFit-wrapped one) outside other wrappers, minus exclude_modules,
    within layers_to_transform."""
    layers = config.layers_to_transform
    wanted = [layers] if isinstance(layers, int) else layers
    found, inside = [], ()
    for key, module in model.named_modules():
        if inside and key.startswith(inside):
            continue
        if isinstance(module, AdapterLayer):
            inside += (key + ".",)
            module = module.base_layer
        if not isinstance(module, nn.LayerNorm) or targets.name_matches(key, config.exclude_modules):
            continue
        if wanted is None or targets.layer_index(key, config.layers_pattern) in wanted:
            found.append(key)
    return found


SPEC = register_method(MethodSpec(
    name="bitfit",
    peft_type="BITFIT",
    hf_format=False,
    config_cls=BitFitConfig,
    supports="Linear, GPT-2 Conv1D, LayerNorm",
    summary="Train only bias terms, as bias deltas that merge into the base biases (Ben Zaken et al., 2022).",
    target_presets=False,
    find_targets=find_targets,
    layer_rules=[
        LayerRule(lambda m, c: is_linear(m), BitFitLayer),
        LayerRule(lambda m, c: isinstance(m, nn.LayerNorm), BitFitLayer),
    ],
))

__all__ = ["BitFitConfig", "BitFitLayer", "SPEC"]
