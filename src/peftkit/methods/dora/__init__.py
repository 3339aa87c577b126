"""DoRA: LoRA with the weight split into a trained magnitude and a direction (Liu et al., 2024).

Saved in HF PEFT's format as a LORA adapter with ``use_dora`` true; the registry tells it from
plain LoRA by that field, so ``LoraConfig(use_dora=True)`` and HF-saved DoRA adapters come here.
"""
from peftkit.engine.targets import fill_default_targets, is_linear
from peftkit.methods.dora.config import DoraConfig
from peftkit.methods.dora.layer import DoraLinear, DoraUnsupported
from peftkit.registry import LayerRule, MethodSpec, register_method

SPEC = register_method(MethodSpec(
    name="dora",
    peft_type="LORA",
    config_cls=DoraConfig,
    claims=lambda d: bool(d.get("use_dora")),
    prepare_config=fill_default_targets,
    supports="Linear, GPT-2 Conv1D",
    summary="LoRA on the direction of each weight row plus a trained magnitude (Liu et al., 2024).",
    layer_rules=[
        LayerRule(lambda m, c: is_linear(m), DoraLinear),
        LayerRule(lambda m, c: True, DoraUnsupported),  # a clear error for any other layer type
    ],
))

__all__ = ["DoraConfig", "DoraLinear", "SPEC"]
