"""Opt-in: swap fused kernels into known model families, in place, per module instance.

`patch_model(model)` rebinds `forward` on the instances it recognises (by class name, so no
transformers import is needed here) and leaves every parameter and state-dict key as it was:

  * RMSNorm of the Llama formula          -> rms_norm (Triton on CUDA)
  * gated MLP with SiLU (gate/up/down)    -> silu_mul between the projections
  * attention of those families           -> apply_rope: while a patched attention runs, the
                                             family module's `apply_rotary_pos_emb` (replaced
                                             once by a dispatcher) calls the fused kernel; any
                                             other caller still gets transformers' function
  * LoRA linears sharing an input         -> lora_linears_shared (q, k, v; gate, up): one autograd
    (peftkit LoraLinear, fused path)         node that reads the input once per pass; the modules
                                             and their parameters stay as they are
  * ...ForCausalLM called with labels     -> fused_causal_lm_loss on the last hidden state;
                                             `logits` is then None (they are never formed)
  * ... and, when called without attention_mask, position_ids, cache_position or a cache,
    with SDPA attention                   -> no causal mask: SDPA's is_causal, which is what
                                             transformers picks for such rows too, but it first
                                             checks position_ids for packed sequences: a host
                                             sync every step, and under CUDA-graph capture
                                             (where it cannot check) a full (B, 1, S, S) mask

Calls the fast path cannot serve (positional arguments, logits_to_keep, an adapted lm_head)
go to the model's own forward. Adapters may be added before or after patching.
"""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from .cross_entropy import fused_causal_lm_loss
from .lora_shared import lora_linears_shared
from .norm import rms_norm
from .rope import apply_rope
from .swiglu import silu_mul

_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")
RMS_NORMS = {f"{f}RMSNorm" for f in _FAMILIES}
GATED_MLPS = {f"{f}MLP" for f in _FAMILIES}
CAUSAL_LMS = {f"{f}ForCausalLM" for f in _FAMILIES}
ATTENTIONS = {f"{f}Attention" for f in _FAMILIES}
_ROPE = threading.local()  # .depth > 0 while a patched attention's forward runs
_UNMASKED = threading.local()  # .depth > 0 while a patched causal LM runs on plain causal rows
_MASK_INPUTS = ("attention_mask", "position_ids", "cache_position", "past_key_values", "inputs_embeds")
_SILU = ("SiLU", "SiLUActivation")


@dataclass
class PatchReport:
    """What `patch_model` changed: the qualified names of the patched modules, by kind."""

    rms_norm: list[str] = field(default_factory=list)
    mlp: list[str] = field(default_factory=list)
    rope: list[str] = field(default_factory=list)
    causal_lm_loss: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"patched {len(self.rms_norm)} RMSNorm, {len(self.mlp)} MLP, "
                f"{len(self.rope)} RoPE, {len(self.causal_lm_loss)} causal-LM loss")


def _rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    shared = _shared_lora(x, (self.gate_proj, self.up_proj))
    gate, up = shared if shared is not None else (self.gate_proj(x), self.up_proj(x))
    return self.down_proj(silu_mul(gate, up))


def _fused_layer(module: nn.Module, dtype: torch.dtype):
    """(weight, bias, A, B, scaling, quant) of a LoRA linear that would run lora_linear, else None."""
    plain_call = "forward" not in module.__dict__ and not (module._forward_hooks or module._forward_pre_hooks)
    return module.fused_layer(dtype) if plain_call and hasattr(module, "fused_layer") else None


def _shared_lora(x, modules) -> list | None:
    """The modules' outputs on x from one lora_linears_shared node, or None if any can't take part."""
    layers = [_fused_layer(m, x.dtype) for m in modules]
    if any(layer is None for layer in layers):
        return None
    return lora_linears_shared(x, layers)


class _Answer:
    """Stands in for a projection's forward during one attention call: returns the output
    computed ahead for exactly `x` (the same tensor object), else runs the module as usual."""

    def __init__(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor):
        self.module, self.x, self.out = module, x, out

    def __call__(self, inp, *args, **kwargs):
        if inp is self.x and not args and not kwargs:
            return self.out
        return type(self.module).forward(self.module, inp, *args, **kwargs)


