"""(IA)^3: learned vectors that rescale the outputs (attention) or inputs (feed-forward) of layers."""
from torch import nn

from peftkit.engine.targets import is_linear
from peftkit.methods.ia3.config import IA3Config
from peftkit.methods.ia3.layer import IA3Conv, IA3Layer, IA3Linear
from peftkit.registry import LayerRule, MethodSpec, register_method

SPEC = register_method(MethodSpec(
    name="ia3",
    peft_type="IA3",
    config_cls=IA3Config,
    prepare_config=lambda config, model: config.fill_defaults(getattr(getattr(model, "config", None), "model_type", None)),
    supports="Linear, GPT-2 Conv1D, Conv2d/3d",
    target_presets=False,  # its per-architecture defaults (key, value, ffn output) fit it, not LoRA's q, v
    summary="Learned vectors rescaling layer outputs, or inputs of feed-forward layers (Liu et al., 2022).",
    layer_rules=[
        LayerRule(lambda m, c: is_linear(m), IA3Linear),
        LayerRule(lambda m, c: isinstance(m, (nn.Conv2d, nn.Conv3d)), IA3Conv),
    ],
))

__all__ = ["IA3Config", "IA3Layer", "IA3Linear", "IA3Conv", "SPEC"]
