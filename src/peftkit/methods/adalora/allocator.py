"""AdaLoRA's training hooks: the orthogonality penalty and the rank allocator.

Importance of one parameter entry w with gradient g, after each optimizer step t:

    I_t = |w * g|                                         sensitivity
    Ibar_t = beta1 Ibar_{t-1} + (1 - beta1) I_t           smoothed sensitivity
    U_t = beta2 U_{t-1} + (1 - beta2) |I_t - Ibar_t|      uncertainty
    s = Ibar_t * U_t                                      score of the entry

Triplet i of a layer scores S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji). The budget b(t) (total
triplets kept over all layers) follows a cubic schedule from b0 = sum of initial ranks to
bT = target_r * layers:

    b(t) = b0                                                   t <= tinit
    b(t) = bT + (b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3      otherwise, T = total_step

Every deltaT steps (and at t = T - tfinal) the b0 - b(t) lowest-scoring triplets get E_i = 0 and
the kept ones are recorded in ``config.rank_pattern``; after T - tfinal that pattern is re-applied
each step.

The penalty is ``orth_reg_weight`` times the mean over all A and B matrices of ||A A^T - I||_F and
||B^T B - I||_F. The paper writes a sum of squared norms; its code and HF PEFT use this mean of
plain norms, so the same ``orth_reg_weight`` means the same here as there.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.layer import AdaLoraLinear


def adalora_layers(adapter_model: nn.Module, name: str) -> dict[str, AdaLoraLinear]:
    """Module key -> layer, for every AdaLoRA layer that holds adapter ``name``."""
    return {key: layer for key, layer in adapter_model.adapter_layers()
            if isinstance(layer, AdaLoraLinear) and name in layer.adapter_names()}


# -- extra loss ------------------------------------------------------------------------------------
def orth_penalty(adapter_model: nn.Module, name: str) -> torch.Tensor | None:
    """orth_reg_weight * mean(||A A^T - I||_F, ||B^T B - I||_F over layers); None when it is off."""
    config = adapter_model.peft_config[name]
    if config.inference_mode or config.orth_reg_weight == 0:
        return None
    norms = []
    for layer in adalora_layers(adapter_model, name).values():
        a, b = layer.lora_A[name], layer.lora_B[name]
        for gram in (a @ a.T, b.T @ b):  # (r, r) each
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            norms.append(torch.linalg.matrix_norm(gram - eye, ord="fro"))
    return config.orth_reg_weight * torch.stack(norms).mean() if norms else None


# -- budget ----------------------------------------------------------------------------------------
def budget_schedule(config: AdaLoraConfig, step: int, initial: int, target: int) -> tuple[int, bool]:
    """(triplets to keep after ``step``, whether to mask at this step), as in the module docstring."""
    if step <= config.tinit:
        return initial, False
    if step > config.total_step - config.tfinal:
        return target, True
    left = 1 - (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
    return int((initial - target) * left ** 3 + target), step % config.deltaT == 0


def update_importance(layer: AdaLoraLinear, name: str, beta1: float, beta2: float) -> bool:
    """Fold this step's |w * g| into the layer's EMAs; False when no factor has a gradient."""
    state = layer.importance.setdefault(name, {})
    seen = False
    with torch.no_grad():
        for factor, param in layer.adapter_tensors(name).items():
            if param.grad is None:
                continue
            seen = True
            sensitivity = (param * param.grad).abs().float()
            avg, unc = state.get(factor, (torch.zeros_like(sensitivity), torch.zeros_like(sensitivity)))
            avg = beta1 * avg + (1 - beta1) * sensitivity
            unc = beta2 * unc + (1 - beta2) * (sensitivity - avg).abs()
            state[factor] = (avg, unc)
    return seen


def triplet_scores(layer: AdaLoraLinear, name: str) -> torch.Tensor:
    """S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji), shape (r,); zeros before any update."""
    state = layer.importance.get(name, {})
    score = {f: avg * unc for f, (avg, unc) in state.items()}
    if set(score) != {"lora_A", "lora_E", "lora_B"}:
        return torch.zeros(layer.r[name], device=layer.lora_E[name].device)
    return score["lora_E"].view(-1) + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)


def apply_mask(layers: dict[str, AdaLoraLinear], name: str, keep: dict[str, torch.Tensor]) -> dict[str, list[bool]]:
    """Zero E where ``keep`` is False, remember the mask in each layer; return the rank pattern."""
    with torch.no_grad():
        for key, layer in layers.items():
            layer.lora_E[name].masked_fill_(~keep[key].view(-1, 1).to(layer.lora_E[name].device), 0.0)
            layer.kept[name] = keep[key].cpu()
    return {f"{key}.lora_E": layer.pattern_entry(name, keep[key]) for key, layer in layers.items()}


def mask_to_budget(layers: dict[str, AdaLoraLinear], name: str, budget: int) -> dict[str, list[bool]]:
    """Keep the ``budget`` best triplets over all layers (ties at the threshold are pruned, as HF)."""
    scores = {key: triplet_scores(layer, name) for key, layer in layers.items()}
    drop = sum(s.numel() for s in scores.values()) - budget
    if drop <= 0:
        return apply_mask(layers, name, {k: torch.ones_like(s, dtype=torch.bool) for k, s in scores.items()})
    threshold = torch.kthvalue(torch.cat([s.cpu() for s in scores.values()]), drop).values.item()
    return apply_mask(layers, name, {k: (s > threshold).cpu() for k, s in scores.items()})


# -- after each optimizer step -----------------------------------------------------------------
def after_step(adapter_model: nn.Module, name: str, step: int) -> None:
    """The allocator's step: update importance, mask to the budget, fix the ranks at the end."""
    config = adapter_model.peft_config[name]
    layers = adalora_layers(adapter_model, name)
    if config.inference_mode or not layers:
        return
    end = config.total_step - config.tfinal
    if step > end:  # ranks are fixed: re-apply the final mask (Adam may have revived pruned E)
        kept = {k: layer.kept[name] for k, layer in layers.items() if name in layer.kept}
        apply_mask({k: layers[k] for k in kept}, name, kept)
        return
    initial, target = sum(layer.r[name] for layer in layers.values()), config.target_r * len(layers)
    if target > initial:
        raise ValueError(f"target_r={config.target_r} is invalid for adapter {name!r}: expected at most the "
                         f"layers' current average rank {initial / len(layers):g} (init_r={config.init_r})")
    if step < end:
        updated = [update_importance(layer, name, config.beta1, config.beta2) for layer in layers.values()]
        if not any(updated):
            raise ValueError(f"AdaLoRA adapter {name!r} found no gradients at step {step}: call "
                             "after_optimizer_step(step) after optimizer.step() and before optimizer.zero_grad()")
    budget, mask = budget_schedule(config, step, initial, target)
    if mask or step == end:
        config.rank_pattern = mask_to_budget(layers, name, budget)
    if step == end:
        for layer in layers.values():
            layer.importance.pop(name, None)


