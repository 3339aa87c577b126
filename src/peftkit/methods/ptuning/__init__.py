"""P-tuning: virtual tokens from a trained prompt encoder (MLP or LSTM), prepended to the input
(Liu et al., 2021). The prompt enters through prompt tuning's input functions."""
from torch import nn

from peftkit.methods.prompt import input_embedding_key
from peftkit.methods.prompt.inputs import generating, prepare_inputs
from peftkit.methods.ptuning.config import PromptEncoderConfig
from peftkit.methods.ptuning.layer import PromptEncoder, PromptEncoderEmbedding
from peftkit.registry import LayerRule, MethodSpec, register_method


def load_fix(config: PromptEncoderConfig) -> str | None:
    """Why a trainable load of a P-tuning file fails, and what to do instead."""
    if config.inference_mode:
        return None
    return ("a P-tuning file holds only the prompt encoder's output (prompt_embeddings; the encoder is folded "
            "away on saving, as in HF PEFT), so the encoder cannot train on: load it with is_trainable=False, "
            "or train the folded prompt on as prompt tuning: PeftModel.from_pretrained(base, folder, "
            "is_trainable=True, config=PromptTuningConfig(num_virtual_tokens=...))")


SPEC = register_method(MethodSpec(
    name="ptuning",
    peft_type="P_TUNING",
    config_cls=PromptEncoderConfig,
    prepare_config=lambda config, model: config.fill_from_model(model),
    supports="the model's input embeddings (an nn.Embedding found by get_input_embeddings)",
    layer_rules=[LayerRule(lambda m, c: isinstance(m, nn.Embedding), PromptEncoderEmbedding)],
    summary="Virtual tokens from a trained MLP/LSTM prompt encoder, prepended to the input (Liu et al., 2021).",
    target_presets=False,
    find_targets=input_embedding_key,
    prepare_inputs=prepare_inputs,
    generating=generating,
    file_prefix="base_model.",
    load_fix=load_fix,
))

__all__ = ["PromptEncoderConfig", "PromptEncoder", "PromptEncoderEmbedding", "SPEC"]
