"""UniPELT (Mao et al., 2022): one adapter made of three existing methods' parts, each scaled by a
learned gate (the math is in gates.py):

    LoRA on the query and value projections   W0 x + G_L(x) s B A x
    prefix tuning in every attention layer    prefix values scaled by G_P (per example and layer)
    a sequential (Pfeiffer) adapter           h + G_A(h) s up(act(down(h)))

With ``gates=True`` the parts are the gated layers of gates.py (three internal part specs, not
listed as methods); with ``gates=False`` they are the plain LoRA, prefix and adapter methods. Each
part wraps its own modules under the adapter's one name (``MethodSpec.parts``). Saved as peftkit's
own "UNIPELT" type: one adapter_config.json with the three parts' options, one safetensors with
every part's tensors and the gates. Cannot be merged, cannot mix adapters per row, and refuses
gradient checkpointing (the prefix part).
"""
from torch import nn

from peftkit.engine.targets import fill_default_targets, is_linear
from peftkit.methods import adapter, lora, prefix
from peftkit.methods.unipelt.config import UniPeltConfig
from peftkit.methods.unipelt.gates import (GatedBottleneckLayer, GatedLoraLinear, PrefixGateLayer, attention_keys,
                                           is_attention)
from peftkit.registry import LayerRule, MethodSpec, register_method

GATED_LORA = MethodSpec(
    name="gated lora", peft_type="UNIPELT", config_cls=object, prepare_config=fill_default_targets,
    supports="Linear, GPT-2 Conv1D", layer_rules=[LayerRule(lambda m, c: is_linear(m), GatedLoraLinear)])
GATED_ADAPTER = MethodSpec(
    name="gated adapter", peft_type="UNIPELT", config_cls=object, prepare_config=adapter.SPEC.prepare_config,
    supports="Linear, GPT-2 Conv1D", layer_rules=[LayerRule(lambda m, c: is_linear(m), GatedBottleneckLayer)])
PREFIX_GATE = MethodSpec(
    name="prefix gate", peft_type="UNIPELT", config_cls=object, find_targets=attention_keys,
    supports="attention modules", layer_rules=[LayerRule(lambda m, c: is_attention(m), PrefixGateLayer)])


def parts(config: UniPeltConfig, model: nn.Module) -> list:
    lora_part, prefix_part, adapter_part = (config.make_part(n) for n in ("lora", "prefix_tuning", "adapter"))
    if not config.gates:
        return [(lora.SPEC, lora_part), (prefix.SPEC, prefix_part), (adapter.SPEC, adapter_part)]
    return [(GATED_LORA, lora_part), (prefix.SPEC, prefix_part), (PREFIX_GATE, prefix_part),
            (GATED_ADAPTER, adapter_part)]


SPEC = register_method(MethodSpec(
    name="unipelt",
    peft_type="UNIPELT",
    config_cls=UniPeltConfig,
    hf_format=False,
    parts=parts,
    # every wrapper a UniPELT file can hold (gated, or plain with gates=False)
    part_layers=tuple(r.wrapper for s in (GATED_LORA, PREFIX_GATE, GATED_ADAPTER, lora.SPEC, prefix.SPEC, adapter.SPEC)
                      for r in s.layer_rules),
    supports="the parts' modules: query/value linears (LoRA), the input embeddings (prefix), attention "
             "modules (prefix gates), feed-forward outputs (adapter)",
    target_presets=False,
    supports_checkpointing=False,  # the prefix part (see methods/prefix/inputs.py)
    summary="UniPELT: LoRA + prefix tuning + a bottleneck adapter, each scaled by a learned gate "
            "sigmoid(W_g x + b_g) (Mao et al., 2022); cannot be merged.",
))

__all__ = ["UniPeltConfig", "SPEC"]
