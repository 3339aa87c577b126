"""`peftkit train --method ia3` on the bundled models: IA3's own per-architecture targets, not the
LoRA presets (query, value), unless the user names targets."""

import pytest

from peftkit.cli.runconfig import resolve
from peftkit.cli.train import method_spec


@pytest.mark.parametrize("task, model_type, targets, feedforward", [
    ("classification", "bert", ["key", "value", "output.dense"], ["output.dense"]),
    ("causal-lm", "llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
])
def test_bundled_model_gets_ia3_defaults(task, model_type, targets, feedforward):
    config = resolve({"task": task}, {}, method_spec("ia3")).method_config
    assert config.target_modules is None  # left for the model's architecture to fill
    config.fill_defaults(model_type)
    assert sorted(config.target_modules) == sorted(targets)
    assert sorted(config.feedforward_modules) == sorted(feedforward)


def test_named_targets_still_win():
    flags = {"target_modules": ["query", "value"], "feedforward_modules": []}
    config = resolve(flags, {}, method_spec("ia3")).method_config
    assert config.target_modules == ["query", "value"] and config.feedforward_modules == []