# -- checkpoint state ------------------------------------------------------------------------------
def get_state(adapter_model: nn.Module, name: str) -> dict:
    """What the allocator has learnt that the parameters do not hold: per layer the kept mask and
    the smoothed scores, and the rank pattern so far. Saved in trainer checkpoints."""
    layers = adalora_layers(adapter_model, name)
    return {
        "rank_pattern": copy.deepcopy(adapter_model.peft_config[name].rank_pattern),
        "kept": {k: layer.kept[name].clone() for k, layer in layers.items() if name in layer.kept},
        "importance": {k: {f: tuple(t.detach().cpu().clone() for t in pair) for f, pair in layer.importance[name].items()}
                       for k, layer in layers.items() if name in layer.importance},
    }


def set_state(adapter_model: nn.Module, name: str, state: dict) -> None:
    """Restore `get_state`'s dict into the layers of adapter `name` (a resumed run goes on exactly)."""
    layers = adalora_layers(adapter_model, name)
    unknown = sorted((set(state["kept"]) | set(state["importance"])) - set(layers))
    if unknown:
        raise ValueError(f"AdaLoRA state for adapter {name!r} names layers this model lacks: {unknown[:3]}; "
                         "resume with the same model and target_modules")
    adapter_model.peft_config[name].rank_pattern = copy.deepcopy(state["rank_pattern"])
    for layer in layers.values():  # what the state does not name was not there when it was taken
        layer.kept.pop(name, None)
        layer.importance.pop(name, None)
    for key, kept in state["kept"].items():
        layers[key].kept[name] = kept.clone()
    for key, scores in state["importance"].items():
        device = layers[key].lora_E[name].device
        layers[key].importance[name] = {f: tuple(t.to(device) for t in pair) for f, pair in scores.items()}
