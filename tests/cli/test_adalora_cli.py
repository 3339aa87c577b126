"""`peftkit train --method adalora`: the budget schedule's length comes from the run's own."""

import pytest

from peftkit.cli.errors import UserError
from peftkit.cli.runconfig import resolve
from peftkit.cli.train import fill_run_length, method_spec


@pytest.mark.parametrize("flags, n_train, want", [
    ({"max_steps": 40}, 1000, 40),
    ({"epochs": 2, "batch_size": 16, "gradient_accumulation_steps": 2}, 1000, 2 * 32),  # 63 batches -> 32 steps
    ({"max_steps": 40, "total_step": 30}, 1000, 30),  # set explicitly: kept
])
def test_total_step_is_the_runs_planned_steps_unless_given(flags, n_train, want):
    cfg = resolve(flags, {}, method_spec("adalora"))
    fill_run_length(cfg, n_train)
    assert cfg.method_config.total_step == want and cfg.method_options["total_step"] == want


def test_a_run_too_short_for_the_schedule_is_refused_with_the_option_named():
    cfg = resolve({"method": "adalora", "max_steps": 5, "tinit": 10}, {}, method_spec("adalora"))
    with pytest.raises(UserError, match="invalid adalora option: tinit=10"):
        fill_run_length(cfg, 100)


def test_other_methods_are_untouched():
    cfg = resolve({"max_steps": 40}, {}, method_spec("lora"))
    before = dict(cfg.method_options)
    fill_run_length(cfg, 1000)
    assert cfg.method_options == before
