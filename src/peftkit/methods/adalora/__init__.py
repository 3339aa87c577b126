"""AdaLoRA: SVD-shaped low-rank updates B diag(E) A whose ranks are pruned during training."""
from peftkit.engine.targets import fill_default_targets, is_linear
from peftkit.methods.adalora.allocator import after_step, get_state, orth_penalty, set_state
from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.layer import AdaLoraLinear
from peftkit.registry import LayerRule, MethodSpec, register_method


def prepare_config(config: AdaLoraConfig, model) -> None:
    """Default targets per architecture; the budget schedule needs the run's length by now."""
    config.check_schedule()
    fill_default_targets(config, model)


SPEC = register_method(MethodSpec(
    name="adalora",
    peft_type="ADALORA",
    config_cls=AdaLoraConfig,
    prepare_config=prepare_config,
    supports="Linear, GPT-2 Conv1D",
    summary="LoRA as B diag(E) A with ranks re-allocated by importance during training (Zhang et al., 2023).",
    layer_rules=[LayerRule(lambda m, c: is_linear(m), AdaLoraLinear)],
    extra_loss=orth_penalty,
    after_step=after_step,
    get_state=get_state,
    set_state=set_state,
))

__all__ = ["AdaLoraConfig", "AdaLoraLinear", "SPEC"]
