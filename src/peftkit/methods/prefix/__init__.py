"""Prefix tuning: trained key/value prefixes in every attention layer (Li & Liang, 2021), with the
optional reparameterization MLP; and P-tuning v2 / deep prompt tuning (Liu et al., 2022), the same
method without the MLP, registered under its own name (``--method ptuning_v2``)."""
from torch import nn

from peftkit.methods.prefix.config import PrefixTuningConfig, PTuningV2Config
from peftkit.methods.prefix.init import init_from_text
from peftkit.methods.prefix.inputs import generating, prepare_inputs
from peftkit.methods.prefix.layer import PrefixEmbedding, PrefixEncoder
from peftkit.methods.prompt import input_embedding_key
from peftkit.registry import LayerRule, MethodSpec, register_method


def load_fix(config: PrefixTuningConfig) -> str | None:
    """Why a trainable load of a projected prefix fails, and what to do instead."""
    if config.inference_mode or not config.prefix_projection:
        return None
    return ("a prefix-tuning file holds only the prefix (prompt_embeddings; the prefix_projection MLP is folded "
            "away on saving, as in HF PEFT), so the MLP cannot train on: load it with is_trainable=False, or "
            "train the prefix on directly: PeftModel.from_pretrained(base, folder, is_trainable=True, "
            "config=PrefixTuningConfig.from_pretrained(folder, prefix_projection=False))")


def _spec(name: str, config_cls: type, summary: str, claims=None) -> MethodSpec:
    return register_method(MethodSpec(
        name=name,
        peft_type="PREFIX_TUNING",
        config_cls=config_cls,
        claims=claims,
        prepare_config=lambda config, model: config.fill_from_model(model),
        supports="the model's input embeddings (an nn.Embedding found by get_input_embeddings), as the anchor",
        layer_rules=[LayerRule(lambda m, c: isinstance(m, nn.Embedding), PrefixEmbedding)],
        summary=summary,
        target_presets=False,
        find_targets=input_embedding_key,
        prepare_inputs=prepare_inputs,
        generating=generating,
        file_prefix="base_model.",
        load_fix=load_fix,
        after_inject=init_from_text,
        supports_checkpointing=False,  # see check_no_checkpointing in inputs.py
    ))


SPEC = _spec("prefix", PrefixTuningConfig,
             "Trained key/value prefixes in every attention layer, optional MLP reparameterization (Li & Liang, 2021).")
# Files never pick the preset (claims nothing): a PREFIX_TUNING file loads as a PrefixTuningConfig.
PTUNING_V2_SPEC = _spec("ptuning_v2", PTuningV2Config,
                        "P-tuning v2: prefix tuning of every layer without the MLP (Liu et al., 2022).",
                        claims=lambda data: False)

__all__ = ["PrefixTuningConfig", "PTuningV2Config", "PrefixEmbedding", "PrefixEncoder", "SPEC", "PTUNING_V2_SPEC"]
