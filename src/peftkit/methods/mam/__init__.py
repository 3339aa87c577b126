"""The MAM adapter (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning"): one adapter made of two existing methods' parts,

    attention:     prefix tuning, keys and values [P_k ; K], [P_v ; V] in every layer (methods/prefix)
    feed-forward:  FFN(x) + s * up(act(down(x))), x the FFN block's input (methods/adapter/parallel.py)

each wrapping its own modules under the adapter's one name (``MethodSpec.parts``; the engine runs
the prefix part's input hooks). Only the prefix, the parallel adapters and modules_to_save train.
Like its parts it cannot be merged, cannot mix adapters per row, starts from no identity (the
prefix takes attention weight) and refuses gradient checkpointing (the prefix travels in the
key/value cache). Saved as peftkit's own "MAM" type: one adapter_config.json with both parts'
options, one safetensors with ``prompt_embeddings`` and the adapters' ``adapter_down``/``adapter_up``.
"""
from peftkit.methods import adapter, prefix
from peftkit.methods.mam.config import MamConfig
from peftkit.registry import MethodSpec, register_method


def parts(config: MamConfig, model) -> list:
    return [(prefix.SPEC, config.make_part("prefix_tuning")), (adapter.SPEC, config.make_part("parallel_adapter"))]


SPEC = register_method(MethodSpec(
    name="mam",
    peft_type="MAM",
    config_cls=MamConfig,
    hf_format=False,
    parts=parts,
    part_layers=tuple(r.wrapper for r in prefix.SPEC.layer_rules + adapter.SPEC.layer_rules),
    supports="the parts' modules: the input embeddings (prefix) and feed-forward blocks (parallel adapter)",
    target_presets=False,
    supports_checkpointing=False,  # the prefix part (see methods/prefix/inputs.py)
    summary="MAM adapter: prefix tuning on attention + a scaled parallel adapter on the FFN, "
            "FFN(x) + s up(act(down(x))) (He et al., 2022); cannot be merged.",
))

__all__ = ["MamConfig", "SPEC"]
