"""Diff pruning: a sparse task-specific diff per weight, learnt with hard-concrete gates under a
relaxed-L0 penalty and projected to a target density (Guo et al., 2021)."""
from peftkit.engine.targets import is_linear
from peftkit.methods.diff_pruning.config import DiffPruningConfig
from peftkit.methods.diff_pruning.hooks import after_step, get_state, l0_penalty, project, set_state
from peftkit.methods.diff_pruning.layer import DiffPruningLinear
from peftkit.registry import LayerRule, MethodSpec, register_method


def prepare_config(config: DiffPruningConfig, model) -> None:
    """The projection schedule needs the run's length by now."""
    config.check_schedule()


SPEC = register_method(MethodSpec(
    name="diff_pruning",
    peft_type="DIFF_PRUNING",
    hf_format=False,
    config_cls=DiffPruningConfig,
    prepare_config=prepare_config,
    supports="Linear, GPT-2 Conv1D",
    summary="A sparse diff per weight: hard-concrete gates, relaxed-L0 penalty, magnitude projection (Guo et al., 2021).",
    target_presets=False,
    layer_rules=[LayerRule(lambda m, c: is_linear(m), DiffPruningLinear)],
    extra_loss=l0_penalty,
    after_step=after_step,
    get_state=get_state,
    set_state=set_state,
))

__all__ = ["DiffPruningConfig", "DiffPruningLinear", "project", "SPEC"]
