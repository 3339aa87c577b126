"""Prompt tuning: trainable soft-prompt embeddings prepended to the input (Lester et al., 2021)."""
from torch import nn

from peftkit.methods.prompt.config import PromptTuningConfig
from peftkit.methods.prompt.inputs import generating, prepare_inputs
from peftkit.methods.prompt.layer import PromptEmbedding
from peftkit.registry import LayerRule, MethodSpec, register_method


def input_embedding_key(model, config) -> list[str]:
    """The one module prompt tuning wraps: the model's input (word) embeddings."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    key = next((k for k, m in model.named_modules() if m is embeddings and embeddings is not None), None)
    if key is None:
        raise ValueError(f"prompt tuning needs a model with get_input_embeddings() (a transformers model); "
                         f"{type(model).__name__} has none reachable among its modules")
    return [key]


SPEC = register_method(MethodSpec(
    name="prompt",
    peft_type="PROMPT_TUNING",
    config_cls=PromptTuningConfig,
    prepare_config=lambda config, model: config.fill_from_model(model),
    supports="the model's input embeddings (an nn.Embedding found by get_input_embeddings)",
    layer_rules=[LayerRule(lambda m, c: isinstance(m, nn.Embedding), PromptEmbedding)],
    summary="Trainable soft-prompt embeddings prepended to the input (Lester et al., 2021).",
    target_presets=False,
    find_targets=input_embedding_key,
    prepare_inputs=prepare_inputs,
    generating=generating,
    file_prefix="base_model.",
))

__all__ = ["PromptTuningConfig", "PromptEmbedding", "SPEC"]
