"""Diff pruning's training hooks: the relaxed-L0 penalty, the magnitude projection, the mask state.

    loss += l0_penalty * sum over targets of sum sigmoid(log alpha - beta log(-gamma / zeta))

After optimizer step ``total_step - fixed_mask_steps`` the diff is projected onto the L0 ball:
with n entries over all targets together, the k = max(1, round(target_density * n)) largest
|delta| (delta computed without sampling) are kept, exactly k, ties broken by ``torch.topk``; every
other entry becomes 0 and stays 0 (each later step re-applies the mask to w, which Adam's momentum
would otherwise move; it never changes the output). The masks are the state training adds beyond
the parameters, so trainer checkpoints carry them (``get_state``/``set_state``).
"""
from __future__ import annotations

import torch
from torch import nn

from peftkit.methods.diff_pruning.layer import DiffPruningLinear, expected_l0


def diff_layers(adapter_model: nn.Module, name: str) -> dict[str, DiffPruningLinear]:
    """Module key -> layer, for every diff pruning layer that holds adapter ``name``."""
    return {key: layer for key, layer in adapter_model.adapter_layers()
            if isinstance(layer, DiffPruningLinear) and name in layer.adapter_names()}


def l0_penalty(adapter_model: nn.Module, name: str) -> torch.Tensor | None:
    """The weighted expected L0 norm over layers still gated; None when off, frozen or projected."""
    config = adapter_model.peft_config[name]
    if config.inference_mode or config.l0_penalty == 0:
        return None
    terms = [expected_l0(layer.diff_log_alpha[name], config) for layer in diff_layers(adapter_model, name).values()
             if name not in layer.mask]
    return config.l0_penalty * torch.stack(terms).sum() if terms else None


def project(adapter_model: nn.Module, name: str) -> int:
    """Keep the target_density largest |delta| over all layers of adapter ``name``, fix the masks;
    return how many entries were kept."""
    layers = diff_layers(adapter_model, name)
    deltas = {key: layer.delta_weight(name) for key, layer in layers.items()}
    sizes = [d.numel() for d in deltas.values()]
    keep = max(1, round(adapter_model.peft_config[name].target_density * sum(sizes)))
    flat = torch.cat([d.abs().flatten().cpu() for d in deltas.values()])  # (n,)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    for (key, layer), part in zip(layers.items(), chosen.split(sizes)):
        layer.fix_mask(name, part.view(deltas[key].shape))
    return keep


def after_step(adapter_model: nn.Module, name: str, step: int) -> None:
    """Project once ``step`` reaches the projection step; afterwards keep w zero off the mask."""
    config = adapter_model.peft_config[name]
    layers = diff_layers(adapter_model, name)
    if config.inference_mode or not layers:
        return
    if all(name in layer.mask for layer in layers.values()):
        with torch.no_grad():
            for layer in layers.values():
                layer.diff_w[name].mul_(layer.mask[name])
    elif step >= config.projection_step:
        project(adapter_model, name)


def get_state(adapter_model: nn.Module, name: str) -> dict:
    """Per layer, the flat indices of the fixed mask (none before projection)."""
    return {"masks": {key: layer.mask[name].flatten().nonzero().squeeze(1).cpu()
                      for key, layer in diff_layers(adapter_model, name).items() if name in layer.mask}}


def set_state(adapter_model: nn.Module, name: str, state: dict) -> None:
    """Restore `get_state`'s masks (a resumed run continues with the same sparse diff)."""
    layers = diff_layers(adapter_model, name)
    unknown = sorted(set(state["masks"]) - set(layers))
    if unknown:
        raise ValueError(f"diff pruning state for adapter {name!r} names layers this model lacks: {unknown[:3]}; "
                         "resume with the same model and target_modules")
    for layer in layers.values():
        layer.mask.pop(name, None)
    for key, indices in state["masks"].items():
        weight = layers[key].diff_w[name]
        mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
        mask[indices.to(weight.device)] = True
        layers[key].mask[name] = mask.view(weight.shape)
