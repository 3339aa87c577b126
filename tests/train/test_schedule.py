import math

import pytest
import torch

from peftkit.train.schedule import WarmupSchedule, make_scheduler, warmup_steps_for


def test_warmup_ramps_to_peak_then_linear_decays_to_zero():
    s = WarmupSchedule("linear", total_steps=10, warmup_steps=4)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and s(7) == pytest.approx(0.5) and s(10) == 0.0


def test_cosine_is_half_at_the_midpoint_of_the_decay():
    s = WarmupSchedule("cosine", total_steps=12, warmup_steps=2)
    assert s(2) == 1.0 and s(7) == pytest.approx(0.5) and s(12) == pytest.approx(0.0)
    assert s(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 10)))


def test_constant_stays_at_peak_after_warmup():
    s = WarmupSchedule("constant", total_steps=5, warmup_steps=1)
    assert [s(i) for i in range(5)] == [1.0] * 5


def test_warmup_ratio_rounds_up_and_explicit_steps_win():
    assert warmup_steps_for(100, 0, 0.06) == 6
    assert warmup_steps_for(100, 3, 0.5) == 3


def test_scheduler_state_round_trips_through_state_dict():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = make_scheduler(opt, "cosine", 10, 2)
    for _ in range(4):
        opt.step()
        sched.step()
    opt2 = torch.optim.AdamW([p], lr=1.0)
    sched2 = make_scheduler(opt2, "cosine", 10, 2)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
