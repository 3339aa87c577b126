"""AdaLoRA: SVD-shaped low-rank updates B diag(E) A whose ranks are pruned during training."""
from peftkit.engine.targets import fill_default_targets, is_linear
from peftkit.methods.adalora.allocator import after_step, get_state, orth_penalty, set_state
from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.layer import AdaLoraLinear
from peftkit.registry import LayerRule, MethodSpec, register_method


def prepare_config(config: AdaLoraConfig, model) -> None:
    """Default targets per architecture; the budget schedule needs the run's length by now."""
    config.check_schedule()
    check_one_trainable(config, model)
    fill_default_targets(config, model)


def check_one_trainable(config: AdaLoraConfig, model) -> None:
    """One trainable AdaLoRA adapter per model, as in HF PEFT; more may be added in inference mode,
    to use rather than train."""
    if config.inference_mode:
        return
    training = sorted({n for m in model.modules() if isinstance(m, AdaLoraLinear)
                       for n, c in m.configs.items() if not c.inference_mode})
    if training:
        raise ValueError(f"the model already has a trainable AdaLoRA adapter ({training[0]!r}), and AdaLoRA trains "
                         "one adapter at a time (as HF PEFT); add this one with inference_mode=True (or load it "
                         f"with is_trainable=False) to use it without training, or delete {training[0]!r} first")


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