def _attention_forward(self, *args, **kwargs):
    x = kwargs.get("hidden_states", args[0] if args else None)
    projs = [getattr(self, p, None) for p in ("q_proj", "k_proj", "v_proj")]
    shared = _shared_lora(x, projs) if isinstance(x, torch.Tensor) and None not in projs else None
    for proj, out in zip(projs, shared or ()):
        proj.forward = _Answer(proj, x, out)
    _ROPE.depth = getattr(_ROPE, "depth", 0) + 1
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _ROPE.depth -= 1
        for proj in projs if shared else ():
            del proj.forward


def _rope_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if getattr(_ROPE, "depth", 0) > 0 and not args and kwargs.get("unsqueeze_dim", 1) == 1:
            return apply_rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.peftkit_original = original
    return apply_rotary_pos_emb


def _install_rope(attention: nn.Module) -> bool:
    """Route the family's apply_rotary_pos_emb through the dispatcher; False if it has none."""
    family = sys.modules.get(type(attention).__module__)
    current = getattr(family, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if not hasattr(current, "peftkit_original"):
        family.apply_rotary_pos_emb = _rope_dispatcher(current)
    attention.forward = types.MethodType(_attention_forward, attention)
    return True


def _mask_dispatcher(original):
    def create_causal_mask(*args, **kwargs):
        if getattr(_UNMASKED, "depth", 0) > 0:
            return None  # every row is one unpadded sequence from position 0: SDPA's is_causal
        return original(*args, **kwargs)

    create_causal_mask.peftkit_original = original
    return create_causal_mask


def _install_mask(causal_lm: nn.Module) -> None:
    """Route the family's create_causal_mask through the dispatcher, where it has one."""
    family = sys.modules.get(type(causal_lm.model).__module__)
    current = getattr(family, "create_causal_mask", None)
    if current is not None and not hasattr(current, "peftkit_original"):
        family.create_causal_mask = _mask_dispatcher(current)


def _plain_causal_rows(model: nn.Module, kwargs: dict) -> bool:
    """True when the mask can only be the causal one: nothing that pads, packs or offsets rows."""
    sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
    return sdpa and all(kwargs.get(k) is None for k in _MASK_INPUTS)


def _causal_lm_forward(self, input_ids=None, *args, labels=None, **kwargs):
    head = self.lm_head
    plain_head = type(head) is nn.Linear and head.bias is None
    if labels is None or args or kwargs.get("logits_to_keep", 0) != 0 or not plain_head:
        return type(self).forward(self, input_ids, *args, labels=labels, **kwargs)
    kwargs.pop("logits_to_keep", None)
    return_dict = kwargs.pop("return_dict", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    unmasked = _plain_causal_rows(self, kwargs)
    _UNMASKED.depth = getattr(_UNMASKED, "depth", 0) + unmasked
    try:
        outputs = self.model(input_ids=input_ids, **kwargs)
    finally:
        _UNMASKED.depth -= unmasked
    loss = fused_causal_lm_loss(outputs.last_hidden_state, head.weight, labels,
                                num_items_in_batch=num_items)
    result = _causal_lm_output(loss, outputs)
    return result if return_dict is not False else result.to_tuple()


def _causal_lm_output(loss, outputs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _is_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return type(act).__name__ in _SILU and all(
        hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))


def patch_model(model: nn.Module) -> PatchReport:
    """Swap fused forwards into the recognised modules of `model`; return what was patched."""
    report = PatchReport()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            report.rms_norm.append(name)
        elif kind in GATED_MLPS and _is_silu_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            report.mlp.append(name)
        elif kind in ATTENTIONS and _install_rope(module):
            report.rope.append(name)
        elif kind in CAUSAL_LMS:
            _install_mask(module)
            module.forward = types.MethodType(_causal_lm_forward, module)
            report.causal_lm_loss.append(name)
    return report


def unpatch_model(model: nn.Module) -> None:
    """Undo `patch_model`: every module gets its class's forward back."""
    for module in model.modules():
        module.__dict__.pop("forward", None)
