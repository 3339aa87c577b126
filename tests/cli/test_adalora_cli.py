"""`peftkit train --method adalora`: the budget schedule's length comes from the run's own."""

import pytest

from peftkit.cli.errors import UserError
from peftkit.cli.runconfig import resolve
from peftkit.cli.train import method_spec


def test_total_step_defaults_to_max_steps_and_an_explicit_one_wins():
    spec = method_spec("adalora")
    assert resolve({"max_steps": 40}, {}, spec).method_config.total_step == 40
    cfg = resolve({"max_steps": 40, "total_step": 30}, {}, spec)
    assert cfg.method_config.total_step == 30 and cfg.method_options["total_step"] == 30


def test_an_epoch_counted_run_must_say_how_long_the_schedule_is():
    with pytest.raises(UserError, match="--total-step N, or --max-steps N"):
        resolve({"epochs": 1}, {}, method_spec("adalora"))
