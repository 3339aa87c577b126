"""Bottleneck adapters: a small residual MLP after a sub-layer's output (Houlsby / Pfeiffer placement)
or beside a feed-forward block (parallel placement, He et al., 2022), and AdapterFusion, an attention over several trained bottleneck adapters (registered as "fusion")."""
from peftkit.engine.targets import is_linear
from peftkit.methods.adapter import fusion_hooks
from peftkit.methods.adapter.config import BottleneckConfig
from peftkit.methods.adapter.fusion_config import FusionConfig
from peftkit.methods.adapter.layer import BottleneckLayer
from peftkit.methods.adapter.parallel import ParallelAdapterLayer
from peftkit.registry import LayerRule, MethodSpec, register_method

SPEC = register_method(MethodSpec(
    name="adapter",
    peft_type="BOTTLENECK",
    hf_format=False,
    config_cls=BottleneckConfig,
    prepare_config=lambda config, model: config.fill_defaults(getattr(getattr(model, "config", None), "model_type", None)),
    supports="Linear, GPT-2 Conv1D; with placement='parallel' feed-forward blocks (mlp, BERT's layer.N.output)",
    target_presets=False,  # placement picks the targets
    summary="Bottleneck adapters h + s * up(act(down(h))) after sub-layer outputs (Houlsby et al., 2019; "
            "Pfeiffer et al., 2020), with AdapterDrop (Rücklé et al., 2021); cannot be merged.",
    layer_rules=[LayerRule(lambda m, c: getattr(c, "placement", None) == "parallel", ParallelAdapterLayer),
                 LayerRule(lambda m, c: is_linear(m), BottleneckLayer)],
))

# A fusion lives in the BottleneckLayers that already hold its members (find_targets picks them),
# so its rule names the same wrapper and the engine adds it to those layers.
FUSION_SPEC = register_method(MethodSpec(
    name="fusion",
    peft_type="ADAPTER_FUSION",
    config_cls=FusionConfig,
    supports="layers holding bottleneck adapters",
    target_presets=False,
    composes=True,
    hf_format=False,
    load_hint="A fusion folder holds only the fusion's own tensors: load its member adapters onto the base "
              "model first, under the names in `adapter_names`, then `model.load_adapter(this_folder, name)`.",
    summary="AdapterFusion (Pfeiffer et al., 2021): h + sum_i softmax_i(q . k_i / T) v_i over the outputs of "
            "frozen bottleneck adapters; only W_Q, W_K, W_V train; cannot be merged.",
    layer_rules=[LayerRule(lambda m, c: is_linear(m), BottleneckLayer)],
    find_targets=fusion_hooks.find_targets,
    extra_loss=fusion_hooks.value_regularization,
    after_step=fusion_hooks.anneal,
    get_state=fusion_hooks.get_state,
    set_state=fusion_hooks.set_state,
))

__all__ = ["BottleneckConfig", "BottleneckLayer", "ParallelAdapterLayer", "FusionConfig", "FUSION_SPEC", "SPEC"]
