"""LoRA: low-rank updates B A added to frozen weights."""
from torch import nn

from peftkit.engine.targets import fill_default_targets, is_linear
from peftkit.methods.lora.config import LoftQConfig, LoraConfig
from peftkit.methods.lora.convert import convert_to_lora
from peftkit.methods.lora.inits import rewrite_bases
from peftkit.methods.lora.layer import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from peftkit.methods.lora.linear4bit import Lora4bitLinear
from peftkit.quant.linear4bit import Linear4bit
from peftkit.registry import LayerRule, MethodSpec, register_method

SPEC = register_method(MethodSpec(
    name="lora",
    peft_type="LORA",
    config_cls=LoraConfig,
    prepare_config=fill_default_targets,
    supports="Linear, Embedding, Conv1d/2d/3d, GPT-2 Conv1D, 4-bit Linear4bit",
    claims=lambda d: not d.get("use_dora"),
    summary="Low-rank update B A beside each frozen weight (Hu et al., 2021).",
    after_inject=rewrite_bases,  # PiSSA / OLoRA / LoftQ rewrite the base once every target has its factors
    convert_initial=convert_to_lora,
    layer_rules=[
        LayerRule(lambda m, c: isinstance(m, Linear4bit), Lora4bitLinear),
        LayerRule(lambda m, c: is_linear(m), LoraLinear),
        LayerRule(lambda m, c: isinstance(m, nn.Embedding), LoraEmbedding),
        LayerRule(lambda m, c: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), LoraConv),
    ],
))

__all__ = ["LoraConfig", "LoftQConfig", "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv", "Lora4bitLinear", "SPEC"]
