"""Bottleneck adapters: a small residual MLP after a sub-layer's output (Houlsby / Pfeiffer placement)."""
from peftkit.engine.targets import is_linear
from peftkit.methods.adapter.config import BottleneckConfig
from peftkit.methods.adapter.layer import BottleneckLayer
from peftkit.registry import LayerRule, MethodSpec, register_method

SPEC = register_method(MethodSpec(
    name="adapter",
    peft_type="BOTTLENECK",
    config_cls=BottleneckConfig,
    prepare_config=lambda config, model: config.fill_defaults(getattr(getattr(model, "config", None), "model_type", None)),
    supports="Linear, GPT-2 Conv1D",
    target_presets=False,  # placement picks the targets
    summary="Bottleneck adapters h + s * up(act(down(h))) after sub-layer outputs (Houlsby et al., 2019; "
            "Pfeiffer et al., 2020), with AdapterDrop (Rücklé et al., 2021); cannot be merged.",
    layer_rules=[LayerRule(lambda m, c: is_linear(m), BottleneckLayer)],
))

__all__ = ["BottleneckConfig", "BottleneckLayer", "SPEC"]
